"""End-to-end tests of tools/run_curriculum.py: the stage cache across orderings, kill and resume, DDP (bad inputs:
tests/test_bad_inputs.py; kills at random points: tests/test_fault_injection.py)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, 'tools', 'run_curriculum.py')
# A small, fast configuration: 480 generated images at 32 px, a narrow ResNet-18, one epoch per stage, one LR trial.
SMALL = ['--image-size', '32', '--epochs', '1', '--lr-trials', '1', '--protocols', 'knn,linear', '--quiet',
         '--cfg-options', 'dataset_options.num_images=480', 'tasks.rotation.batch_size=32',
         'tasks.relloc.batch_size=32', 'tasks.odc.batch_size=32', 'tasks.moco.batch_size=32',
         'lr_search.val_images=64', 'backbone.stem_channels=8', 'backbone.base_channels=8']


def run_tool(args, work_root, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    return subprocess.run([sys.executable, TOOL, '--work-root', str(work_root), *args], capture_output=True,
                          text=True, env=env, cwd=REPO, **kwargs)


def test_prefix_cache_and_result_schema(tmp_path):
    work_root = tmp_path / 'root'
    first = run_tool(['--order', 'rotation', *SMALL], work_root, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_tool(['--order', 'rotation,moco', *SMALL], work_root, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    single = json.loads((work_root / 'rotation' / 'result.json').read_text())
    pair = json.loads((work_root / 'rotation,moco' / 'result.json').read_text())
    assert pair['order'] == ['rotation', 'moco'] and pair['dataset'] == 'synthetic_derm'
    assert [s['cache_hit'] for s in single['stages']] == [False]
    assert [s['cache_hit'] for s in pair['stages']] == [True, False]
    assert pair['stages'][0]['key'] == single['stages'][0]['key']
    assert pair['stages'][0]['lr'] == single['stages'][0]['lr']
    # the cached stage costs a small fraction of computing it
    assert pair['stages'][0]['seconds'] < 0.2 * single['stages'][0]['seconds']
    for stage in pair['stages']:
        assert set(stage) >= {'task', 'lr', 'epochs', 'lr_search', 'final_loss', 'seconds', 'cache_hit'}
        assert len(stage['lr_search']['trials']) == 1
        assert set(stage['lr_search']['trials'][0]) == {'lr', 'score', 'state'}
    for protocol in ('knn', 'linear'):
        metrics = pair['downstream'][protocol]
        assert set(metrics) >= {'balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa'}
    assert pair['versions']['torch'] and pair['seed'] == 0
    assert '| protocol |' in second.stdout
    # one record per run in the results store
    from curriculum.results import default_results_url, load_runs
    runs = load_runs(default_results_url(str(work_root)))
    assert [r['order'] for r in runs] == [['rotation'], ['rotation', 'moco']]


def test_kill_during_second_stage_then_resume_matches_uninterrupted(tmp_path):
    # no LR search and one probe: the test is about the stage loop (kill, resume, equality), not the search
    args = ['--order', 'rotation,moco', *SMALL, '--deterministic', '--epochs', '2', '--lr-trials', '0',
            '--protocols', 'knn']
    reference_root = tmp_path / 'reference'
    reference = run_tool(args, reference_root, timeout=1200)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((reference_root / 'rotation,moco' / 'result.json').read_text())

    work_root = tmp_path / 'killed'
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, TOOL, '--work-root', str(work_root), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages = work_root / 'stages'
    deadline = time.time() + 900
    killed = False
    while time.time() < deadline and proc.poll() is None:
        # the second stage has completed its first epoch checkpoint (last_checkpoint names it): kill mid-stage
        if stages.exists() and any(p.name.startswith('moco-') and (p / 'last_checkpoint').exists()
                                   for p in stages.iterdir()):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait(timeout=60)
    assert killed, 'the run ended before its second stage could be killed'
    assert not (work_root / 'rotation,moco' / 'result.json').exists()

    resumed = run_tool(args, work_root, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = json.loads((work_root / 'rotation,moco' / 'result.json').read_text())
    assert [s['cache_hit'] for s in result['stages']] == [True, False]
    history = result['stages'][1]['history']
    assert [h['epoch'] for h in history] == [0, 1, 2]     # epoch 0: the kNN monitor's value at the start
    want_history = expected['stages'][1]['history']
    assert [h['knn'] for h in history] == pytest.approx([h['knn'] for h in want_history], abs=1e-9)
    assert result['stages'][1]['resumed_at_epoch'] == 1
    for got, want in zip(result['stages'], expected['stages']):
        assert got['lr'] == want['lr']
        assert got['final_loss'] == pytest.approx(want['final_loss'], rel=1e-5, abs=1e-6)
    for protocol, metrics in expected['downstream'].items():
        assert result['downstream'][protocol]['balanced_accuracy'] == pytest.approx(
            metrics['balanced_accuracy'], abs=1e-9)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu_gives_one_result_with_the_same_schema(tmp_path):
    """DDP on CPU (gloo): two ranks train every stage and LR trial together; rank 0 alone evaluates and records."""
    work_root = tmp_path / 'root'
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    args = [a if a != '1' or SMALL[i - 1] != '--lr-trials' else '2' for i, a in enumerate(SMALL)]
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                           TOOL, '--order', 'odc,moco', '--device', 'cpu', '--work-root', str(work_root), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(work_root / 'odc,moco' / 'result.json') as handle:
        result = json.load(handle)
    assert [s['task'] for s in result['stages']] == ['odc', 'moco']
    for stage in result['stages']:
        assert {'task', 'lr', 'epochs', 'lr_search', 'final_loss', 'seconds', 'cache_hit'} <= set(stage)
        assert len(stage['lr_search']['trials']) == 2
        assert all({'lr', 'score', 'state'} <= set(t) for t in stage['lr_search']['trials'])
        assert stage['final_loss'] is not None and stage['cache_hit'] is False
    for metrics in result['downstream'].values():
        assert {'balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa'} <= set(metrics)
    from curriculum.results import default_results_url, load_runs
    assert len(load_runs(default_results_url(str(work_root)))) == 1      # one record, not one per rank
    # both ranks print the LR search's noise decision, and it must be the same one (rank 0's): each rank scores
    # the repeat trial on its own model copy, and a rank going by its own figure could train at another LR
    decisions = re.findall(r'(\w+): the LR trials do not discriminate \(spread (\S+) <= noise (\S+)\)', proc.stderr)
    assert decisions and len(decisions) % 2 == 0, proc.stderr[-3000:]
    assert all(decisions.count(line) % 2 == 0 for line in decisions), decisions
    # a DDP stage (global batch = 2 × batch) is a different stage from a single-process one
    single = run_tool(['--order', 'odc', '--device', 'cpu', '--lr-trials', '0', *SMALL], work_root, timeout=600)
    assert single.returncode == 0, single.stderr
    with open(work_root / 'odc' / 'result.json') as handle:
        assert json.load(handle)['stages'][0]['cache_hit'] is False


def test_a_stage_trained_by_the_runner_starts_from_its_parents_backbone(tmp_path):
    """mmengine's Runner calls init_weights() when training starts; the parent's weights must survive it. The stage
    runs with a negligible LR, so its backbone must stay the parent's (conv weights unchanged), not a fresh init."""
    import numpy as np
    import torch

    from curriculum.compat import atomic_torch_save, load_checkpoint_file
    from curriculum.stage import BACKBONE_FILE, StageInputs, train_stage
    from curriculum.plan import build_plan, load_config

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(64, 32, 32, 3), dtype=np.uint8)
    inputs = StageInputs(train_images=images, val_images=images[:8], image_size=32,
                         backbone_cfg=dict(type='ResNet', depth=18, base_channels=16, stem_channels=16,
                                           out_indices=[3]), seed=0, device='cpu')
    cfg = build_plan('rotation', load_config(None, {'epochs': 1, 'tasks.rotation.batch_size': 32})).stages[0].cfg
    fresh = str(tmp_path / 'fresh')
    train_stage('rotation', cfg, 1e-12, inputs, None, fresh)
    scratch = load_checkpoint_file(os.path.join(fresh, BACKBONE_FILE), map_location='cpu')
    # a parent far from any initialisation: the fresh weights plus noise of their own size
    torch.manual_seed(1)
    parent_state = {k: v + v.std() * torch.randn_like(v) if v.is_floating_point() and v.ndim == 4 else v
                    for k, v in scratch.items()}
    parent = str(tmp_path / 'parent.pth')
    atomic_torch_save(parent_state, parent)
    train_stage('rotation', cfg, 1e-12, inputs, parent, str(tmp_path / 'second'))
    after = load_checkpoint_file(str(tmp_path / 'second' / BACKBONE_FILE), map_location='cpu')
    for key in ('conv1.weight', 'layer1.0.conv1.weight', 'layer4.1.conv2.weight'):
        assert torch.allclose(after[key], parent_state[key], atol=1e-6), key   # inherited
        assert not torch.allclose(after[key], scratch[key], atol=1e-3), key    # not a re-initialisation
