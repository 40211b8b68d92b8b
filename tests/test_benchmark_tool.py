"""Smoke test of ``tools/benchmark.py --quick``: it runs end to end and writes the documented JSON keys and a
Markdown table. No timing assertions (the numbers depend on the machine and its load).

Marked ``slow`` (still run in CI). The quick run takes a few minutes on a quiet 2-core machine; the timeouts are
generous because a shared machine can be several times slower."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ('relloc', 'rotation', 'moco', 'swav', 'odc')


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
@pytest.mark.xdist_group('quick_benchmark')
@pytest.mark.timeout(1800)
def test_quick_benchmark_writes_every_section(quick_run):
    data, _ = quick_run
    assert data['quick'] is True and not data['errors']
    ceiling = data['ceiling']
    for key in ('matmul_flops_per_s', 'backbone_forward_flops_per_image', 'flop_bound_images_per_s'):
        assert ceiling[key] > 0
    for task in TASKS:
        entry = data['pretext'][task]
        assert entry['images_per_s'] > 0 and entry['flops_per_image_step'] > 0
        assert 0 < entry['fraction_of_ceiling']
        assert entry['profile']['top']
        assert entry['meta']['quick'] is True and entry['meta']['machine']['cpu_count'] >= 1
    for task in ('moco', 'swav'):
        assert data['peer'][task]['images_per_s'] > 0
        assert data['ratio'][task]['value'] > 0
    kmeans = data['kmeans']
    assert kmeans['faiss_seconds'] > 0 and kmeans['torch_seconds'] > 0
    sweep = data['sweep']
    assert sweep['with_cache']['stage_runs'] == sweep['planned_stage_runs_with_cache']
    assert sweep['without_cache']['stage_runs'] == sweep['planned_stage_runs_without_cache']
    assert sweep['with_cache']['stage_runs'] < sweep['without_cache']['stage_runs']
    lr = data['lr_search_fraction']
    assert lr['fraction'] > 0 and lr['lr_search_seconds'] > 0 and lr['train_seconds'] > 0
    assert data['load_average']['before'] is not None and 'after' in data['load_average']
    assert {goal['goal'].split(' ')[0] for goal in data['goals']} >= {'ratio.moco', 'ratio.swav', 'lr_search_fraction'}


@pytest.mark.slow
@pytest.mark.xdist_group('quick_benchmark')
@pytest.mark.timeout(1800)
def test_quick_benchmark_markdown_has_tables(quick_run):
    _, markdown = quick_run
    assert '| task | images/s |' in markdown
    assert '## Goals' in markdown
    table_rows = [line for line in markdown.splitlines() if line.startswith('|')]
    assert len(table_rows) > 20
