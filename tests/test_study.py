"""Study tooling: experiment files, compact result exports, computed findings, and docs/results.md re-rendering."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

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


def test_every_ordering_is_compared_with_scratch_unselected():
    """Beside the chosen-on-val ordering, every ordering gets its paired verdict against scratch: on the toy board
    both orderings beat scratch on every seed (a,b by 0.20 + 0.002·seed, b,a by exactly 0.12)."""
    lines = findings(_toy_runs(), 'linear')
    line = next(text for text in lines if text.startswith('- Every multi-task ordering vs from scratch'))
    assert line == ('- Every multi-task ordering vs from scratch (paired 95% CIs over seeds, points; not corrected '
                    'for the 2 comparisons): CI above 0: 2 (a,b +20.20 [+19.70, +20.70]; b,a +12.00 [+12.00, '
                    '+12.00]); CI below 0: 0; CI contains 0: 0.')
    line = next(text for text in lines if text.startswith('- Every multi-task ordering vs the best single task'))
    assert line.startswith('- Every multi-task ordering vs the best single task (b, chosen on val) (paired')
    assert 'CI above 0: 1 (a,b +5.20 [+4.70, +5.70]); CI below 0: 1 (b,a -3.00 [-3.00, -3.00]);' in line
    # a worse ordering and one with too few seeds
    runs = [r for r in _toy_runs() if r['order'] != ['a', 'b']]
    runs += [_run(['a', 'b'], seed, 0.40 + 0.01 * seed, 0.69) for seed in range(3)]
    runs += [_run(['a', 'b', 'a'], 0, 0.9, 0.5)]
    line = next(text for text in findings(runs, 'linear') if text.startswith('- Every multi-task'))
    assert 'not corrected for the 3 comparisons' in line
    assert 'CI below 0: 1 (a,b ' in line and 'CI above 0: 1 (b,a ' in line
    assert line.endswith('CI contains 0: 0; fewer than 3 paired seeds, no verdict: 1.')


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

    names = sorted(file[:-len('.yaml')] for file in os.listdir(os.path.join(REPO, 'configs', 'experiments')))
    assert {'ham10000', 'ham10000-32px', 'pneumoniamnist', 'pneumoniamnist-28px'} <= set(names)
    for name in names:
        path = os.path.join(REPO, 'configs', 'experiments', f'{name}.yaml')
        experiment = load_experiment(path)
        assert experiment.study.name == name and len(experiment.study.seeds) == 3
        for order in experiment.study.orders:
            build_plan(','.join(order), load_config(path))


def test_leaderboard_orders_flag_errors():
    tool = os.path.join(REPO, 'tools', 'leaderboard.py')
    for extra, message in ((['--orders', 'odc,odc'], "appears more than once"),
                           (['--orders', 'odc', '--tasks', 'moco'], 'not both'),
                           (['--orders', 'odc', '--label-fractions', '1,0'], '--label-fractions must be'),
                           (['--orders', 'odc', '--label-fractions', '1,0.1', '--label-fraction', '0.1'],
                            'either --label-fraction or --label-fractions')):
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


# --- study analysis: curriculum-hypothesis test, label-efficiency series, Table 1, compute per row ----------------

def test_spearman_uses_average_ranks_for_ties():
    from curriculum.study_analysis import average_ranks, spearman

    assert list(average_ranks([3.0, 1.0, 3.0, 2.0])) == [3.5, 1.0, 3.5, 2.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([0, 0, 1, 1], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / 5 ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) != spearman([1, 1, 1], [1, 2, 3])        # constant: NaN


def test_exact_permutation_p_enumerates_every_label_assignment():
    from curriculum.study_analysis import label_permutation_test

    # Cs on the two largest gains: rho = 2/sqrt(5); of the 6 assignments, {3, 4} and {1, 2} are as extreme
    test = label_permutation_test([False, False, True, True], [0.1, 0.2, 0.3, 0.4])
    assert test.exact and test.assignments == 6 and test.hits == 2
    assert test.rho == pytest.approx(0.894, abs=1e-3) and test.p == pytest.approx(2 / 6)
    reverse = label_permutation_test([True, True, False, False], [0.1, 0.2, 0.3, 0.4])
    assert reverse.rho == pytest.approx(-test.rho) and reverse.p == pytest.approx(2 / 6)   # two-sided
    middle = label_permutation_test([False, True, True, False], [0.1, 0.2, 0.3, 0.4])
    assert middle.rho == pytest.approx(0.0) and middle.p == pytest.approx(1.0)


def test_monte_carlo_permutation_p_is_deterministic_and_close_to_exact():
    from curriculum.study_analysis import label_permutation_test

    is_c = [True, False, True, False, False, True, False, False]
    gains = [0.5, 0.1, 0.4, -0.2, 0.0, 0.3, 0.2, -0.1]
    exact = label_permutation_test(is_c, gains)
    assert exact.exact and exact.assignments == 56
    first = label_permutation_test(is_c, gains, exact_limit=0, draws=5000)
    second = label_permutation_test(is_c, gains, exact_limit=0, draws=5000)
    assert not first.exact and first == second
    assert first.p == pytest.approx((1 + first.hits) / (1 + 5000))
    assert first.rho == pytest.approx(exact.rho) and first.p == pytest.approx(exact.p, abs=0.02)
    # 24 orderings, 12 C: 2,704,156 assignments, above the exact limit: 100,000 permutations of default_rng(0)
    big = label_permutation_test([i % 2 == 0 for i in range(24)], [float(i % 5) + 0.01 * i for i in range(24)])
    assert not big.exact and big.assignments == 100_000
    assert big == label_permutation_test([i % 2 == 0 for i in range(24)], [float(i % 5) + 0.01 * i for i in range(24)])


@pytest.mark.parametrize('pairs, reason', [
    ([('C', 0.1), ('AC', 0.0)], '2 labelled multi-task ordering(s) whose first task was run alone (needs at least 3)'),
    ([('AC', 0.1), ('MC', 0.0), ('MC', 0.2)], 'no curriculum (C) among the 3 labelled orderings'),
    ([('C', 0.1), ('C', 0.0), ('C', 0.2)], 'all 3 labelled orderings are curricula (C), none AC/MC'),
    ([('C', 0.1), ('AC', 0.1), ('MC', 0.1)], 'all 3 gains are equal'),
])
def test_curriculum_hypothesis_not_testable_says_why(pairs, reason):
    from curriculum.study_analysis import curriculum_hypothesis_line

    line = curriculum_hypothesis_line(pairs)
    assert line == ('- Curriculum hypothesis (does a C label predict the gain over the first task?): '
                    f'not testable here: {reason}.')


def test_curriculum_hypothesis_line_and_findings():
    from curriculum.study_analysis import curriculum_hypothesis_line

    line = curriculum_hypothesis_line([('AC', 0.01), ('MC', 0.02), ('C', 0.03), ('C', 0.04)])
    assert ('Spearman ρ = +0.89 between C (1) vs AC/MC (0) and the gain, exact permutation p = 0.33 (two-sided; '
            '2 of 6 label assignments at least as extreme), n = 4 orderings (2 C, 2 AC/MC).') in line
    # the toy board has one C (a,b) and one AC (b,a) ordering: too few for a test
    lines = findings(_toy_runs(), 'linear')
    line = next(text for text in lines if text.startswith('- Curriculum hypothesis'))
    assert line.endswith('not testable here: 2 labelled multi-task ordering(s) whose first task was run alone '
                         '(needs at least 3).')


def test_spread_line_gives_the_range_and_how_well_val_ranks_the_orderings_on_test():
    """The toy board's rows span none (0.50) to a,b (0.702); with a third multi-task ordering whose val and test
    ranks are the reverse of each other (b,a best on val and worst on test), ρ is -1 and the chosen one is last."""
    line = findings(_toy_runs(), 'linear')[-1]
    assert line == "- Spread: the 5 rows' mean test scores span 20.20 points (none 50.00 to a,b 70.20)."
    runs = _toy_runs() + [_run(['a', 'b', 'a'], seed, 0.66, 0.695) for seed in range(3)]
    line = findings(runs, 'linear')[-1]
    assert line == ("- Spread: the 6 rows' mean test scores span 20.20 points (none 50.00 to a,b 70.20); among the 3 "
                    'multi-task orderings, mean val and mean test rank them with Spearman ρ = -1.00, and the one '
                    'chosen on val (b,a) is 3 of 3 on test.')


def test_label_efficiency_series_choose_on_val_at_each_fraction():
    from curriculum.study_analysis import label_efficiency_series

    runs = _toy_runs() + [_run(order, seed, test, val, fraction=0.1)
                          for seed in range(3) for order, test, val in
                          (([], 0.30 + 0.01 * seed, 0.3), (['a'], 0.45, 0.50), (['b'], 0.40 + 0.01 * seed, 0.40),
                           (['a', 'b'], 0.42, 0.41), (['b', 'a'], 0.44, 0.43))]
    series = label_efficiency_series(runs, 'linear')
    assert [(p.fraction, p.label) for p in series['best_single']] == [(0.1, 'a'), (1.0, 'b')]
    assert [(p.fraction, p.label) for p in series['best_multi']] == [(0.1, 'b,a'), (1.0, 'b,a')]
    scratch = series['scratch']
    assert [p.label for p in scratch] == ['none', 'none'] and scratch[0].mean == pytest.approx(0.31)
    assert scratch[0].low < scratch[0].mean < scratch[0].high and scratch[0].seeds == 3


def _finetune_run(order, seed, test, seconds=100.0, stage_seconds=None, fraction=1.0):
    run = _run(order, seed, test, test, fraction=fraction)
    run['downstream'] = {'finetune': run['downstream']['linear']}
    run.update(seconds=seconds, device='cpu', classes=['x', 'y', 'z'], dataset='toyskin',
               split={'origin': 'published', 'train': 1000, 'val': 100, 'test': 200})
    run['config'].update(image_size=32, backbone={'type': 'ResNet', 'depth': 18})
    for stage in run['stages']:
        stage.update(train_seconds=120.0, lr_search_seconds=60.0, seconds=stage_seconds if stage_seconds is not None
                     else 180.0, cache_hit=stage_seconds == 0.0)
    return run


def test_source_table_one_side_by_side():
    from curriculum.study_analysis import has_source_orderings, source_section

    runs = [_finetune_run(order, seed, test + 0.01 * seed)
            for seed in range(3) for order, test in
            (([], 0.50), (['moco'], 0.60), (['odc', 'moco'], 0.65), (['moco', 'odc'], 0.55), (['rotation'], 0.70))]
    assert has_source_orderings(runs) and not has_source_orderings([r for r in runs if len(r['order']) < 2])
    text = '\n'.join(source_section('toy', runs, '3 epochs'))
    assert text.startswith('### Side by side with the source study (Table 1)')
    rows = [line for line in text.splitlines() if line.startswith('| ')][1:]
    assert [row.split(' | ')[0] for row in rows] == ['| `odc,moco`', '| `moco`', '| `moco,odc`', '| ImageNet weights',
                                                      '| from scratch (`none`)']
    assert rows[0].startswith('| `odc,moco` | 75.44 | 66.00 [') and rows[0].endswith('| 3 | 1 |')
    assert '| `moco,odc` | not quoted here | 56.00 [' in rows[2] and rows[2].endswith('| 3 | 3 |')
    assert rows[3] == '| ImageNet weights | 73.76 | not run (no ImageNet weights on this machine) | - | - |'
    assert rows[4].startswith('| from scratch (`none`) | 49.27 | 51.00 [') and rows[4].endswith('| 4 |')
    assert 'rotation' not in '\n'.join(rows)
    assert '3 classes, 1,000 training / 100 validation / 200 test images' in text
    assert 'ours: 32 px' in text and 'ours: moco 1, odc 1' in text and 'ours: ResNet-18' in text
    assert 'ours: 3 epochs' in text and 'ours: cpu' in text
    scarce_only = [_finetune_run(['odc', 'moco'], 0, 0.6, fraction=0.1)]
    assert 'No fine-tuning runs at label fraction 1 are stored yet.' in source_section('toy', scarce_only, '-')


def test_compute_per_row_counts_every_stage_of_an_ordering():
    from curriculum.study_analysis import compute_table

    runs = [_finetune_run(['a'], 0, 0.6, seconds=300.0), _finetune_run(['a'], 1, 0.6, seconds=420.0),
            _finetune_run(['a', 'b'], 0, 0.6, seconds=660.0),                    # both stages trained in this run
            _finetune_run(['a', 'b'], 0, 0.6, seconds=150.0, stage_seconds=0.0, fraction=0.1),   # cache hits
            _finetune_run([], 0, 0.5, seconds=90.0)]
    old = _finetune_run(['b'], 0, 0.6, seconds=240.0)
    del old['stages'][0]['train_seconds']                                         # an old record: unknown
    rows = {line.split(' | ')[0]: line for line in compute_table(runs + [old]) if line.startswith('| ')}
    assert rows['| ordering'] == '| ordering | pretraining (min) | downstream at 1 (min) | downstream at 0.1 (min) |'
    assert rows['| none'] == '| none | 0.0 | 1.5 | - |'
    assert rows['| a'] == '| a | 3.0 | 3.0 | - |'                               # (300-180 + 420-180) / 2 s
    assert rows['| a,b'] == '| a,b | 6.0 | 5.0 | 2.5 |'                         # cached stages still count
    assert rows['| b'] == '| b | - | 1.0 | - |'
    assert list(rows) == ['| ordering', '| none', '| a', '| b', '| a,b']
    total = next(line for line in compute_table(runs + [old]) if line.startswith('Total compute'))
    # stages a (seeds 0, 1), b after a, and b alone (untimed); downstream 120+240+300+150+90+60 s
    assert total == ('Total compute of the 6 stored runs: 4 distinct stages, 0.15 h of training (each stage once) + '
                     '0.27 h of downstream evaluation = 0.42 h of one worker\'s wall clock (1 stage(s) or run(s) '
                     'without timings left out).')


def test_study_run_exports_finished_runs_while_a_fraction_is_still_running(tmp_path):
    """A label fraction runs for hours; its finished runs must reach the export file before it ends, so that a
    machine lost mid-fraction keeps them (exporting only at the end once lost 13 runs)."""
    from tool_loader import load_tool

    study_tool = load_tool('study')
    url = f'sqlite:///{tmp_path / "results.db"}'
    export = str(tmp_path / 'toy.jsonl')
    finished = _toy_runs()[:2]
    marker = tmp_path / 'stop'
    # the child stores two finished runs at once, then keeps 'training' until the test lets it end
    child = ('import json, os, sys, time\n'
             f'sys.path.insert(0, {REPO!r})\n'
             'from curriculum.results import record_run\n'
             f'for run in json.loads({json.dumps(json.dumps(finished))}):\n'
             f'    record_run({url!r}, run)\n'
             'deadline = time.time() + 60\n'
             f'while not os.path.exists({str(marker)!r}):\n'
             '    time.sleep(0.05)\n'
             '    if time.time() > deadline:\n'
             '        sys.exit(4)\n'
             'sys.exit(3)\n')
    seen_while_running = []

    def export_and_look():
        study_tool.export_experiment('toy', url, export, True)
        seen_while_running.append(len(read_jsonl(export)) if os.path.exists(export) else 0)
        if seen_while_running[-1] == len(finished):
            marker.write_text('')       # the runs are out: let the 'fraction' end

    code = study_tool.call_exporting([sys.executable, '-c', child], export_and_look, every=0.3)
    assert code == 3                                           # the child's exit code is passed on
    assert len(finished) in seen_while_running[:-1]            # exported by a periodic call, not only the last
    assert sorted(r['seed'] for r in read_jsonl(export)) == sorted(r['seed'] for r in finished)


def test_a_killed_study_stops_its_sweep_and_exports_what_finished(tmp_path):
    """`kill` (SIGTERM) of `tools/study.py run` ends the sweep it started (it went on running without the study
    before) and exports once more."""
    from tool_loader import load_tool

    study_tool = load_tool('study')
    pid_file = tmp_path / 'child.pid'
    child = f'import os, time\nopen({str(pid_file)!r}, "w").write(str(os.getpid()))\ntime.sleep(120)\n'
    exports = []

    def export():
        exports.append(time.time())
        if len(exports) >= 2 and pid_file.exists():
            os.kill(os.getpid(), signal.SIGTERM)        # what `kill <study pid>` sends

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        study_tool.call_exporting([sys.executable, '-c', child], export, every=0.3)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert len(exports) >= 3 and exports[-1] - exports[-2] < 0.3  # the final export right after the kill
    with pytest.raises(ProcessLookupError):                      # the sweep is gone (and reaped)
        os.kill(int(pid_file.read_text()), 0)
    assert signal.getsignal(signal.SIGTERM) == handler           # this process's own handler is back


def test_study_export_every_must_be_positive(capsys):
    from tool_loader import load_tool

    with pytest.raises(SystemExit) as stopped:
        load_tool('study').parse_args(['run', 'x.yaml', '--export-every', '0'])
    assert stopped.value.code == 2
    assert 'must be a positive number of seconds' in capsys.readouterr().err


def test_an_empty_export_is_a_study_not_run_yet_and_export_writes_none(tmp_path):
    """A study stopped before its first run left an empty export once, and render crashed on it."""
    from tool_loader import load_tool

    results = tmp_path / 'results'
    results.mkdir()
    export_runs(_toy_runs(), str(results / 'toy.jsonl'))
    (results / 'empty.jsonl').write_text('')
    text = render_report(str(results), str(tmp_path), None, None)
    assert '## toy' in text and '## empty' not in text
    url = f'sqlite:///{tmp_path / "results.db"}'
    assert load_tool('study').export_experiment('nothing', url, str(results / 'nothing.jsonl')) == 0
    assert not (results / 'nothing.jsonl').exists()


def _export_two_fractions(results, name):
    runs = [_run(r['order'], r['seed'], r['downstream']['linear']['balanced_accuracy'],
                 r['downstream']['linear']['val']['balanced_accuracy'], fraction, name)
            for fraction in (1.0, 0.1) for r in _toy_runs()]
    assert export_runs(runs, str(results / f'{name}.jsonl')) == 30   # 15 runs a fraction, none a repeat


def test_a_superseded_study_follows_its_successor_marked_and_stays_out_of_the_plot(tmp_path):
    results, experiments = tmp_path / 'results', tmp_path / 'experiments'
    results.mkdir(), experiments.mkdir()
    _export_two_fractions(results, 'aaa-old')   # sorts first by name
    (experiments / 'old.yaml').write_text('study: {name: aaa-old, orders: [moco], superseded_by: zzz-new,\n'
                                          '        superseded_why: "its stages were too short."}\n')
    (experiments / 'new.yaml').write_text('study: {name: zzz-new, orders: [moco]}\n')
    text = render_report(str(results), str(tmp_path), None, str(experiments))
    assert text.index('## zzz-new') < text.index('## aaa-old')   # the successor (not run yet) comes first
    assert ('## aaa-old\n\n**Superseded** by [`zzz-new`](#zzz-new) and kept for the record: its stages were too '
            'short.') in text
    assert '## Label efficiency' not in text and not (tmp_path / 'results_label_efficiency.png').exists()
    _export_two_fractions(results, 'zzz-new')
    text = render_report(str(results), str(tmp_path), None, str(experiments))
    assert text.index('## zzz-new') < text.index('## aaa-old') < text.index('## Label efficiency')
    assert text.count('**Superseded**') == 1 and (tmp_path / 'results_label_efficiency.png').stat().st_size > 1000

    (experiments / 'old.yaml').write_text('study: {name: aaa-old, orders: [moco], superseded_by: nowhere}\n')
    with pytest.raises(PlanError, match="superseded_by names 'nowhere', which no experiment file"):
        render_report(str(results), str(tmp_path), None, str(experiments))
    for bad in ('superseded_by: aaa-old', 'superseded_by: [x]', 'superseded_why: "no successor named"'):
        (experiments / 'old.yaml').write_text(f'study: {{name: aaa-old, orders: [moco], {bad}}}\n')
        with pytest.raises(PlanError, match='superseded_'):
            load_experiment(str(experiments / 'old.yaml'))


def test_setup_line_lists_the_epochs_of_the_studys_own_tasks_only():
    """A config's tasks: section carries every recipe's defaults; the set-up line names the study's tasks."""
    from curriculum.report import _setup_lines

    config = {'tasks': {'a': {'epochs': 1}, 'b': {'epochs': 2}, 'z': {'epochs': 9}},
              'study': {'orders': ['a', 'a,b'], 'seeds': [0]}, 'evaluation': {'protocols': ['linear']}}
    run = {'order': ['a'], 'seed': 0, 'config': config, 'created': '2026-01-01T00:00:00+00:00', 'seconds': 60.0,
           'stages': [{'task': 'a', 'epochs': 1, 'key': 'k', 'seconds': 30.0, 'cache_hit': False}]}
    line = next(line for line in _setup_lines('toy', [run]) if 'stage epochs' in line)
    assert 'stage epochs: a 1, b 2;' in line and 'z 9' not in line


