#!/usr/bin/env python
"""Run (or reuse) every ordering of some tasks and render leaderboards across orderings.

    python tools/leaderboard.py --tasks relloc,moco,odc --max-len 3 [--out DIR] [--workers N]
        [--baselines none[,PATH]] [--seeds 0,1,2] [--label-fractions 1,0.1] [run_curriculum flags ...]
    python tools/leaderboard.py --orders odc moco odc,moco relloc,odc,moco [--seeds 0,1,2] [run_curriculum flags ...]
    python tools/leaderboard.py ... --backend ray [--ray-address auto|HOST:PORT] [--cpus-per-stage C]
        [--gpus-per-stage G]
    python tools/leaderboard.py --from-results [--results URL|FILE.jsonl] [--out DIR]
    ... [--fuse-top K [--fuse-protocol linear] [--fuse-max-len L] [--fuse-results URL]]

Writes <out>/leaderboard.md, .csv, .html and .png and prints the Markdown table. A sweep is a task graph
(curriculum/sweep.py): each distinct stage (a prefix shared by several orderings) is one node run once, each run's
evaluation one node after its last stage; finished stages come from the stage cache and finished runs from the
results store. --backend local runs the nodes in this process (--workers 1) or on N local worker processes;
--backend ray runs them as Ray tasks (a local Ray, or the cluster at --ray-address).
``--fuse-top K`` adds to each board of ``--fuse-protocol`` a row fusing the final backbones of its K best orderings
(chosen on val) with protocol dvme, one fused run per seed (:mod:`curriculum.fuse_top`).
"""
from __future__ import annotations

import argparse
import os
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
    parser.add_argument('--workers', type=int, default=1,
                        help='local: worker processes (1: this process); ray without --ray-address: stages at once')
    parser.add_argument('--backend', choices=('local', 'ray'), default='local',
                        help='where the nodes of the sweep run: this machine, or Ray tasks (pip install -e ".[ray]")')
    parser.add_argument('--ray-address', default=None,
                        help='Ray cluster to join (auto: the one this machine belongs to); none starts a local Ray')
    parser.add_argument('--cpus-per-stage', type=float, default=1.0, help='Ray: CPUs of each stage / evaluation task')
    parser.add_argument('--gpus-per-stage', type=float, default=0.0, help='Ray: GPUs of each stage / evaluation task')
    parser.add_argument('--retries', type=int, default=3,
                        help='times a node is tried again when its worker process or machine dies')
    parser.add_argument('--storage', default=None, help='same as --optuna-storage (the LR studies\' storage)')
    parser.add_argument('--baselines', default='none', help='none and/or local weight files (comma-separated)')
    parser.add_argument('--seeds', default='0', help='comma-separated seeds')
    parser.add_argument('--label-fractions', default=None, metavar='F1,F2',
                        help='several label fractions in one sweep (instead of --label-fraction): each run\'s '
                             'stages are evaluated at every fraction as soon as they are trained')
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
    add_run_arguments(parser)
    return parser.parse_args(argv)


def build_jobs(args) -> list[dict]:
    from curriculum.cli import parse_fractions
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
        fractions = parse_fractions(args.label_fractions)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    if fractions and args.label_fraction is not None:
        raise PlanError('give either --label-fraction or --label-fractions, not both')
    baselines = [b.strip() for b in (args.baselines or '').split(',') if b.strip()]
    for base in baselines:
        if base != 'none' and not os.path.isfile(base):
            raise PlanError(f'baseline weights file not found: {base}')
    # a job's position is its priority: each ordering's evaluations (one per label fraction) come right after its
    # stages, before the next ordering's stages
    per_fraction = [{'label_fraction': fraction} for fraction in dict.fromkeys(fractions)] if fractions else [{}]
    jobs = []
    for seed in seeds:  # baselines first: they are cheap and every comparison needs them
        for base in baselines:
            jobs += [{'order': 'none', 'seed': seed, 'init': None if base == 'none' else os.path.abspath(base), **f}
                     for f in per_fraction]
        for ordering in orderings:
            jobs += [{'order': ','.join(ordering), 'seed': seed, 'init': None, **f} for f in per_fraction]
    return jobs


def sweep_settings(args, jobs: list[dict]):
    """What every node of the sweep needs besides its job (curriculum.sweep_tasks.SweepSettings), the config and
    the recipes of the jobs' tasks read now, once."""
    from curriculum.plan import load_config, recipes_for
    from curriculum.results import default_results_url
    from curriculum.sweep import new_sweep_id
    from curriculum.sweep_tasks import SweepSettings

    overrides = config_overrides(args)
    overrides.pop('seed', None)
    return SweepSettings(cwd=os.path.abspath(os.getcwd()), work_root=args.work_root,
                         results_url=args.results or default_results_url(args.work_root),
                         optuna_storage=args.optuna_storage or args.storage, sweep_id=new_sweep_id(),
                         hide_cuda=args.device == 'cpu', config=load_config(args.config, overrides),
                         recipes=recipes_for([job['order'] for job in jobs]))


