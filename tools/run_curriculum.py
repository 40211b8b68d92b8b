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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import add_run_arguments, config_overrides, task_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--order', default='odc,moco',
                        help=f'comma-separated pretext tasks ({", ".join(task_names())}); none = no pretraining')
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--work-dir', default=None, help='run folder (default <work-root>/<order>)')
    parser.add_argument('--init', default=None, help='start from a local weights file (loaded weights-only)')
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''  # before torch initialises CUDA: mmengine places models itself
    from curriculum.cli import fail, print_summary, progress_printer
    from curriculum.errors import USER_ERRORS, PlanError
    from curriculum.plan import build_plan, load_config
    from curriculum.results import default_results_url

    try:
        options = config_overrides(args)
        plan = build_plan(args.order, load_config(args.config, options))
        if args.init and not os.path.isfile(args.init):
            raise PlanError(f'--init weights file not found: {args.init}')
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    work_root = args.work_root
    work_dir = args.work_dir or os.path.join(work_root, plan.label)
    results_url = args.results or default_results_url(work_root)
    from curriculum.distributed import finish, init_from_env
    from curriculum.run import resolve_device, run_curriculum

    # torchrun --nproc_per_node=K: one DDP process group for every stage (gloo on CPU, NCCL on CUDA)
    init_from_env(resolve_device(plan.config['device']))
    from mmengine.dist import get_rank

    try:
        result = run_curriculum(plan, work_dir, work_root, results_url, init_path=args.init,
                                optuna_storage=args.optuna_storage,
                                progress=None if args.quiet or get_rank() != 0 else progress_printer())
    except USER_ERRORS as exc:
        return finish(fail(exc))
    if result is not None:  # rank 0 (or a single process) evaluates, records and reports
        print_summary(result, result.get('result_file') or os.path.join(work_dir, 'result.json'))
    return finish(0)


if __name__ == '__main__':
    sys.exit(main())
