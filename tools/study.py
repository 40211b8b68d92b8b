#!/usr/bin/env python
"""Run a study of orderings on real data and publish it as ``docs/results.md``.

    python tools/study.py run configs/experiments/ham10000.yaml [--work-root work_dirs/study] [--workers N]
    python tools/study.py export configs/experiments/ham10000.yaml [--work-root work_dirs/study]
    python tools/study.py render [--out docs/results.md]
    python tools/study.py external configs/experiments/ham10000.yaml --dataset isic2019 --data-root PATH
        [--work-root work_dirs/study] [--label-fractions 1,0.1] [--device auto|cpu|cuda]

An experiment file is a run config (usable as ``tools/run_curriculum.py --config FILE``) with a ``study:`` section:
``name``, ``orders`` (the orderings), ``seeds``, ``label_fractions`` and ``baselines``. ``run`` runs every cell that
is not stored yet through ``tools/leaderboard.py`` (one sweep over every label fraction: prefix cache, resumable,
any number of workers) and while it runs exports the experiment's finished runs every few minutes (``export`` does
only that, e.g. after an interruption), compacted, to ``docs/results/<name>.jsonl``. Those exports are the
study's stored results: ``run`` first loads them into the results store, so a study interrupted on one machine
continues on another without redoing finished runs; ``render`` rebuilds ``docs/results.md`` from them alone, in
seconds. ``external`` applies the fine-tuned models of the cells the report compares (from scratch, the best single
task and the best multi-task ordering, chosen on val, every seed) to another dataset whose classes map by name, with
``tools/evaluate.py``'s scoring; its records go to ``docs/results/external/<name>.<dataset>.jsonl``
(:mod:`curriculum.external_study`).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS_DIR = os.path.join(ROOT, 'docs', 'results')
REPORT = os.path.join(ROOT, 'docs', 'results.md')


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be a positive number of seconds, got {text!r}')
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='run (or continue) one experiment')
    run.add_argument('experiment', help='configs/experiments/<name>.yaml')
    run.add_argument('--work-root', default=os.path.join('work_dirs', 'study'))
    run.add_argument('--workers', type=int, default=1)
    run.add_argument('--results-dir', default=RESULTS_DIR, help='where the compact exports live')
    run.add_argument('--label-fractions', default=None, help='only these label fractions (comma-separated)')
    run.add_argument('--seeds', default=None, help='only these seeds (comma-separated)')
    run.add_argument('--orders', nargs='+', default=None, metavar='ORDER',
                     help="only these of the study's orderings (each comma-separated, e.g. --orders swav "
                          "relloc,moco), e.g. to run every seed's single tasks before the longer orderings; "
                          "the study's baselines always run")
    run.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default=None)
    run.add_argument('--export-every', type=positive_seconds, default=300.0, metavar='SECONDS',
                     help='also export finished runs this often while a label fraction is running (default 300), '
                          'so that a machine lost mid-fraction loses only its unfinished runs')
    export = sub.add_parser('export', help='export the stored runs of one experiment (no training)')
    export.add_argument('experiment', help='configs/experiments/<name>.yaml')
    export.add_argument('--work-root', default=os.path.join('work_dirs', 'study'))
    export.add_argument('--results-dir', default=RESULTS_DIR)
    render = sub.add_parser('render', help='rebuild docs/results.md from the compact exports')
    render.add_argument('--results-dir', default=RESULTS_DIR)
    render.add_argument('--out', default=REPORT)
    external = sub.add_parser(
        'external', help='score the fine-tuned models of the compared cells on another dataset',
        description='Apply the fine-tuned models of the cells a study compares (from scratch, best single task, '
                    'best multi-task ordering; chosen on val under the finetune protocol; every seed) to another '
                    'dataset whose classes map onto the run\'s by name (tools/evaluate.py). Writes '
                    'external-<dataset>.json in each run folder and the records '
                    '<results-dir>/external/<study>.<dataset>.jsonl; a seed whose run folder or model is missing, '
                    'or holds another run, is skipped with the reason.')
    external.add_argument('experiment', help='configs/experiments/<name>.yaml')
    external.add_argument('--dataset', required=True, help='layout name of the dataset to score (e.g. isic2019)')
    external.add_argument('--data-root', default=None, help='its data root (not needed by the built-in datasets)')
    external.add_argument('--work-root', default=os.path.join('work_dirs', 'study'),
                          help='the study\'s work root (its run folders are <work-root>/sweeps/...)')
    external.add_argument('--results-dir', default=RESULTS_DIR, help='where the compact exports live')
    external.add_argument('--label-fractions', default=None, help='only these label fractions (comma-separated)')
    external.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default=None)
    return parser.parse_args(argv)


def export_experiment(name: str, results_url: str, export: str, quiet_when_unchanged: bool = False) -> int:
    """Write the store's runs of study ``name`` (merged with those already exported) to ``export``."""
    from curriculum.results import export_runs, load_runs, read_jsonl

    runs = read_jsonl(export) if os.path.exists(export) else []
    before = len(runs)
    runs += [r for r in load_runs(results_url) if ((r.get('config') or {}).get('study') or {}).get('name') == name]
    if not runs:
        return 0  # nothing finished yet: no empty file beside the real exports
    count = export_runs(runs, export)
    if count != before or not quiet_when_unchanged:
        print(f'[study] {name}: {count} run(s) exported to {export}', flush=True)
    return count


