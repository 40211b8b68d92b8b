"""Does the LR search pick a good learning rate? Full stages at fixed LRs beside the searched one.

For a task, the check trains complete stages (from the seed's random initialisation, as the budget curves do) at
the low end, the geometric middle and the high end of the task's ``lr_range``, and one stage whose LR the search
chose, each over several seeds, and evaluates every backbone with the downstream kNN protocol (test split). The
searched LR passes when its mean downstream kNN is within the seed spread of the best fixed LR's mean.

The same runs answer how long an LR trial must be: each stage's kNN monitor curve (val split, every epoch) shows at
which epoch the fixed LRs' curves separate by more than the seed-to-seed differences of one LR; a trial shorter
than that cannot rank learning rates (:func:`separation`).
"""
from __future__ import annotations

import math
import os

import numpy as np

from .cli import provenance_lines
from .stage import write_json_atomic

#: the fixed points of the check, as positions in the log range: low end, geometric middle, high end
POINTS = (('low', 0.0), ('middle', 0.5), ('high', 1.0))
SEARCHED = 'searched'


def fixed_lrs(lr_range) -> dict[str, float]:
    """``{'low': a, 'middle': sqrt(a*b), 'high': b}`` of ``lr_range = [a, b]``."""
    low, high = (float(v) for v in lr_range)
    return {name: float(math.exp(math.log(low) + t * (math.log(high) - math.log(low)))) for name, t in POINTS}


def run_record(result: dict) -> dict:
    """What the check keeps of one single-stage run: its LR, downstream kNN, monitor curve and LR-search record."""
    stage = result['stages'][0]
    monitor = stage.get('monitor') or {}
    knn = (result.get('downstream') or {}).get('knn') or {}
    search = stage.get('lr_search') or {}
    return {'lr': float(stage['lr']), 'downstream_knn': knn.get('balanced_accuracy'),
            'epochs': list(monitor.get('epochs') or []), 'knn': list(monitor.get('knn') or []),
            'train_seconds': stage.get('train_seconds'), 'lr_search_seconds': stage.get('lr_search_seconds'),
            'lr_search': {key: search.get(key) for key in ('trials', 'spread', 'noise', 'discriminates',
                                                           'iterations_per_trial', 'objective')}
            if search.get('searched') else None}


def _spread(values: list[float]) -> float:
    return float(max(values) - min(values)) if len(values) > 1 else 0.0


def separation(fixed: dict[str, dict[int, dict]], margin: float = 2.0) -> dict:
    """Per monitor epoch: the spread between the fixed LRs' seed-mean kNN and the mean seed-to-seed spread of one
    LR; ``first_epoch`` is the first epoch where the LR spread exceeds ``margin`` times that noise (None: never, or
    one seed only)."""
    names = [name for name in fixed if fixed[name]]
    seeds = sorted(set.intersection(*(set(fixed[name]) for name in names))) if names else []
    epochs = sorted(set.intersection(*(set(fixed[name][s]['epochs']) for name in names for s in seeds))) \
        if seeds else []
    rows = []
    first = None
    for epoch in epochs:
        if epoch == 0:
            continue
        per_lr = {name: [fixed[name][s]['knn'][fixed[name][s]['epochs'].index(epoch)] for s in seeds]
                  for name in names}
        lr_spread = _spread([float(np.mean(v)) for v in per_lr.values()])
        noise = float(np.mean([_spread(v) for v in per_lr.values()])) if len(seeds) > 1 else None
        rows.append({'epoch': epoch, 'lr_spread': lr_spread, 'seed_noise': noise})
        if first is None and noise is not None and lr_spread > margin * noise:
            first = epoch
    return {'margin': margin, 'first_epoch': first, 'per_epoch': rows}


