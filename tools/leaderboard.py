#!/usr/bin/env python
"""Run (or reuse) every ordering of some tasks and render leaderboards across orderings.

    python tools/leaderboard.py --tasks relloc,moco,odc --max-len 3 [--out DIR] [--workers N] [--storage URL]
        [--baselines none[,PATH]] [--seeds 0,1,2] [run_curriculum flags ...]
    python tools/leaderboard.py --orders odc moco odc,moco relloc,odc,moco [--seeds 0,1,2] [run_curriculum flags ...]
    python tools/leaderboard.py --from-results [--results URL|FILE.jsonl] [--out DIR]
    ... [--fuse-top K [--fuse-protocol linear]]

Writes <out>/leaderboard.md, .csv, .html and .png and prints the Markdown table. Sweeps reuse the stage cache
(a stage is run once per distinct prefix) and the results store (a finished ordering is not run again).
``--fuse-top K`` adds to each board of ``--fuse-protocol`` a row fusing the final backbones of its K best orderings
(chosen on val) with protocol dvme, one fused run per seed (:mod:`curriculum.fuse_top`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import add_run_arguments, config_overrides, parse_seeds, task_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--tasks', default=None,
                        help=f'comma-separated pretext tasks to order (of {", ".join(task_names())})')
    parser.add_argument('--max-len', type=int, default=None, help='longest ordering (default: all tasks)')
    parser.add_argument('--orders', nargs='+', default=None, metavar='ORDER',
                        help='explicit orderings instead of --tasks/--max-len (each comma-separated)')
    parser.add_argument('--out', default=None, help='output folder (default <work-root>/leaderboard)')
    parser.add_argument('--workers', type=int, default=1, help='worker processes sharing the sweep')
    parser.add_argument('--storage', default=None,
                        help='queue storage URL shared by workers (default sqlite under --work-root)')
    parser.add_argument('--baselines', default='none', help='none and/or local weight files (comma-separated)')
    parser.add_argument('--seeds', default='0', help='comma-separated seeds')
    parser.add_argument('--from-results', action='store_true', help='only render from the results store')
    parser.add_argument('--fuse-top', type=int, default=None, metavar='K',
                        help='add a row fusing the K best orderings (chosen on val) with protocol dvme')
    parser.add_argument('--fuse-protocol', default='linear',
                        help='the board that gets the fused row and whose val headline chooses the orderings')
    parser.add_argument('--fuse-max-len', type=int, default=None,
                        help='fuse only orderings of at most this many tasks (1: the best single tasks)')
    parser.add_argument('--fuse-results', default=None,
                        help='results store of the fused runs (default: --results; a JSON Lines --results needs '
                             'one)')
    parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--heartbeat', type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument('--grace', type=int, default=60, help=argparse.SUPPRESS)
    add_run_arguments(parser)
    return parser.parse_args(argv)


def build_jobs(args) -> list[dict]:
    from curriculum.errors import PlanError
    from curriculum.leaderboard import all_orderings
    from curriculum.plan import parse_order

    if args.orders and args.tasks:
        raise PlanError('give either --tasks (every ordering up to --max-len) or --orders, not both')
    if args.orders:
        orderings = []
        for text in args.orders:
            ordering = tuple(parse_order(text))
            if not ordering:
                raise PlanError('--orders lists pretext orderings; baselines go in --baselines')
            if ordering not in orderings:
                orderings.append(ordering)
    else:
        if not args.tasks:
            raise PlanError('--tasks or --orders is required unless --from-results is given')
        tasks = parse_order(args.tasks)
        if not tasks:
            raise PlanError('--tasks must name at least one pretext task')
        max_len = args.max_len or len(tasks)
        if max_len < 1:
            raise PlanError(f'--max-len must be at least 1, got {max_len}')
        orderings = all_orderings(tasks, max_len)
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    baselines = [b.strip() for b in (args.baselines or '').split(',') if b.strip()]
    for base in baselines:
        if base != 'none' and not os.path.isfile(base):
            raise PlanError(f'baseline weights file not found: {base}')
    jobs = []
    for seed in seeds:  # baselines first: they are cheap and every comparison needs them
        for base in baselines:
            jobs.append({'order': 'none', 'seed': seed, 'init': None if base == 'none' else os.path.abspath(base)})
        for ordering in orderings:
            jobs.append({'order': ','.join(ordering), 'seed': seed, 'init': None})
    return jobs


def job_config(args, job: dict) -> dict:
    from curriculum.plan import load_config

    return load_config(args.config, {**config_overrides(args), 'seed': job['seed']})


def run_job(args, job: dict, results_url: str) -> dict:
    """Run one ordering unless the results store already holds it; returns its result."""
    from curriculum.leaderboard import comparison_key, run_label, sweep_work_dir
    from curriculum.plan import build_plan
    from curriculum.results import load_runs
    from curriculum.run import run_curriculum

    plan = build_plan(job['order'], job_config(args, job))
    probe = {'config': plan.config, 'order': plan.order, 'init': job['init'], 'seed': job['seed']}
    for stored in load_runs(results_url):
        if (comparison_key(stored) == comparison_key(probe) and run_label(stored) == run_label(probe)
                and stored['seed'] == job['seed']):
            return stored
    label = plan.label if not job['init'] else f'init-{os.path.basename(job["init"])}'
    fraction = (plan.config.get('evaluation') or {}).get('label_fraction', 1.0)
    work_dir = sweep_work_dir(args.work_root, label, job['seed'], fraction)
    return run_curriculum(plan, work_dir, args.work_root, results_url, init_path=job['init'],
                          optuna_storage=args.optuna_storage, progress=None)


def existing_runs(url: str) -> list[dict]:
    """The runs a results store holds; none (and nothing created) for an SQLite file that does not exist yet."""
    import sqlalchemy

    from curriculum.results import is_jsonl, load_runs

    if not is_jsonl(url):
        parsed = sqlalchemy.engine.make_url(url)
        if parsed.get_backend_name() == 'sqlite' and parsed.database and not os.path.exists(parsed.database):
            return []
    return load_runs(url)


def add_fused_rows(args, boards, base: list[dict], results_url: str) -> None:
    """``--fuse-top K``: on every board of ``--fuse-protocol``, the row fusing its K best orderings (fused runs
    made here when the results store does not hold them yet)."""
    from curriculum.errors import PlanError
    from curriculum.fuse_top import add_fused_row, fused_jobs, stored_fused_run
    from curriculum.leaderboard import comparison_key
    from curriculum.plan import build_plan
    from curriculum.results import is_jsonl
    from curriculum.run import run_curriculum

    if args.fuse_top < 1:
        raise PlanError(f'--fuse-top must be at least 1, got {args.fuse_top}')
    if args.fuse_max_len is not None and args.fuse_max_len < 1:
        raise PlanError(f'--fuse-max-len must be at least 1, got {args.fuse_max_len}')
    fused_url = args.fuse_results or results_url
    targets = [board for board in boards if board.protocol == args.fuse_protocol]
    if not targets:
        raise PlanError(f'--fuse-top: no results of protocol {args.fuse_protocol!r} (--fuse-protocol)')
    planned, skipped = [], []
    for board in targets:   # every fused run is planned (and its backbones found) before any is run
        group = [run for run in base if comparison_key(run) == board.key]
        try:
            labels, jobs = fused_jobs(group, args.fuse_protocol, args.fuse_top, args.work_root, args.fuse_max_len)
        except PlanError as exc:   # e.g. a board of an older config with fewer orderings: no row, said below it
            skipped.append(exc)
            board.notes.append(f'No fused row: {exc}.')
            continue
        planned.append((board, labels, [(job, build_plan(job['order'], job['config'])) for job in jobs]))
    if not planned:
        raise skipped[0]
    for board, labels, jobs in planned:
        fused = []
        for job, plan in jobs:
            stored = stored_fused_run(job, existing_runs(fused_url))
            if stored is None:
                if is_jsonl(fused_url):
                    raise PlanError(f'--fuse-top: {fused_url} is a JSON Lines export; fused runs need a results '
                                    f'store to be recorded in (--fuse-results URL)')
                stored = run_curriculum(plan, job['work_dir'], args.work_root, fused_url, init_path=job['init'],
                                        optuna_storage=args.optuna_storage, progress=None)
            fused.append(stored)
        add_fused_row(board, labels, fused, args.fuse_protocol)


def work(args, queue_name: str, storage_url: str, results_url: str) -> int:
    """Worker loop: take jobs from the shared queue until the sweep is complete."""
    from curriculum.sweep import Heartbeat, SweepQueue, open_storage

    storage = open_storage(storage_url, args.heartbeat, args.grace)
    queue = SweepQueue(storage, queue_name)
    while True:
        taken = queue.take()
        if taken is None:
            return 0
        trial, job = taken
        print(f'[worker {os.getpid()}] {job["order"]} seed {job["seed"]}'
              f'{" init " + job["init"] if job["init"] else ""}', flush=True)
        with Heartbeat(storage, trial, max(1, args.heartbeat // 2)):
            try:
                result = run_job(args, job, results_url)
            except BaseException:
                queue.fail(trial)
                raise
        metrics = next(iter(result['downstream'].values()), {})
        queue.finish(trial, metrics.get(metrics.get('headline', 'balanced_accuracy')))


def stage_counts(results: list[dict], jobs: list[dict]) -> dict[str, int]:
    from curriculum.leaderboard import distinct_prefixes

    planned = 0
    for seed in sorted({job['seed'] for job in jobs}):
        orderings = [tuple(job['order'].split(',')) for job in jobs if job['seed'] == seed and job['order'] != 'none']
        planned += len(distinct_prefixes(orderings))
    stages = [stage for result in results for stage in result.get('stages', [])]
    return {'planned': planned, 'run': sum(not s.get('cache_hit') for s in stages),
            'reused': sum(bool(s.get('cache_hit')) for s in stages)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS, PlanError
    from curriculum.leaderboard import build_leaderboards, is_fused
    from curriculum.results import default_results_url, load_runs

    results_url = args.results or default_results_url(args.work_root)
    out_dir = args.out or os.path.join(args.work_root, 'leaderboard')
    try:
        if args.from_results:
            results, counts = load_runs(results_url), None
        else:
            jobs = build_jobs(args)
            from curriculum.plan import build_plan
            from curriculum.sweep import SweepQueue, open_storage, sweep_id

            for job in jobs:  # validate every plan before any compute
                build_plan(job['order'], job_config(args, job))
            if args.workers < 1:
                raise PlanError(f'--workers must be at least 1, got {args.workers}')
            os.makedirs(args.work_root, exist_ok=True)
            storage_url = args.storage or f'sqlite:///{os.path.abspath(os.path.join(args.work_root, "sweeps.db"))}'
            name = f'sweep/{sweep_id(jobs, job_config(args, {"seed": 0}))}'
            queue = SweepQueue(open_storage(storage_url, args.heartbeat, args.grace), name)
            queue.fill(jobs)
            if args.worker or args.workers == 1:
                code = work(args, name, storage_url, results_url)
            else:
                # create the shared stores once here, so that the workers never race on a fresh schema
                from curriculum.lr_search import default_storage, open_study_storage
                from curriculum.results import prepare_store

                open_study_storage(args.optuna_storage or default_storage(args.work_root))
                prepare_store(results_url)
                argv_worker = [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:]), '--worker']
                procs = [subprocess.Popen(argv_worker) for _ in range(args.workers)]
                code = max(proc.wait() for proc in procs)
            if code:
                return code
            if args.worker:
                return 0
            wanted = {(job['order'], job['seed'], job['init']) for job in jobs}
            results = [r for r in load_runs(results_url)
                       if (','.join(r['order']) or 'none', r['seed'], r.get('init')) in wanted and not is_fused(r)]
            counts = stage_counts(results, jobs)
        if not results:
            raise PlanError(f'no results in {results_url}')
        base = [r for r in results if not is_fused(r)] if args.fuse_top is not None else results
        boards = build_leaderboards(base, counts)
        if args.fuse_top is not None:
            add_fused_rows(args, boards, base, results_url)
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    from curriculum.leaderboard import render_markdown, write_outputs

    paths = write_outputs(boards, out_dir)
    print(render_markdown(boards))
    print(f'written: {", ".join(paths.values())}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