def call_exporting(argv: list[str], export, every: float) -> int:
    """Run ``argv`` to its end, calling ``export()`` every ``every`` seconds while it runs and once after it; returns
    its exit code. A study runs for many hours: exporting only at its end lost every finished run of a machine
    that went away mid-study (it happened: 13 runs). ``export`` merges into the compact file, so each call only
    adds. A failed periodic export is reported and retried at the next period; it never stops the runs."""
    process = subprocess.Popen(argv)
    # a plain `kill` (SIGTERM) of this process would otherwise leave the sweep running on without it
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        while True:
            try:
                code = process.wait(timeout=every)
                break
            except subprocess.TimeoutExpired:
                try:
                    export()
                except Exception as error:  # noqa: BLE001 - a store being written may fail to read once
                    print(f'[study] periodic export failed, retried in {every:g} s: {error}', flush=True)
    except BaseException:
        process.terminate()
        process.wait()
        export()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    export()
    return code


def select_orders(orders: list[tuple[str, ...]], wanted: list[str] | None) -> list[tuple[str, ...]]:
    """The study's orderings named by ``--orders`` (all when None), in the order given, each once; a ValueError
    naming the first that is not one of them."""
    if wanted is None:
        return list(orders)
    picked = []
    for text in wanted:
        order = tuple(part.strip() for part in text.split(',') if part.strip())
        if order not in orders:
            raise ValueError(f"--orders: {text!r} is not one of the study's orderings "
                             f"({'; '.join(','.join(known) for known in orders)})")
        if order not in picked:
            picked.append(order)
    return picked


def sweep_argv(experiment, args, fractions: list[float], seeds: list[int], orders: list) -> list[str]:
    """The ``tools/leaderboard.py`` command that runs the study's cells."""
    study = experiment.study
    argv = [sys.executable, os.path.join(ROOT, 'tools', 'leaderboard.py'), '--config', experiment.path,
            '--orders', *[','.join(order) for order in orders],
            '--seeds', ','.join(str(s) for s in seeds), '--baselines', ','.join(study.baselines) or 'none',
            '--label-fractions', ','.join(f'{fraction:g}' for fraction in fractions),
            '--work-root', args.work_root, '--workers', str(args.workers),
            '--out', os.path.join(args.work_root, 'leaderboards', study.name), '--quiet']
    if args.device:
        argv += ['--device', args.device]
    return argv


