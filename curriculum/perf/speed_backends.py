"""One sweep on several backends of the sweep scheduler: stage runs and wall time of ``tools/leaderboard.py`` with
``--backend local`` (this process, and N local worker processes) and ``--backend ray`` (a local Ray with N
workers), each in a fresh work root, in turn.

Each configuration is the command a user types, run as its own process (start-up, Ray's start included), so the
seconds are what a user waits. Stage runs are counted from the results store (``cache_hit: false``), stage folders
from the stage store; both must equal the sweep's distinct prefixes whatever the backend. The load average before
and after each run is recorded: on a shared machine only the ratios between configurations run back to back mean
something.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

#: (name, extra flags of tools/leaderboard.py); ``{workers}`` is replaced by the worker count
CONFIGURATIONS = (('local, in-process', ['--backend', 'local', '--workers', '1']),
                  ('local, {workers} worker processes', ['--backend', 'local', '--workers', '{workers}']),
                  ('ray, {workers} workers (local Ray)', ['--backend', 'ray', '--workers', '{workers}']))


def sweep_flags(tasks: list[str], max_len: int, image_size: int, num_images: int, epochs: int,
                batch_size: int) -> list[str]:
    """The sweep every configuration runs: all orderings, one seed, no baseline, no LR search, kNN only."""
    options = [f'dataset_options.num_images={num_images}'] + [f'tasks.{task}.batch_size={batch_size}'
                                                               for task in tasks]
    return ['--tasks', ','.join(tasks), '--max-len', str(max_len), '--seeds', '0', '--baselines', '',
            '--image-size', str(image_size), '--epochs', str(epochs), '--lr-trials', '0', '--protocols', 'knn',
            '--device', 'cpu', '--quiet', '--cfg-options', *options]


def _stage_stats(results_db: str, stages_dir: str) -> dict:
    from curriculum.results import load_runs

    results = load_runs(f'sqlite:///{results_db}')
    stages = [stage for result in results for stage in result.get('stages', [])]
    trained = [stage for stage in stages if not stage.get('cache_hit')]
    folders = [name for name in os.listdir(stages_dir) if '.attempt-' not in name] if os.path.isdir(stages_dir) \
        else []
    return {'runs': len(results), 'stage_runs': len(trained), 'stage_reuses': len(stages) - len(trained),
            'stage_folders': len(folders), 'stage_seconds': sum(float(s.get('seconds') or 0) for s in trained)}


def run_configuration(tool: str, flags: list[str], work_root: str, log: str) -> dict:
    """One sweep as its own process; returns its seconds, exit code and counts."""
    command = [sys.executable, tool, *flags, '--work-root', work_root]
    before = os.getloadavg()
    started = time.perf_counter()
    with open(log, 'w') as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    out = {'seconds': seconds, 'exit_code': code, 'load_before': [round(x, 2) for x in before],
           'load_after': [round(x, 2) for x in os.getloadavg()],
           'command': 'python tools/leaderboard.py ' + ' '.join(f"'{f}'" if not f or ' ' in f else f
                                                                for f in flags[:]) + ' --work-root ROOT'}
    if code == 0:
        out.update(_stage_stats(os.path.join(work_root, 'results.db'), os.path.join(work_root, 'stages')))
    else:
        with open(log) as handle:
            out['log_tail'] = handle.read()[-2000:]
    return out


def measure_backends(tool: str, tasks: list[str], max_len: int, image_size: int, num_images: int, epochs: int,
                     batch_size: int, workers: int) -> dict:
    """Every configuration of :data:`CONFIGURATIONS` on the same sweep, one after the other, in fresh work roots
    (the decoded-image cache is warmed first, so that no configuration pays for it)."""
    from benchmarks.datasets import load_dataset
    from curriculum.leaderboard import all_orderings, distinct_prefixes

    load_dataset('synthetic_derm', None, image_size=image_size, seed=0, num_images=num_images)
    orderings = all_orderings(tasks, max_len)
    base = sweep_flags(tasks, max_len, image_size, num_images, epochs, batch_size)
    scratch = tempfile.mkdtemp(prefix='bench-backends-')
    measured = []
    try:
        for index, (name, extra) in enumerate(CONFIGURATIONS):
            name = name.format(workers=workers)
            flags = [*base[:base.index('--cfg-options')], *[f.format(workers=workers) for f in extra],
                     *base[base.index('--cfg-options'):]]
            root = os.path.join(scratch, f'root{index}')
            print(f'[sweep backends] {name} ...', file=sys.stderr, flush=True)
            entry = {'name': name, **run_configuration(tool, flags, root, os.path.join(scratch, f'{index}.log'))}
            print(f'[sweep backends] {name}: {entry["seconds"]:.0f} s, exit {entry["exit_code"]}', file=sys.stderr,
                  flush=True)
            measured.append(entry)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    reference = measured[0]['seconds']
    for entry in measured:
        entry['seconds_vs_in_process'] = entry['seconds'] / reference if reference else None
    ray, pool = measured[2], measured[1]
    return {'tasks': list(tasks), 'max_len': max_len, 'orderings': len(orderings),
            'distinct_stages': len(distinct_prefixes(orderings)),
            'stage_runs_without_prefix_cache': sum(len(o) for o in orderings),
            'settings': {'image_size': image_size, 'num_images': num_images, 'epochs': epochs,
                         'batch_size': batch_size, 'workers': workers, 'lr_trials': 0, 'protocols': 'knn',
                         'dataset': 'synthetic_derm', 'device': 'cpu'},
            'configurations': measured,
            'ratios': {'ray_vs_local_in_process': ray['seconds'] / reference if reference else None,
                       'ray_vs_local_workers': ray['seconds'] / pool['seconds'] if pool['seconds'] else None}}


def render_markdown(report: dict) -> str:
    lines = [f'# Sweep backends: {report["orderings"]} orderings of {",".join(report["tasks"])} up to length '
             f'{report["max_len"]}', '',
             f'Command: `{report["command"]}`  ', f'Date: {report["date"]}  ', f'Machine: {report["machine"]}  ', '',
             f'Every configuration runs the same sweep ({report["distinct_stages"]} distinct stages, '
             f'{report["stage_runs_without_prefix_cache"]} stage runs without the prefix cache) in a fresh work '
             f'root, as its own process (start-up included). Settings: {json.dumps(report["settings"])}.', '',
             '| configuration | wall s | vs in-process | stage runs | reused | stage folders | load before → after |',
             '|---|---|---|---|---|---|---|']
    for entry in report['configurations']:
        if entry['exit_code']:
            lines.append(f'| {entry["name"]} | failed (exit {entry["exit_code"]}) | | | | | |')
            continue
        lines.append(f'| {entry["name"]} | {entry["seconds"]:.0f} | {entry["seconds_vs_in_process"]:.2f} | '
                     f'{entry["stage_runs"]} | {entry["stage_reuses"]} | {entry["stage_folders"]} | '
                     f'{entry["load_before"][0]:.1f} → {entry["load_after"][0]:.1f} |')
    ratios = report['ratios']
    lines += ['', f'Ray with {report["settings"]["workers"]} workers / local in-process: '
              f'{ratios["ray_vs_local_in_process"]:.2f}; / local with {report["settings"]["workers"]} worker '
              f'processes: {ratios["ray_vs_local_workers"]:.2f} (wall time).', '',
              report.get('note', '')]
    return '\n'.join(lines).rstrip() + '\n'
