"""Smoke test of ``tools/benchmark.py --quick``: it runs end to end and writes the documented JSON keys and a
Markdown table; and unit tests of its goal evaluation (:mod:`curriculum.perf.goals`) on hand-made numbers. No timing
assertions (the numbers depend on the machine and its load).

The end-to-end tests are marked ``slow`` (still run in CI). The quick run takes about a minute on a quiet 2-core
machine; the timeouts are generous because a shared machine can be several times slower."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from curriculum.perf.goals import evaluate_goals

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ('relloc', 'rotation', 'moco', 'swav', 'odc')
PROTOCOLS = ('linear', 'knn', 'finetune')


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('benchmark')
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'benchmark.py'), '--quick', '--out', str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / 'benchmark.json') as handle:
        data = json.load(handle)
    with open(out / 'benchmark.md') as handle:
        markdown = handle.read()
    return data, markdown


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_benchmark_writes_every_section_and_its_markdown_tables(quick_run):
    data, markdown = quick_run
    assert data['quick'] is True and not data['errors']
    ceiling = data['ceiling']
    for key in ('matmul_flops_per_s', 'fp32_gflops', 'bf16_gflops', 'backbone_forward_flops_per_image',
                'flop_bound_images_per_s'):
        assert ceiling[key] > 0
    for task in TASKS:
        entry = data['pretext'][task]
        assert entry['images_per_s'] > 0 and entry['flops_per_image_step'] > 0
        assert 0 < entry['fraction_of_ceiling']
        assert entry['profile']['top']
        assert entry['meta']['quick'] is True and entry['meta']['machine']['cpu_count'] >= 1
        for key in ('fp32_images_per_s', 'bf16_images_per_s', 'speedup_vs_fp32', 'bf16_speedup_vs_fp32',
                    'fraction_of_ceiling_bf16_step'):
            assert entry[key] > 0, (task, key)
        assert entry['precision'] in ('fp32', 'bf16') and entry['ceiling_dtype'] == entry['precision']
        assert entry['precision_variants']['fp32']['precision'] == 'fp32'
    # DINO on ResNet-18 and on the benchmark's ViT, iBOT on the ViT only (it needs patch tokens)
    assert data['pretext']['dino']['backbone'] == 'ResNet-18'
    for entry in ('dino@vit-tiny', 'ibot'):
        assert data['pretext'][entry]['backbone'] == 'VisionTransformer deit-tiny/4', entry
        assert data['pretext'][entry]['images_per_s'] > 0 and data['pretext'][entry]['fraction_of_ceiling'] > 0
    for task in ('moco', 'swav'):
        assert data['peer'][task]['images_per_s'] > 0
        assert data['ratio'][task]['value'] > 0
        assert data['peer_lightly'][task]['images_per_s'] > 0
        assert data['peer_lightly'][task]['flops_per_image_step'] > 0
        ratio = data['ratio_lightly'][task]
        assert ratio['value'] > 0
        assert set(ratio['precision']) == {'ours', 'lightly'} and all(ratio['precision'].values())
    for protocol in PROTOCOLS:
        entry = data['downstream'][protocol]
        for key in ('images_per_s', 'seconds', 'fp32_seconds', 'bf16_seconds', 'speedup_vs_fp32',
                    'bf16_speedup_vs_fp32'):
            assert entry[key] > 0, (protocol, key)
        for key in ('balanced_accuracy', 'fp32_balanced_accuracy', 'bf16_balanced_accuracy'):
            assert 0 <= entry[key] <= 1, (protocol, key)
    kmeans = data['kmeans']
    assert kmeans['faiss_seconds'] > 0 and kmeans['torch_seconds'] > 0
    sweep = data['sweep']
    assert sweep['with_cache']['stage_runs'] == sweep['planned_stage_runs_with_cache']
    assert sweep['without_cache']['stage_runs'] == sweep['planned_stage_runs_without_cache']
    assert sweep['with_cache']['stage_runs'] < sweep['without_cache']['stage_runs']
    lr = data['lr_search_fraction']
    assert lr['fraction'] > 0 and lr['lr_search_seconds'] > 0 and lr['train_seconds'] > 0
    assert data['load_average']['before'] is not None and 'after' in data['load_average']
    names = {goal['goal'].split(' ')[0] for goal in data['goals']}
    assert names >= {'ratio.moco', 'ratio.swav', 'ratio_lightly.moco', 'ratio_lightly.swav', 'lr_search_fraction',
                     'pretext.moco.fraction_of_ceiling', 'pretext.odc.speedup_vs_fp32',
                     'downstream.finetune.speedup_vs_fp32'}
    for goal in data['goals']:
        at_most = ' <= ' in goal['goal']
        assert goal['met'] == (goal['measured'] <= goal['target'] if at_most else goal['measured'] >= goal['target'])
    # the Markdown report has its tables
    assert '| task | precision | images/s |' in markdown
    for heading in ('## Ceiling', '## Precision: default vs fp32 vs bf16', "## Ours vs a lightly user's loop",
                    '## Downstream protocols', '## Goals'):
        assert heading in markdown
    assert 'bf16 matmul' in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith('|')]
    assert len(table_rows) > 20


def _hand_made(fraction: float, speedup: float, profile: bool = True) -> dict:
    entry = {'fraction_of_ceiling': fraction, 'ceiling_dtype': 'fp32', 'ceiling_flops_per_s': 250e9,
             'speedup_vs_fp32': speedup, 'bf16_speedup_vs_fp32': 0.58, 'precision': 'fp32',
             'precision_reason': 'bf16 measured only 0.67x fp32 on this CPU', 'augment_share_of_step': 0.02,
             'fraction_of_ceiling_bf16_step': 0.1}
    if profile:
        entry['profile'] = {'flop_kernel_share': 0.6, 'kernel_efficiency': 0.3,
                            'top': [{'op': 'aten::convolution_backward', 'share': 0.4}]}
    return {'device': 'cpu', 'ceiling': {'fp32_gflops': 250.0, 'bf16_gflops': 145.0, 'bf16_over_fp32': 0.58},
            'pretext': {'moco': entry}, 'peer': {}, 'ratio': {}, 'peer_lightly': {}, 'ratio_lightly': {},
            'downstream': {'knn': {'speedup_vs_fp32': 1.0, 'bf16_speedup_vs_fp32': 0.9, 'precision': 'fp32',
                                   'backbone_bound_share': 0.5, 'bf16_minus_fp32_balanced_accuracy': 0.0}}}


def test_goal_missed_is_not_met_even_with_a_profile():
    goals = {g['goal'].split(' ')[0]: g for g in evaluate_goals(_hand_made(fraction=0.05, speedup=1.0))}
    fraction = goals['pretext.moco.fraction_of_ceiling']
    assert fraction['met'] is False and fraction['explained_by_profile'] is True
    assert 'conv/matmul kernels take 60%' in fraction['limit']
    speedup = goals['pretext.moco.speedup_vs_fp32']
    assert speedup['met'] is False and speedup['measured'] == 1.0
    assert 'auto chose fp32' in speedup['limit'] and 'bf16 measured 0.58x fp32 on this CPU' in speedup['limit']
    assert goals['downstream.knn.speedup_vs_fp32']['met'] is False


def test_goal_reached_is_met_with_or_without_a_profile():
    for profile in (True, False):
        goals = {g['goal'].split(' ')[0]: g
                 for g in evaluate_goals(_hand_made(fraction=0.5, speedup=2.5, profile=profile))}
        assert goals['pretext.moco.fraction_of_ceiling']['met'] is True
        assert goals['pretext.moco.speedup_vs_fp32']['met'] is True


def test_report_of_a_stored_run_has_a_section_per_measurement_and_every_goal():
    from curriculum.perf.report import render_markdown

    with open(os.path.join(REPO, 'benchmarks', 'results', '2026-12-02-cpu', 'benchmark.json')) as handle:
        out = json.load(handle)
    out['goals'] = evaluate_goals(out)
    markdown = render_markdown(out)
    for heading in ('## Ceiling', '## Pretext training steps', "## Ours vs mmpretrain's own pipelines",
                    "## Ours vs a lightly user's loop", '## Downstream protocols', '## Profiles', '## k-means',
                    '## Leaderboard sweep', '## LR search share of a stage', '## Goals'):
        assert heading in markdown
    assert all(f'| {goal["goal"]} |' in markdown for goal in out['goals'])
    for table in ('| algorithm | ours images/s | peer images/s |', '| algorithm | ours images/s | lightly images/s |'):
        head = next(i for i, line in enumerate(markdown.splitlines()) if line.startswith(table))
        lines = markdown.splitlines()
        assert lines[head].count('|') == lines[head + 1].count('|') == lines[head + 2].count('|')