def test_precision_line_counts_runs_and_distinct_stages_and_says_when_they_are_mixed():
    """A study resumed on a machine with bf16 after one without mixes precisions; the set-up says how many of each."""
    from curriculum.report import precision_line

    fp32, bf16 = {'used': 'fp32'}, {'used': 'bf16'}
    runs = [{'precision': fp32, 'stages': [{'key': 'm0', 'cache_hit': False, 'precision': fp32}]},
            {'precision': fp32, 'stages': [{'key': 'm0', 'cache_hit': True, 'precision': fp32}]},
            {'precision': bf16, 'stages': [{'key': 'm1', 'cache_hit': False, 'precision': bf16},
                                           {'key': 'm2', 'cache_hit': False, 'precision': bf16}]},
            {'precision': bf16, 'stages': [{'key': 'm3', 'cache_hit': True, 'precision': bf16}]}, {'stages': []}]
    line = precision_line(runs)
    # m3 was trained by a process none of whose runs was stored: a cache hit wherever it appears, still counted
    assert line.startswith('- Training precision: downstream runs bf16 2, fp32 2, not recorded 1; '
                           'distinct stages bf16 3, fp32 1 (mixed:')
    assert 'mixed' not in precision_line(runs[:2])


@pytest.mark.parametrize('flag, value, message', [
    ('--seeds', 'a', '--seeds must be comma-separated integers'),
    ('--label-fractions', '1,2', '--label-fractions must be comma-separated numbers in (0, 1]'),
    ('--orders', 'swav,odc', "--orders: 'swav,odc' is not one of the study's orderings (relloc; moco;"),
])
def test_study_run_bad_seeds_fractions_or_orders_are_one_line_before_anything_is_written(tmp_path, flag, value,
                                                                                          message):
    work_root = tmp_path / 'never'
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'study.py'), 'run',
                           os.path.join(REPO, 'configs', 'experiments', 'ham10000-32px.yaml'), flag, value,
                           '--work-root', str(work_root)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not work_root.exists()