def summarise(runs: dict[str, dict[str, dict[int, dict]]]) -> dict:
    """``runs[task][label][seed]`` → per task: each label's mean/seed values of downstream kNN, the best fixed LR,
    its seed spread, the verdict for the searched LR, the search's own spread/noise, and the separation epoch."""
    out = {}
    for task, by_label in runs.items():
        rows = {}
        for label, by_seed in by_label.items():
            values = [r['downstream_knn'] for r in by_seed.values() if r['downstream_knn'] is not None]
            rows[label] = {'lrs': [by_seed[s]['lr'] for s in sorted(by_seed)], 'seeds': sorted(by_seed),
                           'downstream_knn': values, 'mean': float(np.mean(values)) if values else None,
                           'seed_spread': _spread(values)}
        fixed = {label: row for label, row in rows.items() if label != SEARCHED and row['mean'] is not None}
        verdict = None
        if fixed and rows.get(SEARCHED, {}).get('mean') is not None:
            best = max(fixed, key=lambda label: fixed[label]['mean'])
            gap = fixed[best]['mean'] - rows[SEARCHED]['mean']
            verdict = {'best_fixed': best, 'best_mean': fixed[best]['mean'], 'best_seed_spread':
                       fixed[best]['seed_spread'], 'searched_mean': rows[SEARCHED]['mean'], 'gap': float(gap),
                       'passes': bool(gap <= fixed[best]['seed_spread'])}
        searches = [r['lr_search'] for r in by_label.get(SEARCHED, {}).values() if r.get('lr_search')]
        out[task] = {'rows': rows, 'verdict': verdict, 'searches': searches,
                     'separation': separation({label: by_label[label] for label in by_label if label != SEARCHED})}
    return out


def render_markdown(report: dict) -> str:
    s = report['settings']
    lines = [f'# LR-search check: {s["dataset"]} at {s["image_size"]} px, {s["epochs"]} epochs per stage', '',
             *provenance_lines(report),
             f'Seeds: {", ".join(str(x) for x in s["seeds"])}; every stage from the seed\'s random initialisation; '
             'downstream kNN (k=20) balanced accuracy on the test split. The searched LR passes when its mean is '
             'within the seed spread (max − min) of the best fixed LR\'s mean.', '']
    for task, summary in report['summary'].items():
        lines += [f'## {task}', '', '| LR | lr | downstream kNN per seed | mean | seed spread |', '|---|---|---|---|---|']
        for label, row in summary['rows'].items():
            mean = '-' if row['mean'] is None else f'{row["mean"]:.3f}'
            lines.append(f'| {label} | {", ".join(f"{lr:.3g}" for lr in row["lrs"])} | '
                         f'{", ".join(f"{v:.3f}" for v in row["downstream_knn"])} | {mean} | '
                         f'{row["seed_spread"]:.3f} |')
        verdict = summary['verdict']
        if verdict:
            lines += ['', f'Best fixed LR: {verdict["best_fixed"]} ({verdict["best_mean"]:.3f}, seed spread '
                          f'{verdict["best_seed_spread"]:.3f}); searched {verdict["searched_mean"]:.3f}: gap '
                          f'{verdict["gap"]:+.3f} → **{"passes" if verdict["passes"] else "fails"}**.']
        for search in summary['searches']:
            spread = '-' if search.get('spread') is None else f'{search["spread"]:.4f}'
            noise = '-' if search.get('noise') is None else f'{search["noise"]:.4f}'
            lines.append(f'- search: {len(search.get("trials") or [])} trials of {search.get("iterations_per_trial")} '
                         f'iterations, objective {search.get("objective")}: trial spread {spread} vs noise {noise} '
                         f'(discriminates: {search.get("discriminates")}); trials '
                         + ', '.join(f'{t["lr"]:.3g}→{t["score"]:.3f}' for t in search.get('trials') or []
                                     if t.get('score') is not None))
        sep = summary['separation']
        lines += ['', f'Monitor curves (val kNN): the fixed LRs separate by more than {sep["margin"]:g}× the '
                      f'seed-to-seed noise first at epoch **{sep["first_epoch"] or "never"}**.', '',
                  '| epoch | spread between LRs | seed noise |', '|---|---|---|']
        for row in sep['per_epoch']:
            noise = '-' if row['seed_noise'] is None else f'{row["seed_noise"]:.3f}'
            lines.append(f'| {row["epoch"]} | {row["lr_spread"]:.3f} | {noise} |')
        lines.append('')
    return '\n'.join(lines)


def write_report(out_dir: str, report: dict) -> list[str]:
    """``lr_check.json`` and ``lr_check.md`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, 'lr_check.json'), os.path.join(out_dir, 'lr_check.md')]
    write_json_atomic(paths[0], report)
    with open(paths[1], 'w') as handle:
        handle.write(render_markdown(report))
    return paths
