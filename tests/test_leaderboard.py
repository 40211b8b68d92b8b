"""Leaderboard: curriculum labels, orderings, aggregation and rendering; end-to-end sweeps in this process and on
local worker processes (one killed mid-stage), and a work root left by the previous engine."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from curriculum.leaderboard import (all_orderings, build_leaderboards, comparison_key, curriculum_label,
                                    distinct_prefixes, render_markdown, write_outputs)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, 'tools', 'leaderboard.py')
SMALL = ['--image-size', '32', '--epochs', '1', '--lr-trials', '1', '--protocols', 'knn', '--quiet',
         '--cfg-options', 'dataset_options.num_images=360', 'tasks.rotation.batch_size=32',
         'tasks.relloc.batch_size=32', 'lr_search.val_images=32', 'backbone.stem_channels=8',
         'backbone.base_channels=8']  # a narrow ResNet-18: these tests are about the sweep, not learning


def test_orderings_and_prefix_counts():
    orderings = all_orderings(['relloc', 'moco', 'odc'], 3)
    assert len(orderings) == 15
    assert len(set(orderings)) == 15
    assert len(distinct_prefixes(orderings)) == 15   # every ordering is itself a distinct prefix
    two = all_orderings(['rotation', 'relloc'], 2)
    assert two == [('rotation',), ('relloc',), ('rotation', 'relloc'), ('relloc', 'rotation')]
    assert len(distinct_prefixes(two)) == 4


@pytest.mark.parametrize('ordering, label', [
    (('a',), '-'), (('a', 'b'), 'C'), (('b', 'a'), 'AC'), (('a', 'b', 'c'), 'C'), (('c', 'b', 'a'), 'AC'),
    (('a', 'c', 'b'), 'MC'), (('b', 'a', 'c'), 'MC'), (('a', 'x'), '-'),
])
def test_curriculum_labels(ordering, label):
    assert curriculum_label(ordering, {'a': 0.5, 'b': 0.6, 'c': 0.7}) == label


def fake_result(order, seed, bacc, ci=None, init=None):
    metrics = {'balanced_accuracy': bacc, 'accuracy': bacc + 0.05, 'macro_f1': bacc - 0.05, 'auc': 0.8,
               'kappa': 0.3, 'headline': 'balanced_accuracy'}
    if ci:
        metrics['balanced_accuracy_ci'] = ci
    return {'order': list(order), 'seed': seed, 'init': init, 'dataset': 'd', 'downstream_dataset': 'd',
            'label_fraction': 1.0, 'config': {'seed': seed, 'x': 1}, 'downstream': {'linear': metrics},
            'stages': []}


def test_comparison_key_ignores_null_entries_so_a_new_null_default_keeps_stored_runs_comparable():
    """A stored run against the same config after a new option was added to the defaults as null (the engine's way
    of adding an option, off by default): still comparable, so a study resumes from its stored runs. Any set value,
    seed and study section aside, still makes runs incomparable."""
    stored = {'config': {'image_size': 32, 'seed': 0, 'study': {'name': 'a'},
                         'evaluation': {'finetune': {'steps': 3000, 'patience': None}, 'epochs': {'finetune': 8}},
                         'dataset_options': {}}}
    later = json.loads(json.dumps(stored))
    later['config']['evaluation']['finetune']['lr'] = None                      # a new option, unset
    later['config']['evaluation']['uda'] = {'target': None}                      # a new section, nothing set
    later['config'].pop('dataset_options')                                       # empty mapping == missing
    later['config'].update(seed=3, study={'name': 'b'}, new_flag=None)
    assert comparison_key(later) == comparison_key(stored)
    for path, value in ((('evaluation', 'finetune', 'lr'), 1e-4), (('evaluation', 'finetune', 'patience'), 10),
                        (('image_size',), 64), (('evaluation', 'finetune', 'steps'), None)):
        changed = json.loads(json.dumps(stored))
        node = changed['config']
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert comparison_key(changed) != comparison_key(stored), path


def test_aggregation_over_seeds_labels_deltas_and_baselines(tmp_path):
    results = []
    for seed, noise in enumerate([0.0, 0.01, -0.01]):
        results += [fake_result(['a'], seed, 0.50 + noise), fake_result(['b'], seed, 0.60 + noise),
                    fake_result(['a', 'b'], seed, 0.66 + noise), fake_result(['b', 'a'], seed, 0.55 + noise),
                    fake_result([], seed, 0.40 + noise)]
    board, = build_leaderboards(results)
    rows = {row.label: row for row in board.rows}
    assert rows['a,b'].mean('balanced_accuracy') == pytest.approx(0.66)
    low, high, how = rows['a,b'].interval('balanced_accuracy')
    assert low < 0.66 < high and 'seeds' in how
    text = render_markdown([board])
    line = next(line for line in text.splitlines() if line.startswith('| a,b |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[1] == 'C' and cells[2] == '66.00' and cells[4] == '3'
    assert cells[5] == '+16.00'           # δ vs its first task alone (a: 50.00)
    assert cells[6] == 'yes'              # better than the scratch baseline ('none')
    ac = next(line for line in text.splitlines() if line.startswith('| b,a |'))
    assert ' AC ' in ac and '-5.00' in ac
    assert 'curriculum (C)' in text
    paths = write_outputs([board], str(tmp_path))
    for path in paths.values():
        assert os.path.getsize(path) > 0


def test_single_seed_uses_the_bootstrap_interval():
    board, = build_leaderboards([fake_result(['a'], 0, 0.5, ci=[0.45, 0.56])])
    assert board.rows[0].interval('balanced_accuracy') == (0.45, 0.56, 'bootstrap over test images')


def run_tool(args, work_root, **kwargs):
    return subprocess.run([sys.executable, TOOL, '--work-root', str(work_root), *args], capture_output=True,
                          text=True, cwd=REPO, **kwargs)


def stored_runs(work_root):
    connection = sqlite3.connect(os.path.join(work_root, 'results.db'))
    rows = connection.execute('select ordering, seed, result_json from runs').fetchall()
    connection.close()
    return rows


def test_a_sweep_reads_its_config_and_recipes_once_so_editing_them_mid_study_changes_no_job(tmp_path, monkeypatch):
    import curriculum.plan as plan_module
    from curriculum.cli import config_overrides
    from curriculum.leaderboard import comparison_key
    from curriculum.plan import build_plan, load_config
    from curriculum.sweep_tasks import job_config, job_plan
    from tool_loader import load_tool

    config_file = tmp_path / 'study.yaml'
    config_file.write_text('image_size: 32\nevaluation:\n  label_fraction: 1.0\n')
    leaderboard = load_tool('leaderboard')
    args = leaderboard.parse_args(['--config', str(config_file), '--orders', 'rotation', 'rotation,relloc',
                                   '--baselines', 'none', '--seeds', '0,1', '--label-fractions', '0.1,1',
                                   '--work-root', str(tmp_path / 'root'), '--cfg-options', 'tasks.rotation.lr=0.05'])
    jobs = leaderboard.build_jobs(args)
    settings = leaderboard.sweep_settings(args, jobs)
    assert sorted(settings.recipes) == ['relloc', 'rotation']
    # what each job was before the sweep read the files once (the stored runs' identities depend on it)
    before = {}
    for job in jobs:
        config = load_config(str(config_file), {**config_overrides(args), 'seed': job['seed'],
                                                'evaluation.label_fraction': job['label_fraction']})
        before[json.dumps(job, sort_keys=True)] = (config, build_plan(job['order'], config))
    # mid-study: the experiment file and a recipe change on disk
    config_file.write_text('image_size: 48\nevaluation:\n  label_fraction: 1.0\n')
    real_recipe = plan_module.task_recipe
    monkeypatch.setattr(plan_module, 'task_recipe', lambda task: {**real_recipe(task), 'flip_p': 0.25})
    for job in jobs:
        config, plan = before[json.dumps(job, sort_keys=True)]
        assert job_config(settings, job) == config
        planned = job_plan(settings, job)
        assert [stage.cfg for stage in planned.stages] == [stage.cfg for stage in plan.stages]
        probe = {'config': planned.config, 'order': planned.order, 'init': None, 'seed': job['seed']}
        assert comparison_key(probe) == comparison_key({'config': config, 'order': plan.order, 'init': None,
                                                        'seed': job['seed']})
    assert job_plan(settings, jobs[-1]).stages[0].cfg['lr'] == 0.05    # the command's override is kept
    assert job_plan(settings, jobs[-1]).config['image_size'] == 32
    # a process that reads the files now (a new sweep) sees the edits
    fresh = leaderboard.sweep_settings(args, jobs)
    assert job_plan(fresh, jobs[-1]).config['image_size'] == 48
    assert job_plan(fresh, jobs[-1]).stages[0].cfg['flip_p'] == 0.25


def test_sweep_two_tasks_runs_four_stages_reuses_two_and_writes_outputs(tmp_path):
    work_root = tmp_path / 'root'
    out = tmp_path / 'out'
    proc = run_tool(['--tasks', 'rotation,relloc', '--max-len', '2', '--out', str(out), *SMALL], work_root,
                    timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = stored_runs(work_root)
    assert sorted(r[0] for r in rows) == ['none', 'relloc', 'relloc,rotation', 'rotation', 'rotation,relloc']
    stages = [s for r in rows for s in json.loads(r[2])['stages']]
    assert sum(not s['cache_hit'] for s in stages) == 4
    assert sum(s['cache_hit'] for s in stages) == 2
    for name in ('leaderboard.md', 'leaderboard.csv', 'leaderboard.html', 'leaderboard.png'):
        assert (out / name).stat().st_size > 0
    table = (out / 'leaderboard.md').read_text()
    assert 'planned 4, run 4, reused from the prefix cache 2' in table
    singles = {json.loads(r[2])['order'][0]: json.loads(r[2])['downstream']['knn']['balanced_accuracy']
               for r in rows if r[0] in ('rotation', 'relloc')}
    low, high = sorted(singles, key=singles.get)
    labels = {line.split('|')[1].strip(): line.split('|')[2].strip() for line in table.splitlines()
              if line.startswith('| ') and ',' in line.split('|')[1]}
    if singles[low] != singles[high]:
        assert labels[f'{low},{high}'] == 'C' and labels[f'{high},{low}'] == 'AC'
    # a rerun reuses everything from the results store and re-renders only
    again = run_tool(['--tasks', 'rotation,relloc', '--max-len', '2', '--out', str(out), *SMALL], work_root,
                     timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(stored_runs(work_root)) == 5
    rendered = run_tool(['--from-results', '--out', str(tmp_path / 'r')], work_root, timeout=300)
    assert rendered.returncode == 0 and (tmp_path / 'r' / 'leaderboard.md').exists()


def test_label_fractions_evaluate_each_ordering_at_every_fraction_right_after_its_stages(tmp_path):
    """One sweep over two label fractions trains each stage once, evaluates every ordering at both fractions, and
    schedules an ordering's evaluations before the next ordering's stages (a study on a machine that may be
    replaced must not leave trained stages waiting hours for their other fractions)."""
    from tool_loader import load_tool

    leaderboard = load_tool('leaderboard')
    args = leaderboard.parse_args(['--orders', 'rotation', 'rotation,relloc', '--seeds', '0',
                                   '--label-fractions', '1,0.5'])
    jobs = leaderboard.build_jobs(args)
    assert [(j['order'], j['label_fraction']) for j in jobs] == [
        ('none', 1.0), ('none', 0.5), ('rotation', 1.0), ('rotation', 0.5), ('rotation,relloc', 1.0),
        ('rotation,relloc', 0.5)]
    work_root = tmp_path / 'root'
    proc = run_tool(['--orders', 'rotation', '--label-fractions', '1,0.5', '--out', str(tmp_path / 'out'), *SMALL],
                    work_root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads(r[2]) for r in stored_runs(work_root)]
    assert sorted((r['order'] and r['order'][0] or 'none', r['label_fraction']) for r in runs) == [
        ('none', 0.5), ('none', 1.0), ('rotation', 0.5), ('rotation', 1.0)]
    stages = [s for r in runs for s in r['stages']]
    assert sum(not s['cache_hit'] for s in stages) == 1 and sum(s['cache_hit'] for s in stages) == 1
    assert (work_root / 'sweeps' / 'rotation' / 'seed0-labels0.5' / 'result.json').exists()
    assert (work_root / 'sweeps' / 'rotation' / 'seed0' / 'result.json').exists()


#: two-epoch stages of a tiny backbone on 16 px images, no LR search: a stage can be caught between its epoch
#: checkpoints
TWO_EPOCHS = ['--image-size', '16', '--epochs', '2', '--lr-trials', '0', '--protocols', 'knn', '--quiet',
              '--cfg-options', 'dataset_options.num_images=240', 'tasks.rotation.batch_size=16',
              'tasks.relloc.batch_size=16', 'monitor.max_images=64', 'monitor.k=5', 'backbone.stem_channels=8',
              'backbone.base_channels=8']


def _attempts(stages):
    return [p for p in stages.iterdir() if '.attempt-' in p.name] if stages.is_dir() else []


@pytest.mark.slow
def test_a_killed_worker_process_is_replaced_and_its_stage_resumes_from_its_checkpoint(tmp_path):
    """--workers 2: a worker process killed in the middle of a stage (after its first epoch checkpoint) is replaced,
    the node is tried again and resumes at epoch 1; each ordering is recorded once, each stage trained once."""
    work_root = tmp_path / 'root'
    stages = work_root / 'stages'
    args = ['--tasks', 'rotation,relloc', '--max-len', '1', '--baselines', 'none', '--workers', '2', *TWO_EPOCHS]
    proc = subprocess.Popen([sys.executable, TOOL, '--work-root', str(work_root), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, deadline = None, time.time() + 900
    while killed is None and proc.poll() is None and time.time() < deadline:
        for attempt in _attempts(stages):
            if (attempt / 'last_checkpoint').exists() and not (attempt / 'stage.json').exists():
                try:
                    owner = json.loads((attempt / 'owner.json').read_text())
                except (OSError, ValueError):
                    continue
                os.kill(owner['pid'], signal.SIGKILL)
                killed = attempt.name.split('.attempt-')[0]
                break
        time.sleep(0.05)
    output, _ = proc.communicate(timeout=max(1, deadline - time.time()))
    assert killed, 'the sweep ended before a stage could be caught between its checkpoints'
    assert proc.returncode == 0, output[-3000:]
    rows = stored_runs(work_root)
    assert sorted((r[0], r[1]) for r in rows) == [('none', 0), ('relloc', 0), ('rotation', 0)]
    stages_of = {r[0]: json.loads(r[2])['stages'] for r in rows}
    resumed = [s for s in stages_of[killed.split('-')[0]]]
    assert resumed[0]['key'] == killed.split('-', 1)[1] and resumed[0]['resumed_at_epoch'] == 1
    assert [h['epoch'] for h in resumed[0]['history']] == [0, 1, 2]
    assert sorted(p.name for p in stages.iterdir()) == sorted(
        f'{task}-{stages_of[task][0]["key"]}' for task in ('rotation', 'relloc'))   # no attempt left
    assert all(not s['cache_hit'] for task in ('rotation', 'relloc') for s in stages_of[task])
    assert 'resumed at epoch 1' in output


@pytest.mark.slow
def test_a_work_root_of_the_previous_engine_is_continued_by_the_studys_command(tmp_path):
    """What a running study (tools/study.py) hands over: stages trained in place under <task>-<key>/ (one
    interrupted after its first epoch, with the old *.lock file and queue database beside it) and runs in the
    results store. Its exact command resumes the stage from that checkpoint, keeps the stored run as it is and
    records the rest."""
    work_root = tmp_path / 'root'
    stages = work_root / 'stages'
    base = ['--orders', 'rotation', '--seeds', '0', '--baselines', 'none', '--label-fraction', '0.5']
    # the baseline is recorded, then rotation's stage is killed while its second epoch checkpoint is written
    first = subprocess.run([sys.executable, TOOL, *base, '--work-root', str(work_root), *TWO_EPOCHS], cwd=REPO,
                           capture_output=True, text=True, env=dict(os.environ, CURRICULUM_FAULT='checkpoint_write:3'),
                           timeout=900)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    attempt, = _attempts(stages)
    legacy = stages / attempt.name.split('.attempt-')[0]
    os.rename(attempt, legacy)                          # the layout engines before the stage store left
    (legacy / 'owner.json').unlink()
    (stages / f'{legacy.name}.lock').write_text('')
    (work_root / 'sweeps.db').write_bytes(b'')
    before = stored_runs(work_root)
    assert [(r[0], r[1]) for r in before] == [('none', 0)]
    out = tmp_path / 'board'
    proc = run_tool([*base, '--workers', '2', '--out', str(out), *TWO_EPOCHS], work_root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    after = stored_runs(work_root)
    assert after[0] == before[0]                        # the stored run untouched
    rotation = json.loads(next(r[2] for r in after if r[0] == 'rotation'))
    stage, = rotation['stages']
    assert stage['key'] == legacy.name.split('-', 1)[1] and stage['resumed_at_epoch'] == 1
    assert (legacy / 'stage.json').exists() and not _attempts(stages)
    assert (out / 'leaderboard.md').exists()


@pytest.mark.parametrize('backend', ['sqlite', 'postgresql'])
def test_two_concurrent_workers_run_each_ordering_exactly_once(tmp_path, backend):
    from postgres_server import available, postgres_server

    reason = available() if backend == 'postgresql' else None
    if reason:
        if os.environ.get('REQUIRE_POSTGRES') == '1':
            pytest.fail(f'REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {reason}')
        pytest.skip(reason)
    work_root = tmp_path / 'root'
    args = ['--tasks', 'rotation,relloc', '--max-len', '1', '--baselines', 'none', '--workers', '2', *SMALL]
    if backend == 'sqlite':
        proc = run_tool(args, work_root, timeout=1500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        keys = [(r[0], r[1]) for r in stored_runs(work_root)]
    else:
        import sqlalchemy as sa
        with postgres_server() as url:
            proc = run_tool(args + ['--storage', url, '--results', url], work_root, timeout=1500)
            assert proc.returncode == 0, proc.stderr[-3000:]
            engine = sa.create_engine(url)
            with engine.connect() as connection:
                keys = [tuple(row) for row in connection.execute(sa.text('select ordering, seed from runs'))]
            engine.dispose()
    assert sorted(keys) == [('none', 0), ('relloc', 0), ('rotation', 0)]
    assert (work_root / 'leaderboard' / 'leaderboard.md').exists()
