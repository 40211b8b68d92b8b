#!/usr/bin/env python
"""Run a curriculum of pretext tasks and evaluate the backbone downstream.

    python tools/run_curriculum.py --order odc,moco

Per stage: a short Optuna LR search, then training from the previous stage's backbone (stages are cached by key and
resumable); then downstream protocols (linear / finetune / knn). Writes ``<work-dir>/result.json``, one record in
the results store, and prints a summary table. Bad flags, orders and configs exit with code 2 and one line, before
anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--order', default='odc,moco',
                        help='comma-separated pretext tasks (relloc, rotation, moco, swav, odc); none = no pretraining')
    parser.add_argument('--config', default=None, help='YAML config merged over configs/default.yaml')
    parser.add_argument('--dataset', default=None, help='pretext dataset (default synthetic_derm)')
    parser.add_argument('--data-root', default=None, help='folder (or .npz file) of the pretext dataset')
    parser.add_argument('--downstream', default=None, help='downstream dataset (default: the pretext dataset)')
    parser.add_argument('--downstream-root', default=None, help='data root of the downstream dataset')
    parser.add_argument('--work-dir', default=None, help='run folder (default <work-root>/<order>)')
    parser.add_argument('--work-root', default='work_dirs', help='holds the stage cache, results and Optuna store')
    parser.add_argument('--epochs', type=int, default=None, help='epochs of every stage (overrides the config)')
    parser.add_argument('--lr-trials', type=int, default=None, help='LR-search trials per stage (0 = no search)')
    parser.add_argument('--label-fraction', type=float, default=None, help='fraction of labeled train images')
    parser.add_argument('--protocols', default=None, help='any of linear,finetune,knn')
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default=None)
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--init', default=None, help='start from a local weights file (loaded weights-only)')
    parser.add_argument('--results', default=None, help='results store URL (default sqlite under --work-root)')
    parser.add_argument('--optuna-storage', default=None, help='Optuna storage URL (default sqlite under --work-root)')
    parser.add_argument('--deterministic', action='store_true', help='deterministic kernels (exact resume)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, mmengine style (dotted keys, YAML values)')
    return parser.parse_args(argv)


def cfg_options(pairs: list[str]) -> dict:
    import yaml

    options = {}
    for pair in pairs:
        if '=' not in pair:
            raise ValueError(f'--cfg-options entry {pair!r} is not KEY=VALUE')
        key, value = pair.split('=', 1)
        options[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return options


def overrides(args: argparse.Namespace) -> dict:
    flags = {
        'dataset': args.dataset, 'data_root': args.data_root, 'downstream': args.downstream,
        'downstream_root': args.downstream_root, 'epochs': args.epochs, 'lr_search.trials': args.lr_trials,
        'evaluation.label_fraction': args.label_fraction, 'evaluation.protocols': args.protocols,
        'seed': args.seed, 'device': args.device, 'image_size': args.image_size,
    }
    out = {key: value for key, value in flags.items() if value is not None}
    if args.deterministic:
        out['deterministic'] = True
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''  # before torch initialises CUDA: mmengine places models itself
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from curriculum.cli import fail, print_summary, progress_printer
    from curriculum.errors import USER_ERRORS
    from curriculum.plan import build_plan, load_config
    from curriculum.results import default_results_url

    try:
        options = {**cfg_options(args.cfg_options), **overrides(args)}
        plan = build_plan(args.order, load_config(args.config, options))
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    work_root = args.work_root
    work_dir = args.work_dir or os.path.join(work_root, plan.label)
    results_url = args.results or default_results_url(work_root)
    from curriculum.run import run_curriculum

    try:
        result = run_curriculum(plan, work_dir, work_root, results_url, init_path=args.init,
                                optuna_storage=args.optuna_storage,
                                progress=None if args.quiet else progress_printer())
    except USER_ERRORS as exc:
        return fail(exc)
    print_summary(result, os.path.join(work_dir, 'result.json'))
    return 0


if __name__ == '__main__':
    sys.exit(main())
