#!/usr/bin/env python
"""Check the LR search: full stages at the ends and middle of each task's LR range beside the searched LR.

    python tools/lr_check.py --tasks moco,odc --dataset ham10000 --data-root ../shared/data/ham10000 \
        --image-size 32 --epochs 20 --seeds 0,1 [--lr-trials 3] [--out DIR]

For every task and seed: one stage at the low end, the geometric middle and the high end of the task's
``lr_range`` (no search), and one stage whose LR the search chose (``--lr-trials``, default the config's), each from
the seed's random initialisation, evaluated with the downstream kNN protocol. Writes ``lr_check.json`` and
``lr_check.md`` to ``--out`` (default ``docs/lr_check/<dataset>-<size>px``): whether the searched LR reaches the best
fixed LR within its seed spread, the search's trial spread against its noise, and from which epoch the fixed LRs'
monitor curves separate (how long a trial must be). Stages are cached under ``--work-root`` (default
``work_dirs/lr_check``): an interrupted check resumes.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.cli import report_header, study_parser, study_setup  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = study_parser(__doc__.split('\n\n')[0], 'lr_check', tasks='moco,odc', seeds='0,1',
                          seeds_help='comma-separated seeds (two or more give a seed spread)')
    parser.add_argument('--fixed-only', action='store_true',
                        help='only the fixed-LR stages (their curves show how long a trial must be); no verdict')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from curriculum.cli import fail
    from curriculum.errors import USER_ERRORS, PlanError
    from curriculum.plan import build_plan, load_config

    try:
        study = study_setup(args, 'lr_check', 'every stage of the check',
                            fixed={'evaluation.protocols': ['knn'], 'monitor.knn': True})
        options, base = study.options, study.config
        trials = int(base['lr_search'].get('trials', 0))
        if trials < 2 and not args.fixed_only:
            raise PlanError(f'the check needs an LR search of at least 2 trials, got lr_search.trials={trials}')
        from curriculum import lr_check

        # every fixed-LR stage first (their monitor curves say how long a trial must be), then the searched ones
        plans = {}
        for task in study.tasks:
            recipe = build_plan(task, base).stages[0].cfg
            for label, lr in lr_check.fixed_lrs(recipe['lr_range']).items():
                for seed in study.seeds:
                    plans[task, label, seed] = build_plan(task, load_config(args.config, {
                        **options, 'seed': seed, 'lr_search.trials': 0, f'tasks.{task}.lr': lr}))
        for task in study.tasks if not args.fixed_only else []:
            for seed in study.seeds:
                plans[task, lr_check.SEARCHED, seed] = build_plan(task, load_config(args.config,
                                                                                    {**options, 'seed': seed}))
        from curriculum.preflight import check_backbone

        for plan in plans.values():   # every task can use the backbone, before any compute
            check_backbone(plan)
    except (ValueError, *USER_ERRORS) as exc:
        return fail(exc)
    runs: dict = {}
    precision = None
    try:
        for (task, label, seed), plan in plans.items():
            result = study.run(plan, f'{task}-{label}-seed{seed}')
            record = lr_check.run_record(result)
            runs.setdefault(task, {}).setdefault(label, {})[seed] = record
            precision = result['precision']['used']
            print(f'{task} {label} lr {record["lr"]:.3g} seed {seed}: downstream kNN {record["downstream_knn"]:.3f}',
                  flush=True)
    except USER_ERRORS as exc:
        return fail(exc)
    report = {
        **report_header('lr_check', argv),
        'precision': precision,
        'settings': study.settings(lr_search=base['lr_search']),
        'runs': {task: {label: {str(seed): record for seed, record in by_seed.items()}
                        for label, by_seed in by_label.items()} for task, by_label in runs.items()},
        'summary': lr_check.summarise(runs),
    }
    return study.write(lr_check.write_report, report)


if __name__ == '__main__':
    sys.exit(main())
