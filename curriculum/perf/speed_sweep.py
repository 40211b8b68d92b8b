"""End-to-end costs of the engine: a leaderboard sweep with and without the stage cache, and the LR-search share of
a stage.

* With the cache: ``tools/leaderboard.py`` itself (its ``main``, in this process) over every ordering of the tasks
  up to ``max_len``, sharing one work root, so each distinct prefix is trained once.
* Without the cache: every ordering run by ``curriculum.run.run_curriculum`` in a fresh work root of its own, so
  every ordering trains all of its stages from scratch.

Both are run in the same process with the same settings, so import costs are paid once and equally; the stage
runs are counted from the stored results (``cache_hit``), and the seconds are wall-clock, split into stage
seconds (from the results' per-stage ``seconds``) and the rest (downstream evaluation, results store, rendering).

The LR-search share reads ``lr_search_seconds`` and ``train_seconds`` from the ``stage.json`` that
``curriculum/run.py`` writes for a one-task curriculum.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time


def _overrides(image_size: int, num_images: int, epochs: int, protocols: str, lr_trials: int,
               batch_size: int | None = None, tasks=()) -> dict:
    options = {'dataset': 'synthetic_derm', 'dataset_options': {'num_images': int(num_images)},
               'image_size': int(image_size), 'epochs': int(epochs), 'lr_search.trials': int(lr_trials),
               'evaluation.protocols': [p for p in protocols.split(',') if p], 'device': 'cpu', 'seed': 0}
    if batch_size:  # per-task override of the recipes' batch size (the quick smoke test's tiny data)
        options.update({f'tasks.{task}.batch_size': int(batch_size) for task in tasks})
    return options


def _stage_stats(results: list[dict]) -> dict:
    stages = [stage for result in results for stage in result.get('stages', [])]
    run = [s for s in stages if not s.get('cache_hit')]
    return {'orderings': len(results), 'stage_runs': len(run), 'stage_reuses': len(stages) - len(run),
            'stage_seconds': sum(float(s.get('seconds') or 0.0) for s in run),
            'reuse_seconds': sum(float(s.get('seconds') or 0.0) for s in stages if s.get('cache_hit')),
            'result_seconds': sum(float(r.get('seconds') or 0.0) for r in results)}


def sweep_with_cache(tasks: list[str], max_len: int, work_root: str, overrides: dict, leaderboard_main) -> dict:
    """``tools/leaderboard.py`` (its ``main``, handed in by the tool that measures: the engine does not import its
    command-line tools) over all orderings in one work root."""
    from curriculum.results import default_results_url, load_runs

    argv = ['--tasks', ','.join(tasks), '--max-len', str(max_len), '--work-root', work_root, '--quiet',
            '--out', os.path.join(work_root, 'leaderboard'), '--cfg-options']
    argv += [f'{key}={json.dumps(value)}' for key, value in overrides.items()]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = leaderboard_main(argv)
    seconds = time.perf_counter() - started
    if code:
        raise RuntimeError(f'tools/leaderboard.py exited with {code}')
    results = load_runs(default_results_url(work_root))
    return {'seconds': seconds, 'command': 'tools/leaderboard.py ' + ' '.join(argv), **_stage_stats(results)}


def sweep_without_cache(tasks: list[str], max_len: int, scratch: str, overrides: dict) -> dict:
    """Every ordering from scratch: ``run_curriculum`` in a fresh work root per ordering."""
    from curriculum.leaderboard import all_orderings
    from curriculum.plan import build_plan, load_config
    from curriculum.results import default_results_url
    from curriculum.run import run_curriculum

    results = []
    started = time.perf_counter()
    for index, ordering in enumerate(all_orderings(tasks, max_len)):
        root = os.path.join(scratch, f'ordering{index}')
        plan = build_plan(','.join(ordering), load_config(None, overrides))
        results.append(run_curriculum(plan, os.path.join(root, 'run'), root, default_results_url(root)))
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.perf_counter() - started
    return {'seconds': seconds, 'method': 'run_curriculum per ordering, each in a fresh work root',
            **_stage_stats(results)}


def measure_sweep(tasks: list[str], max_len: int, image_size: int, num_images: int, leaderboard_main,
                  epochs: int = 1, protocols: str = 'knn', batch_size: int | None = None) -> dict:
    """Stage runs and seconds of a full leaderboard sweep with the prefix cache versus without it."""
    from curriculum.leaderboard import all_orderings, distinct_prefixes
    from benchmarks.datasets import load_dataset

    overrides = _overrides(image_size, num_images, epochs, protocols, lr_trials=0, batch_size=batch_size,
                           tasks=tasks)
    load_dataset('synthetic_derm', None, image_size=image_size, seed=0, num_images=num_images)  # warm the cache
    orderings = all_orderings(tasks, max_len)
    scratch = tempfile.mkdtemp(prefix='bench-sweep-')
    try:
        without = sweep_without_cache(tasks, max_len, os.path.join(scratch, 'nocache'), overrides)
        cached = sweep_with_cache(tasks, max_len, os.path.join(scratch, 'cache'), overrides, leaderboard_main)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        'tasks': list(tasks), 'max_len': max_len, 'orderings': len(orderings),
        'planned_stage_runs_with_cache': len(distinct_prefixes(orderings)),
        'planned_stage_runs_without_cache': sum(len(o) for o in orderings),
        'settings': {'image_size': image_size, 'num_images': num_images, 'epochs': epochs, 'lr_trials': 0,
                     'protocols': protocols, 'device': 'cpu', 'batch_size': batch_size or 'recipes'},
        'with_cache': cached, 'without_cache': without,
        'stage_runs_ratio': cached['stage_runs'] / max(1, without['stage_runs']),
        'seconds_ratio': cached['seconds'] / max(1e-9, without['seconds']),
        'stage_seconds_ratio': cached['stage_seconds'] / max(1e-9, without['stage_seconds']),
    }


def measure_lr_search_fraction(task: str, quick: bool) -> dict:
    """LR-search seconds / stage-training seconds from a stage record of ``curriculum/run.py`` at the default
    config (``quick``: 16 px, 160 images, 1 epoch, batch 16), one task, CPU, downstream reduced to kNN.

    The stage is trained for one epoch and its training time is scaled to the configured epochs: every epoch runs
    the same number of identical steps (the cosine schedule changes the LR, not the work), and the search does not
    depend on the epoch count (its trials are a fraction of one epoch). This keeps the full benchmark within its
    20-minute budget; the measured epoch and the factor are recorded."""
    from curriculum.plan import build_plan, load_config
    from curriculum.results import default_results_url
    from curriculum.run import run_curriculum
    from curriculum.stage import STAGE_FILE

    overrides = {'device': 'cpu', 'evaluation.protocols': ['knn']}
    if quick:
        overrides.update({'image_size': 16, 'dataset_options': {'num_images': 160}, 'epochs': 1,
                          f'tasks.{task}.batch_size': 16})
    configured_epochs = build_plan(task, load_config(None, overrides)).stages[0].epochs
    overrides['epochs'] = 1
    config = load_config(None, overrides)
    plan = build_plan(task, config)
    root = tempfile.mkdtemp(prefix='bench-lr-')
    try:
        started = time.perf_counter()
        result = run_curriculum(plan, os.path.join(root, 'run'), root, default_results_url(root))
        seconds = time.perf_counter() - started
        stage_dir = result['stages'][0]['stage_dir']
        with open(os.path.join(stage_dir, STAGE_FILE)) as handle:
            record = json.load(handle)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    search = record.get('lr_search') or {}
    trials = search.get('trials') or []
    lr_seconds, epoch_seconds = float(record['lr_search_seconds']), float(record['train_seconds'])
    train_seconds = epoch_seconds * configured_epochs
    return {
        'fraction': lr_seconds / train_seconds,
        'lr_search_seconds': lr_seconds,
        'train_seconds': train_seconds,
        'measured_epoch_seconds': epoch_seconds,
        'train_seconds_rule': f'1 epoch measured × {configured_epochs} configured epochs',
        'task': task,
        'run_seconds': seconds,
        'settings': {'image_size': config['image_size'], 'epochs': configured_epochs,
                     'batch_size': plan.stages[0].cfg['batch_size'], 'num_train_images': record.get('num_images'),
                     'lr_search': dict(config.get('lr_search') or {}),
                     'overrides': overrides},
        'trials': len(trials),
        'trial_states': {state: sum(t.get('state') == state for t in trials) for state in {t.get('state')
                                                                                           for t in trials}},
        'iterations_per_trial': search.get('iterations_per_trial'),
        'training_iterations': configured_epochs * (int(record.get('num_images') or 0)
                                                        // int(plan.stages[0].cfg['batch_size'])),
        'chosen_lr': record.get('lr'),
    }