def test_study_run_orders_picks_the_studys_own_orderings_for_the_sweep():
    """`--orders` runs a subset of the study's orderings (e.g. every seed's single tasks first): the sweep gets
    exactly those, in the order given, once each, with the study's baselines and its own config, so that the runs
    are the very runs (same stored identity) a full `run` would make."""
    from tool_loader import load_tool

    from curriculum.report import load_experiment

    study_tool = load_tool('study')
    path = os.path.join(REPO, 'configs', 'experiments', 'ham10000-32px.yaml')
    experiment = load_experiment(path)
    args = study_tool.parse_args(['run', path, '--orders', 'swav', ' relloc, moco ', 'swav', '--seeds', '1,2'])
    orders = study_tool.select_orders(experiment.study.orders, args.orders)
    argv = study_tool.sweep_argv(experiment, args, [1.0, 0.01], [1, 2], orders)
    given = argv[argv.index('--orders') + 1:argv.index('--seeds')]
    assert given == ['swav', 'relloc,moco']
    assert argv[argv.index('--seeds') + 1] == '1,2' and argv[argv.index('--baselines') + 1] == 'none'
    assert argv[argv.index('--config') + 1] == path and argv[argv.index('--label-fractions') + 1] == '1,0.01'
    everything = study_tool.select_orders(experiment.study.orders, None)
    assert [','.join(o) for o in everything] == [','.join(o) for o in experiment.study.orders]
