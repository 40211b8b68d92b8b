"""Fault injection: kill -9 anywhere, rerun, and get the uninterrupted run's result; two identical runs together.

A tiny 3-stage curriculum (rotation → moco → odc, LR search of 2 trials + the noise repeat per stage, 96 generated
images at 16 px, a ResNet-18 with 8 base channels, one epoch per stage, deterministic kernels, one thread) runs
once uninterrupted with ``CURRICULUM_FAULT_TRACE`` set: the trace lists every crash point the run reaches, in order
(:mod:`curriculum.faults`). Twenty of them are drawn with a fixed seed, stratified over the kinds of moment (LR-trial
iterations, stage iterations, epoch checkpoints and backbone files being written, JSON records being written, the
results-store transaction). For each, a fresh work root runs the same command with ``CURRICULUM_FAULT=<point>:<n>``
(SIGKILL at that occurrence), then reruns it without; the rerun must finish with the same stages, learning rates,
LR-trial scores, losses, kNN curves and downstream metrics as the uninterrupted run, leave no temporary / partial /
orphaned file, and its results store must hold exactly one record — the rerun's. The runs are processes forked
from a preloaded server (tests/fault_harness.py), two at a time.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from curriculum.compat import SIDECAR_SUFFIX, is_trusted
from curriculum.results import default_results_url, load_runs

ORDER = 'rotation,moco,odc'
ARGS = ['--order', ORDER, '--image-size', '16', '--epochs', '1', '--lr-trials', '2', '--protocols', 'knn',
        '--deterministic', '--device', 'cpu', '--amp', 'none', '--quiet',
        '--cfg-options', 'dataset_options.num_images=64', 'tasks.rotation.batch_size=8', 'tasks.moco.batch_size=8',
        'tasks.odc.batch_size=8', 'lr_search.val_images=16', 'monitor.max_images=64', 'monitor.k=5',
        'backbone.stem_channels=8', 'backbone.base_channels=8']
KILLS = 20
SEED = 25
#: kills drawn per kind of crash point (the rest, if a kind has fewer points, from all points)
QUOTAS = {'trial_iter': 5, 'train_iter': 4, 'checkpoint_write': 3, 'file_write': 3, 'json_write': 4,
          'results_write': 1}
RUN_TIMEOUT = 300


@pytest.fixture(scope='module')
def launcher():
    from fault_harness import Launcher

    return Launcher()


def run(launcher, root, log, **env):
    """One run of the tool on work root ``root``; returns (exit code, seconds)."""
    started = time.monotonic()
    process = launcher.start(['--work-root', str(root), *ARGS], log, **env)
    process.join(RUN_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f'run on {root} did not end within {RUN_TIMEOUT} s (log: {log})')
    return process.exitcode, time.monotonic() - started


def log_tail(path) -> str:
    try:
        with open(path) as handle:
            return handle.read()[-3000:]
    except OSError:
        return ''


def comparable(result: dict) -> dict:
    """What an interrupted-then-resumed run must share with the uninterrupted one: everything computed (timings,
    dates, cache hits and resume points aside). LR trials compare as the set of completed (lr, score) pairs: a trial
    the kill interrupted is recorded as failed and its learning rate tried again."""
    stages = []
    for stage in result['stages']:
        search = stage['lr_search']
        stages.append({
            'task': stage['task'], 'key': stage['key'], 'lr': stage['lr'], 'epochs': stage['epochs'],
            'first_loss': stage['first_loss'], 'final_loss': stage['final_loss'],
            'history': [{k: v for k, v in entry.items() if not k.endswith('seconds')} for entry in stage['history']],
            'monitor_knn': (stage.get('monitor') or {}).get('knn'),
            'trials': sorted((t['lr'], t['score']) for t in search['trials'] if t['state'] == 'complete'),
            'spread': search['spread'], 'noise': search['noise'], 'discriminates': search['discriminates'],
        })
    return {'order': result['order'], 'seed': result['seed'], 'classes': result['classes'],
            'split': result['split'], 'stages': stages,
            'downstream': {protocol: {k: v for k, v in metrics.items() if not k.endswith('seconds')}
                           for protocol, metrics in result['downstream'].items()}}


def read_trace(path, started: float) -> list[tuple[str, int, float]]:
    """(point, occurrence, seconds since ``started``) of every crash point the traced run reached."""
    counts, events = {}, []
    with open(path) as handle:
        for line in handle:
            name, stamp = line.split()
            counts[name] = counts.get(name, 0) + 1
            events.append((name, counts[name], float(stamp) - started))
    return events


def draw_kill_points(events, count=KILLS, seed=SEED):
    rng = random.Random(seed)
    chosen = []
    for kind, quota in QUOTAS.items():
        of_kind = [event for event in events if event[0] == kind]
        chosen += rng.sample(of_kind, min(quota, len(of_kind)))
    rest = [event for event in events if event not in chosen]
    chosen += rng.sample(rest, max(0, count - len(chosen)))
    return sorted(chosen, key=lambda event: event[2])


def leftovers(root) -> list[str]:
    """Files a finished run must not leave: temporary / partial files, epoch checkpoints of finished stages,
    sidecars without their file, untrusted backbones."""
    bad = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(('.tmp', '.partial')) or name.startswith('epoch_') or name == 'last_checkpoint':
                bad.append(path)
            elif name.endswith(SIDECAR_SUFFIX) and not os.path.exists(path[:-len(SIDECAR_SUFFIX)]):
                bad.append(path)
            elif name == 'backbone.pth' and not is_trusted(path):
                bad.append(path)
    return bad


def store_rows(root) -> list[dict]:
    return load_runs(default_results_url(str(root)))


@pytest.mark.slow
@pytest.mark.xdist_group('fault_injection')   # both tests share one preloaded server
def test_kill_9_at_20_random_points_then_rerun_equals_the_uninterrupted_run(tmp_path, launcher):
    started, cpu_before = time.monotonic(), launcher.children_cpu_seconds()
    reference_root, trace = tmp_path / 'reference', tmp_path / 'trace.txt'
    reference_started = time.time()
    code, reference_seconds = run(launcher, reference_root, tmp_path / 'reference.log',
                                  CURRICULUM_FAULT_TRACE=str(trace))
    assert code == 0, log_tail(tmp_path / 'reference.log')
    with open(reference_root / ORDER / 'result.json') as handle:
        expected = comparable(json.load(handle))
    assert [len(stage['trials']) for stage in expected['stages']] == [2, 2, 2]
    points = draw_kill_points(read_trace(trace, reference_started))
    assert len(points) == KILLS and {name for name, _, _ in points} >= set(QUOTAS)

    def scenario(index, name, occurrence):
        root = tmp_path / f'kill{index:02d}'
        killed, killed_seconds = run(launcher, root, tmp_path / f'kill{index:02d}.log',
                                     CURRICULUM_FAULT=f'{name}:{occurrence}')
        rerun, rerun_seconds = run(launcher, root, tmp_path / f'rerun{index:02d}.log')
        outcome = {'killed': killed, 'rerun': rerun, 'seconds': (killed_seconds, rerun_seconds),
                   'log': log_tail(tmp_path / f'rerun{index:02d}.log')}
        if rerun == 0:
            with open(root / ORDER / 'result.json') as handle:
                outcome['result'] = json.load(handle)
            outcome['rows'] = store_rows(root)
            outcome['leftovers'] = leftovers(root)
        return outcome

    with ThreadPoolExecutor(max_workers=2 if (os.cpu_count() or 1) >= 2 else 1) as pool:
        futures = [pool.submit(scenario, i, name, n) for i, (name, n, _) in enumerate(points)]
        outcomes = [future.result() for future in futures]

    report = []
    for index, ((name, occurrence, at), outcome) in enumerate(zip(points, outcomes)):
        where = f'kill {index}: {name} #{occurrence} (at {at:.2f} s of {reference_seconds:.1f} s)'
        report.append(f'{where}: killed run {outcome["seconds"][0]:.1f} s, rerun {outcome["seconds"][1]:.1f} s')
        assert outcome['killed'] == -signal.SIGKILL, f'{where}: the run was not killed (exit {outcome["killed"]})'
        assert outcome['rerun'] == 0, f'{where}: the rerun failed\n{outcome["log"]}'
        assert comparable(outcome['result']) == expected, where
        assert outcome['leftovers'] == [], f'{where}: {outcome["leftovers"]}'
        rows = outcome['rows']
        assert len(rows) == 1, f'{where}: {len(rows)} records in the results store'
        assert rows[0]['_id'] == outcome['result']['results_id'], where
        assert comparable(rows[0]) == expected, where
    cpu_after = launcher.children_cpu_seconds()
    cpu = '' if cpu_before is None or cpu_after is None else f', runs used {cpu_after - cpu_before:.0f} CPU s'
    print('\n' + '\n'.join(report) + f'\nharness: {time.monotonic() - started:.1f} s{cpu}')


@pytest.mark.slow
@pytest.mark.xdist_group('fault_injection')
def test_two_identical_runs_started_together_train_each_stage_once_and_store_one_record(tmp_path, launcher):
    root = tmp_path / 'root'
    processes = [launcher.start(['--work-root', str(root), *ARGS], tmp_path / f'run{i}.log') for i in range(2)]
    for process in processes:
        process.join(RUN_TIMEOUT)
    assert [p.exitcode for p in processes] == [0, 0], log_tail(tmp_path / 'run0.log') + log_tail(
        tmp_path / 'run1.log')
    work_dir = root / ORDER
    files = sorted(work_dir.glob('result*.json'))
    assert len(files) == 2, files   # result.json and the other run's, kept as result.<created>.json
    results = []
    for path in files:
        with open(path) as handle:
            results.append(json.load(handle))
    rows = store_rows(root)
    assert len(rows) == 1
    assert [r['results_id'] for r in results] == [rows[0]['_id']] * 2
    assert comparable(results[0]) == comparable(results[1]) == comparable(rows[0])
    for index in range(3):   # every stage trained by exactly one of the two, read from the cache by the other
        assert sorted(r['stages'][index]['cache_hit'] for r in results) == [False, True]
    assert leftovers(root) == []