def run_experiment(args) -> int:
    from curriculum.cli import parse_fractions, parse_seeds
    from curriculum.report import load_experiment
    from curriculum.results import default_results_url, import_runs, read_jsonl

    experiment = load_experiment(args.experiment)
    study = experiment.study
    fractions = parse_fractions(args.label_fractions) or study.label_fractions   # before anything is written
    seeds = parse_seeds(args.seeds) if args.seeds else study.seeds
    orders = select_orders(study.orders, args.orders)
    export = os.path.join(args.results_dir, f'{study.name}.jsonl')
    results_url = default_results_url(args.work_root)
    os.makedirs(args.work_root, exist_ok=True)
    if os.path.exists(export):
        added = import_runs(results_url, read_jsonl(export))
        if added:
            print(f'[study] {study.name}: {added} stored run(s) loaded from {export}', flush=True)
    # one sweep over every label fraction: a run's stages are evaluated at each fraction as soon as they are
    # trained, so that a machine lost mid-study loses no trained stage whose evaluations are still to come
    # (one sweep per fraction trained every stage at 100 % labels first and evaluated the other fractions hours
    # later, from stages that a replaced machine no longer had)
    argv = sweep_argv(experiment, args, fractions, seeds, orders)
    print(f'[study] {study.name}: label fractions {", ".join(f"{f:g}" for f in fractions)}, {len(orders)} '
          f'orderings + {len(study.baselines)} baseline(s), seeds {seeds}', flush=True)
    return call_exporting(argv, lambda: export_experiment(study.name, results_url, export, True), args.export_every)


def evaluate_tool():
    """``tools/evaluate.py`` as a module (a script beside this one, not a package member)."""
    import importlib.util

    name = '_study_evaluate_tool'
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', 'evaluate.py'))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def external_experiment(args) -> int:
    """Score the compared cells of one experiment on ``args.dataset`` (see :mod:`curriculum.external_study`)."""
    from benchmarks.datasets.registry import get_loader
    from curriculum.cli import parse_fractions
    from curriculum.errors import PlanError
    from curriculum.external_study import output_name, run_external
    from curriculum.report import load_experiment
    from curriculum.results import read_jsonl

    study = load_experiment(args.experiment).study
    export = os.path.join(args.results_dir, f'{study.name}.jsonl')
    if not os.path.isfile(export):
        raise PlanError(f'no stored runs of study {study.name}: {export} not found (run python tools/study.py run '
                        f'{args.experiment} first, or give --results-dir)')
    fractions = parse_fractions(args.label_fractions)
    get_loader(args.dataset)
    if args.data_root is not None and not os.path.exists(args.data_root):
        raise PlanError(f'data root not found: {args.data_root}')
    runs = read_jsonl(export)
    if not runs:
        raise PlanError(f'no stored runs of study {study.name} in {export}')
    tool = evaluate_tool()

    def score(work_dir: str) -> dict:
        argv = ['--work-dir', work_dir, '--dataset', args.dataset, '--out', os.path.join(work_dir, output_name(
            args.dataset)), '--device', args.device or 'auto']
        if args.data_root is not None:
            argv += ['--data-root', args.data_root]
        report, _ = tool.evaluate(tool.parse_args(argv))
        return report

    run_external(runs, study.name, args.dataset, args.data_root, args.work_root, args.results_dir, score,
                 fractions, log=lambda line: print(line, flush=True))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if getattr(args, 'device', None) == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS

    try:
        if args.command == 'run':
            return run_experiment(args)
        if args.command == 'export':
            from curriculum.report import load_experiment
            from curriculum.results import default_results_url

            name = load_experiment(args.experiment).study.name
            export_experiment(name, default_results_url(args.work_root),
                              os.path.join(args.results_dir, f'{name}.jsonl'))
            return 0
        if args.command == 'external':
            return external_experiment(args)
        from curriculum.report import render_report

        out_dir = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(out_dir, exist_ok=True)
        text = render_report(args.results_dir, out_dir, os.path.join(out_dir, 'results_discussion.md'),
                             os.path.join(ROOT, 'configs', 'experiments'))
        with open(args.out + '.tmp', 'w') as handle:
            handle.write(text)
        os.replace(args.out + '.tmp', args.out)
        print(f'written: {args.out}')
        return 0
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)


if __name__ == '__main__':
    sys.exit(main())