def stage_counts(results: list[dict], jobs: list[dict]) -> dict[str, int]:
    from curriculum.leaderboard import distinct_prefixes

    planned = 0
    for seed in sorted({job['seed'] for job in jobs}):
        orderings = [tuple(job['order'].split(',')) for job in jobs if job['seed'] == seed and job['order'] != 'none']
        planned += len(distinct_prefixes(orderings))
    stages = [stage for result in results for stage in result.get('stages', [])]
    return {'planned': planned, 'run': sum(not s.get('cache_hit') for s in stages),
            'reused': sum(bool(s.get('cache_hit')) for s in stages)}


def run_sweep(args, jobs: list[dict], settings) -> int:
    """Run the jobs the results store does not hold yet as one task graph; returns the exit status."""
    from curriculum.backend_local import NodeError
    from curriculum.errors import PlanError
    from curriculum.results import prepare_store
    from curriculum.sweep import Progress, build_graph, execute, open_backend
    from curriculum.sweep_tasks import job_plan, plan_sweep, stored_result

    stored = existing_runs(settings.results_url)   # nothing is created before the backend and the plans pass
    pending = [job for job in jobs if stored_result(stored, job_plan(settings, job), job) is None]
    if not pending:
        print(f'sweep: all {len(jobs)} runs are in the results store already', flush=True)
        return 0
    backend = open_backend(args.backend, args.workers, args.ray_address, args.cpus_per_stage, args.gpus_per_stage,
                           args.retries)
    try:
        if getattr(backend, 'dashboard', None):
            print(f'Ray dashboard: {backend.dashboard}', flush=True)
        try:
            chains = backend.plan(plan_sweep, (settings, pending))   # every plan-time check of every job
        except NodeError as exc:   # raised where the planning ran (a Ray worker)
            if exc.user_error:
                raise PlanError(str(exc)) from None
            print(exc.details, file=sys.stderr)
            print(f'error: planning the sweep failed: {exc}', file=sys.stderr)
            return 1
        # the shared stores are created once here, so that the nodes never race on a fresh schema
        os.makedirs(settings.work_root, exist_ok=True)
        prepare_store(settings.results_url)
        if any(chains):
            from curriculum.lr_search import default_storage, open_study_storage

            open_study_storage(settings.optuna_storage or default_storage(settings.work_root))
        nodes = build_graph(settings, pending, chains)
        totals = {kind: sum(node.kind == kind for node in nodes.values()) for kind in ('stage', 'evaluation')}
        print(f'sweep: {len(pending)} runs to do ({len(jobs) - len(pending)} already recorded), '
              f'{totals["stage"]} distinct stages ({sum(map(len, chains))} without the prefix cache); '
              f'backend: {backend.description}', flush=True)
        outcomes = execute(nodes, backend, Progress(totals))
    finally:
        backend.close()
    failed = [(nodes[name], outcome) for name, outcome in outcomes.items()
              if not outcome.ok and not outcome.skipped_because]
    if not failed:
        return 0
    for node, outcome in failed:
        if outcome.error.details and not outcome.error.user_error:
            print(outcome.error.details, file=sys.stderr)
    skipped = sum(1 for outcome in outcomes.values() if outcome.skipped_because)
    node, outcome = failed[0]
    print(f'error: {len(failed)} node(s) of the sweep failed ({skipped} more not run), first {node.label}: '
          f'{outcome.error}', file=sys.stderr)
    return 2 if all(outcome.error.user_error for _, outcome in failed) else 1


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
    stored_runs = existing_runs(fused_url)
    planned = [(board, labels, [(job, plan, stored_fused_run(job, stored_runs)) for job, plan in jobs])
               for board, labels, jobs in planned]   # each job's stored run, found once
    for _, _, jobs in planned:   # a run to make whose backbones are gone stops everything before any run starts
        for job, _, stored in jobs:
            if stored is None and job['missing'] is not None:
                raise job['missing']
    for board, labels, jobs in planned:
        fused = []
        for job, plan, stored in jobs:
            if stored is None:
                if is_jsonl(fused_url):
                    raise PlanError(f'--fuse-top: {fused_url} is a JSON Lines export; fused runs need a results '
                                    f'store to be recorded in (--fuse-results URL)')
                stored = run_curriculum(plan, job['work_dir'], args.work_root, fused_url, init_path=job['init'],
                                        optuna_storage=args.optuna_storage, progress=None)
            fused.append(stored)
        add_fused_row(board, labels, fused, args.fuse_protocol)


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
            settings = sweep_settings(args, jobs)
            from curriculum.preflight import check_backbone
            from curriculum.sweep import check_backend_settings
            from curriculum.sweep_tasks import job_plan

            check_backend_settings(args.backend, args.workers, args.ray_address, args.cpus_per_stage,
                                   args.gpus_per_stage, args.retries)
            for job in jobs:  # validate every plan (and what its backbone gives its tasks) before any compute
                check_backbone(job_plan(settings, job))
            code = run_sweep(args, jobs, settings)
            if code:
                return code
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
