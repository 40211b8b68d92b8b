#!/usr/bin/env python
"""Unsupervised domain adaptation table: one ordering's backbone adapted by each method over seeds.

    python tools/uda_table.py --config configs/uda/synthetic_cxr-pneumoniamnist.yaml --order none \
        [--seeds 0,1,2] [--methods source_only,dann,dcan,dcan_noreg] [--out DIR] [run_curriculum flags ...]

Each (method, seed) is one engine run with protocol uda (stages from the cache, runs already in the results store
reused); writes <out>/uda.json and uda.md (default docs/uda/<source>-<target>-<size>px) and prints the table.
Bad input exits with code 2 and one line.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import add_run_arguments  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--order', default='none', help='the ordering whose final backbone is adapted')
    parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds')
    parser.add_argument('--init', default=None, help='start from a local weights file (loaded weights-only)')
    parser.add_argument('--methods', default='source_only,dann,dcan,dcan_noreg', help='UDA methods, in table order')
    parser.add_argument('--out', default=None, help='output folder (default docs/uda/<source>-<target>-<size>px)')
    add_run_arguments(parser)
    parser.set_defaults(work_root=os.path.join('work_dirs', 'uda'))
    return parser.parse_args(argv)


def target_stem(uda: dict) -> str:
    """A short name of the target: its data root's file or folder name, else the dataset name."""
    root = uda.get('target_root')
    if root:
        return os.path.splitext(os.path.basename(os.path.normpath(root)))[0]
    return str(uda.get('target'))


def run(args, argv) -> int:
    from curriculum.cli import config_overrides, parse_seeds, report_header
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config
    from curriculum.results import default_results_url, load_runs
    from curriculum.run import run_curriculum
    from curriculum.uda_table import parse_methods, render_markdown, stored_run, summarise, uda_work_dir, \
        write_report

    seeds, methods = parse_seeds(args.seeds), parse_methods(args.methods)
    if args.init and not os.path.isfile(args.init):
        raise PlanError(f'--init weights file not found: {args.init}')
    plans = {}
    for method in methods:   # every plan checked before any compute
        for seed in seeds:
            options = {**config_overrides(args), 'seed': seed, 'evaluation.protocols': ['uda'],
                       'evaluation.uda.method': method}
            plans[method, seed] = build_plan(args.order, load_config(args.config, options))
    results_url = args.results or default_results_url(args.work_root)
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for (method, seed), plan in plans.items():
        result = stored_run(plan, args.init, seed, load_runs(results_url)) if os.path.exists(
            args.work_root) else None
        if result is None:
            print(f'[uda] {plan.label} {method} seed {seed}', flush=True)
            result = run_curriculum(plan, uda_work_dir(args.work_root, plan.label, method, seed), args.work_root,
                                    results_url, init_path=args.init, optuna_storage=args.optuna_storage)
        runs[method].append(result)
    first = next(iter(runs.values()))[0]
    config, metrics = first['config'], first['downstream']['uda']
    uda = config['evaluation']['uda']
    report = {**report_header('uda_table', argv),
              'settings': {'order': plans[methods[0], seeds[0]].label, 'source': first['downstream_dataset'],
                           'target': f'{uda["target"]} ({target_stem(uda)})', 'image_size': first['image_size'],
                           'seeds': seeds, 'methods': methods, 'class_map': metrics['class_map'],
                           'classes': metrics['classes'], 'left_out': sorted(metrics['left_out']['source_train']),
                           'selection': metrics['selection'], 'steps': metrics['steps'], 'config': config},
              'methods': summarise(runs)}
    out_dir = args.out or os.path.join('docs', 'uda', f'{first["downstream_dataset"]}-{target_stem(uda)}-'
                                                      f'{first["image_size"]}px')
    for path in write_report(out_dir, report):
        print(f'written: {path}')
    print(render_markdown(report))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS

    try:
        return run(args, argv)
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)


if __name__ == '__main__':
    sys.exit(main())
