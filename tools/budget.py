#!/usr/bin/env python
"""Budget curves: kNN on val vs epoch of each pretext task trained alone from random initialisation.

    python tools/budget.py --tasks relloc,rotation,moco,swav,odc --dataset ham10000 \
        --data-root ../shared/data/ham10000 --image-size 32 --epochs 20 [--seeds 0,1] [--out DIR]

Each task runs with its recipe (configs/tasks/<task>.yaml; no LR search unless --lr-trials is given) for
``--epochs`` epochs, its kNN monitor read at epoch 0 and after every epoch. Writes ``budget.json``, ``budget.md``
and ``budget.png`` to ``--out`` (default ``docs/budget/<dataset>-<size>px``): when each task first beats random
initialisation, by how much, where it saturates, and its cost in minutes. Stages are cached under
``--work-root`` (default ``work_dirs/budget``), so an interrupted sweep resumes where it stopped.

``--protocols linear,knn`` also evaluates each curve's final backbone and each seed's random initialisation on the
test split (balanced accuracy with a 95 % interval). ``--beside DIR [DIR ...]`` shows another budget report's
curves (e.g. MoCo on a ResNet-18 beside DINO on a ViT-tiny) in the tables and against training minutes.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import report_header, study_parser, study_setup, task_names  # noqa: E402


def default_tasks() -> list[str]:
    """Every registered task that runs on the default backbone: a task that reads a vision transformer's patch
    tokens (ibot) is curved only when named in --tasks, with a ViT backbone."""
    from pretext_tasks.registry import TASKS

    return [task for task in task_names() if not getattr(TASKS[task], 'needs_patch_tokens', False)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = study_parser(__doc__.split('\n\n')[0], 'budget', tasks=','.join(default_tasks()), seeds='0',
                          seeds_help='comma-separated seeds')
    parser.add_argument('--beside', nargs='+', default=None, metavar='DIR',
                        help='budget reports (folders holding budget.json) whose curves are shown beside these')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS
    from curriculum import budget
    from curriculum.plan import NO_PRETRAINING, build_plan, load_config

    # without --protocols a curve runs no downstream protocol; with them, the random initialisations run them too
    fixed = {'monitor.knn': True, **({} if args.protocols else {'evaluation.protocols': []})}
    try:
        study = study_setup(args, 'budget', 'every curve', fixed=fixed, defaults={'lr_search.trials': 0})
        configs = {seed: load_config(args.config, {**study.options, 'seed': seed}) for seed in study.seeds}
        plans = {(task, seed): build_plan(task, configs[seed]) for seed in study.seeds for task in study.tasks}
        random_inits = {seed: build_plan(NO_PRETRAINING, configs[seed]) for seed in study.seeds} \
            if args.protocols else {}
        beside = budget.read_beside(args.beside, study.config['dataset'])
        from curriculum.preflight import check_backbone

        for plan in plans.values():   # every task can use the backbone, before any compute
            check_backbone(plan)
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    config = study.config
    curves: dict[str, dict[int, dict]] = {}
    random_init_downstream: dict[int, dict] = {}
    precision = None
    try:
        for seed, plan in random_inits.items():
            random_init_downstream[seed] = budget.downstream_of(study.run(plan, f'{NO_PRETRAINING}-seed{seed}'))
        for (task, seed), plan in plans.items():
            result = study.run(plan, f'{task}-seed{seed}')
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
        'settings': study.settings(k=config['monitor'].get('k', 20),
                                   max_images=config['monitor'].get('max_images', 1000),
                                   lr_trials=config['lr_search'].get('trials', 0),
                                   backbone=dict(config['backbone']),
                                   protocols=list(config['evaluation'].get('protocols') or []),
                                   label_fraction=float(config['evaluation'].get('label_fraction', 1.0))),
        'curves': {task: {str(seed): curve for seed, curve in by_seed.items()} for task, by_seed in curves.items()},
        'summary': budget.summarise(curves),
        'random_init_downstream': budget.summarise_downstream(random_init_downstream),
        'beside': beside,
    }
    return study.write(budget.write_report, report)


if __name__ == '__main__':
    sys.exit(main())
