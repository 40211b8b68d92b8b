"""The LR-search check: its verdict and separation logic on hand-made records, and tools/lr_check.py end to end on a
tiny built-in set (fixed LRs at the range ends and middle, the searched LR, the two files)."""
from __future__ import annotations

import json
import math
import sys

import pytest

from curriculum import lr_check
from tool_loader import load_tool


def _record(lr, downstream, curve):
    return {'lr': lr, 'downstream_knn': downstream, 'epochs': list(range(len(curve))), 'knn': list(curve),
            'train_seconds': 1.0, 'lr_search_seconds': None, 'lr_search': None}


def test_fixed_lrs_are_the_ends_and_the_geometric_middle():
    lrs = lr_check.fixed_lrs([0.001, 0.1])
    assert lrs['low'] == pytest.approx(0.001) and lrs['high'] == pytest.approx(0.1)
    assert lrs['middle'] == pytest.approx(0.01)


def test_verdict_passes_within_the_best_fixed_lrs_seed_spread_and_fails_outside():
    curve = [0.15, 0.16]
    runs = {'moco': {
        'low': {0: _record(0.001, 0.20, curve), 1: _record(0.001, 0.22, curve)},
        'middle': {0: _record(0.01, 0.30, curve), 1: _record(0.01, 0.26, curve)},    # best: mean 0.28, spread 0.04
        'high': {0: _record(0.1, 0.10, curve), 1: _record(0.1, 0.12, curve)},
        'searched': {0: _record(0.02, 0.25, curve), 1: _record(0.02, 0.26, curve)},  # mean 0.255: gap 0.025
    }}
    verdict = lr_check.summarise(runs)['moco']['verdict']
    assert verdict['best_fixed'] == 'middle'
    assert verdict['best_mean'] == pytest.approx(0.28) and verdict['best_seed_spread'] == pytest.approx(0.04)
    assert verdict['gap'] == pytest.approx(0.025) and verdict['passes']
    runs['moco']['searched'] = {0: _record(0.1, 0.12, curve), 1: _record(0.1, 0.11, curve)}
    verdict = lr_check.summarise(runs)['moco']['verdict']
    assert verdict['gap'] == pytest.approx(0.165) and not verdict['passes']


def test_separation_epoch_is_where_the_lr_spread_first_exceeds_twice_the_seed_noise():
    # seeds differ by 0.01 at every epoch; the LRs' means are 0.002 apart at epoch 1, 0.015 at 2, 0.05 at 3
    fixed = {
        'low': {0: _record(0.001, 0.2, [0.15, 0.150, 0.150, 0.15]),
                1: _record(0.001, 0.2, [0.15, 0.160, 0.160, 0.16])},
        'high': {0: _record(0.1, 0.2, [0.15, 0.152, 0.165, 0.20]),
                 1: _record(0.1, 0.2, [0.15, 0.162, 0.175, 0.21])},
    }
    result = lr_check.separation(fixed)
    rows = {row['epoch']: row for row in result['per_epoch']}
    assert set(rows) == {1, 2, 3}                       # epoch 0 (one random init) is not a trial length
    assert rows[1]['seed_noise'] == pytest.approx(0.01) and rows[1]['lr_spread'] == pytest.approx(0.002)
    assert rows[2]['lr_spread'] == pytest.approx(0.015)  # 1.5 x noise: not yet
    assert result['first_epoch'] == 3
    one_seed = {name: {0: by_seed[0]} for name, by_seed in fixed.items()}
    assert lr_check.separation(one_seed)['first_epoch'] is None   # no noise estimate from one seed


@pytest.mark.slow
def test_lr_check_tool_runs_fixed_and_searched_stages_and_writes_its_report(tmp_path):
    out = tmp_path / 'out'
    args = ['--tasks', 'rotation', '--image-size', '16', '--epochs', '1', '--seeds', '0,1', '--lr-trials', '2',
            '--work-root', str(tmp_path / 'root'), '--out', str(out), '--quiet', '--cfg-options',
            'dataset_options.num_images=160', 'tasks.rotation.batch_size=16', 'monitor.max_images=64',
            'backbone={type: ResNet, depth: 18, base_channels: 16, stem_channels: 16, out_indices: [3]}']
    assert load_tool('lr_check').main(args) == 0
    report = json.loads((out / 'lr_check.json').read_text())
    runs = report['runs']['rotation']
    assert set(runs) == {'low', 'middle', 'high', 'searched'}
    low, high = (float(v) for v in (0.01, 0.2))           # rotation's lr_range in configs/tasks/rotation.yaml
    for seed in ('0', '1'):
        assert runs['low'][seed]['lr'] == pytest.approx(low) and runs['high'][seed]['lr'] == pytest.approx(high)
    assert runs['middle']['0']['lr'] == pytest.approx(math.sqrt(low * high))
    for seed in ('0', '1'):
        searched = runs['searched'][seed]
        assert low <= searched['lr'] <= high
        assert searched['lr_search']['spread'] is not None and len(searched['lr_search']['trials']) == 2
        assert runs['low'][seed]['epochs'] == [0, 1] and 0 <= runs['low'][seed]['downstream_knn'] <= 1
    summary = report['summary']['rotation']
    assert summary['verdict'] is not None and isinstance(summary['verdict']['passes'], bool)
    markdown = (out / 'lr_check.md').read_text()
    assert '## rotation' in markdown and '| searched |' in markdown


def test_lr_check_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for args, fragment in ((['--tasks', 'rotation'], '--epochs is required'),
                           (['--tasks', 'rotation', '--epochs', '1', '--lr-trials', '1'], 'at least 2 trials'),
                           (['--tasks', 'bogus', '--epochs', '1'], "unknown pretext task 'bogus'")):
        code = load_tool('lr_check').main([*args, '--work-root', str(tmp_path), '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / 'out').exists()


if __name__ == '__main__':
    sys.exit(pytest.main([__file__, '-q']))
