#!/usr/bin/env python
"""Budget curves: kNN on val vs epoch of each pretext task trained alone from random initialisation.

    python tools/budget.py --tasks relloc,rotation,moco,swav,odc --dataset ham10000 \
        --data-root ../shared/data/ham10000 --image-size 32 --epochs 20 [--seeds 0,1] [--out DIR]

Each task runs with its recipe (configs/tasks/<task>.yaml; no LR search unless --lr-trials is given) for
``--epochs`` epochs, its kNN monitor read at epoch 0 and after every epoch. Writes ``budget.json``, ``budget.md``
and ``budget.png`` to ``--out`` (default ``docs/budget/<dataset>-<size>px``): when each task first beats random
initialisation, by how much, where it saturates, and its cost in minutes. Stages are cached under
``--work-root`` (default ``work_dirs/budget``), so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import add_run_arguments, config_overrides, report_header, study_inputs, task_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--tasks', default=','.join(task_names()), help='comma-separated pretext tasks')
    parser.add_argument('--seeds', default='0', help='comma-separated seeds')
    parser.add_argument('--out', default=None, help='output folder (default docs/budget/<dataset>-<size>px)')
    add_run_arguments(parser)
    parser.set_defaults(work_root=os.path.join('work_dirs', 'budget'))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS
    from curriculum.plan import build_plan, load_config

    try:
        tasks, seeds = study_inputs(args, 'every curve')
        options = config_overrides(args)
        options.setdefault('lr_search.trials', 0)
        options.update({'evaluation.protocols': [], 'monitor.knn': True})
        plans = {(task, seed): build_plan(task, load_config(args.config, {**options, 'seed': seed}))
                 for seed in seeds for task in tasks}
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    from curriculum import budget
    from curriculum.results import default_results_url
    from curriculum.run import run_curriculum
    config = next(iter(plans.values())).config
    out_dir = args.out or os.path.join('docs', 'budget', f'{config["dataset"]}-{config["image_size"]}px')
    results_url = args.results or default_results_url(args.work_root)
    curves: dict[str, dict[int, dict]] = {}
    precision = None
    try:
        for (task, seed), plan in plans.items():
            work_dir = os.path.join(args.work_root, 'runs', f'{task}-seed{seed}-amp_{plan.config.get("amp")}')
            result = run_curriculum(plan, work_dir, args.work_root, results_url,
                                    optuna_storage=args.optuna_storage)
            curve = budget.curve_of(result)
            curves.setdefault(task, {})[seed] = curve
            precision = result['precision']['used']
            print(f'{task} seed {seed}: kNN ' + ' '.join(f'{e}:{v:.3f}' for e, v in zip(curve['epochs'],
                                                                                      curve['knn'])), flush=True)
    except USER_ERRORS as exc:
        return fail(exc)
    report = {
        **report_header('budget', argv),
        'precision': precision,
        'settings': {'dataset': config['dataset'], 'data_root': config.get('data_root'),
                     'image_size': config['image_size'], 'epochs': int(args.epochs), 'seeds': seeds, 'tasks': tasks,
                     'k': config['monitor'].get('k', 20), 'max_images': config['monitor'].get('max_images', 1000),
                     'lr_trials': config['lr_search'].get('trials', 0)},
        'curves': {task: {str(seed): curve for seed, curve in by_seed.items()} for task, by_seed in curves.items()},
        'summary': budget.summarise(curves),
    }
    for path in budget.write_report(out_dir, report):
        print(f'written: {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
