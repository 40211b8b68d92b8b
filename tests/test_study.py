"""Study tooling: experiment files, compact result exports, computed findings, and docs/results.md re-rendering."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from curriculum.errors import PlanError
from curriculum.report import findings, load_experiment, paired_difference, render_report
from curriculum.results import export_runs, import_runs, load_runs, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, 'docs')


def _run(order, seed, test, val, fraction=1.0, name='toy'):
    config = {'dataset': 'toy', 'seed': seed, 'study': {'name': name, 'orders': ['a', 'b', 'a,b'],
                                                         'seeds': [0, 1, 2], 'label_fractions': [fraction]},
              'evaluation': {'label_fraction': fraction}}
    return {'order': list(order), 'seed': seed, 'init': None, 'dataset': 'toy', 'downstream_dataset': 'toy',
            'label_fraction': fraction, 'config': config, 'work_root': '/somewhere/else',
            'stages': [{'task': t, 'epochs': 1, 'key': f'{"-".join(order[:i + 1])}-{seed}', 'seconds': 1.0,
                        'cache_hit': False, 'stage_dir': '/x'} for i, t in enumerate(order)],
            'downstream': {'linear': {'headline': 'balanced_accuracy', 'balanced_accuracy': test,
                                      'val': {'balanced_accuracy': val}}}}


def _toy_runs():
    runs = []
    for seed, noise in enumerate((0.0, 0.01, -0.01)):
        runs.append(_run([], seed, 0.50 + noise, 0.50))
        runs.append(_run(['a'], seed, 0.60 + noise, 0.60))
        runs.append(_run(['b'], seed, 0.65 + noise, 0.64))
        runs.append(_run(['a', 'b'], seed, 0.70 + noise + 0.002 * seed, 0.69))
        runs.append(_run(['b', 'a'], seed, 0.62 + noise, 0.70 + 0.01))   # best on val, worse on test
    return runs


def test_paired_difference_uses_common_seeds_only():
    mean, low, high, n = paired_difference({0: 0.7, 1: 0.8, 2: 0.9}, {0: 0.6, 1: 0.7, 5: 0.1})
    assert n == 2 and mean == pytest.approx(0.1)
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)   # identical differences: zero width


def test_findings_choose_on_val_and_state_paired_intervals():
    lines = '\n'.join(findings(_toy_runs(), 'linear'))
    # b,a has the best validation score, so it is the one compared, although a,b is better on test
    assert 'Best multi-task ordering (highest mean validation balanced_accuracy): **b,a**' in lines
    assert 'vs from scratch' in lines and 'better (95% CI above 0)' in lines
    assert 'vs the best single task, **b**' in lines and 'worse (95% CI below 0)' in lines
    assert 'C: +10.20 over 1 ordering(s)' in lines and 'AC: -3.00 over 1 ordering(s)' in lines


def test_two_seeds_give_an_interval_but_no_verdict():
    """Two seeds whose differences happen to be equal give a zero-width t-interval: it must not read as 'worse'."""
    two_seeds = [r for r in _toy_runs() if r['seed'] < 2]
    lines = '\n'.join(findings(two_seeds, 'linear'))
    assert 'over 2 paired seeds: no verdict with 2 paired seeds (needs 3)' in lines
    assert 'better (95% CI' not in lines and 'worse (95% CI' not in lines


def test_export_is_compact_sorted_and_round_trips_through_a_store(tmp_path):
    runs = _toy_runs()
    path = tmp_path / 'toy.jsonl'
    assert export_runs(runs + runs[:2], str(path)) == len(runs)          # repeated runs are kept once
    stored = read_jsonl(str(path))
    assert all('work_root' not in r and all('stage_dir' not in s for s in r['stages']) for r in stored)
    export_runs(list(reversed(runs)), str(tmp_path / 'again.jsonl'))
    assert (tmp_path / 'again.jsonl').read_text() == path.read_text()     # order-independent, byte-stable
    url = f'sqlite:///{tmp_path / "results.db"}'
    assert import_runs(url, stored) == len(runs)
    assert import_runs(url, stored) == 0                                  # nothing is imported twice
    assert sorted(json.dumps(r['downstream']) for r in load_runs(url)) == \
        sorted(json.dumps(r['downstream']) for r in stored)


def test_bad_results_file_is_one_clear_error(tmp_path):
    bad = tmp_path / 'bad.jsonl'
    bad.write_text('{"order": []}\n')
    with pytest.raises(Exception, match='line 1 is not a run result'):
        read_jsonl(str(bad))


@pytest.mark.parametrize('text, message', [
    ('dataset: toy\n', 'no "study:" section'),
    ('study: {name: x, orders: [odc, nope]}\n', "unknown pretext task 'nope'"),
    ('study: {name: x, orders: [none]}\n', '"none" goes in study.baselines'),
    ('study: {name: "a b", orders: [odc]}\n', 'study.name'),
    ('study: {name: x, orders: [odc], label_fractions: [0]}\n', 'label_fractions'),
    ('study: {name: x, orders: [odc], seeds: [-1]}\n', 'study.seeds'),
])
def test_experiment_file_errors(tmp_path, text, message):
    path = tmp_path / 'exp.yaml'
    path.write_text(text)
    with pytest.raises(PlanError, match=message.replace('(', r'\(')):
        load_experiment(str(path))


def test_shipped_experiments_are_valid_plans():
    from curriculum.plan import build_plan, load_config

    for name in ('ham10000', 'pneumoniamnist'):
        path = os.path.join(REPO, 'configs', 'experiments', f'{name}.yaml')
        experiment = load_experiment(path)
        assert experiment.study.name == name and len(experiment.study.seeds) == 3
        for order in experiment.study.orders:
            build_plan(','.join(order), load_config(path))


def test_leaderboard_orders_flag_errors():
    tool = os.path.join(REPO, 'tools', 'leaderboard.py')
    for extra, message in ((['--orders', 'odc,odc'], "appears more than once"),
                           (['--orders', 'odc', '--tasks', 'moco'], 'not both')):
        proc = subprocess.run([sys.executable, tool, *extra, '--work-root', '/nonexistent/never'],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not os.path.exists('/nonexistent/never')


def test_docs_results_md_rerenders_identically_from_the_stored_results(tmp_path):
    """docs/results.md is exactly what the renderer makes of docs/results/*.jsonl (and the discussion file)."""
    report = os.path.join(DOCS, 'results.md')
    assert os.path.isfile(report), 'docs/results.md is missing: run python tools/study.py render'
    text = render_report(os.path.join(DOCS, 'results'), str(tmp_path), os.path.join(DOCS, 'results_discussion.md'),
                         os.path.join(REPO, 'configs', 'experiments'))
    with open(report) as handle:
        assert handle.read() == text
    if 'label efficiency' in text:
        assert (tmp_path / 'results_label_efficiency.png').stat().st_size > 1000


def test_single_seed_findings_compare_bootstrap_intervals():
    def with_ci(run, low, high):
        run['downstream']['linear']['balanced_accuracy_ci'] = [low, high]
        return run
    runs = [with_ci(_run([], 0, 0.50, 0.50), 0.45, 0.55), with_ci(_run(['a'], 0, 0.60, 0.60), 0.56, 0.64),
            with_ci(_run(['a', 'b'], 0, 0.62, 0.61), 0.58, 0.66)]
    lines = '\n'.join(findings(runs, 'linear'))
    assert 'vs from scratch' in lines and '+12.00 points, one seed: 58.00-66.00 vs 45.00-55.00' in lines
    assert 'do not overlap' in lines                     # a,b vs scratch
    assert 'overlap: no clear difference' in lines       # a,b vs a
