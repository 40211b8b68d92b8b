"""Budget curves: each pretext task trained alone from random initialisation, its kNN monitor read every epoch.

The question they answer: after how many epochs does a task's backbone beat the random initialisation it started
from (kNN balanced accuracy on the validation split, :mod:`curriculum.monitor`), and where does it saturate? That
sets the epochs of a study, and shows which task recipes learn on a dataset at all.

Each (task, seed) is one ordinary single-stage run (:func:`curriculum.run.run_curriculum` with no downstream
protocol), so the stage cache makes the sweep resumable: a finished stage is read back, a killed one resumes from
its last epoch checkpoint. The random-initialisation line is the monitor's epoch 0, which is the same backbone for
every task of a seed.
"""
from __future__ import annotations

import os

import numpy as np

from .cli import provenance_lines
from .stage import write_json_atomic

#: a task "clearly" beats random initialisation at this margin (balanced-accuracy points / 100)
CLEAR_MARGIN = 0.03
#: a curve has saturated at the first epoch within this of its best value
SATURATION_TOLERANCE = 0.01


def curve_of(result: dict) -> dict:
    """``{'epochs', 'knn', 'loss', 'start', 'lr', 'cache_hit', 'train_seconds', 'monitor_seconds'}`` of a
    single-stage run's result (``loss`` is None at epoch 0)."""
    stage = result['stages'][0]
    monitor = stage.get('monitor') or {}
    if not monitor.get('epochs'):
        raise ValueError(f'{stage["task"]}: the stage has no kNN monitor curve (monitor.knn off, or a stage cached '
                         f'before the monitor existed)')
    train_seconds = stage.get('train_seconds')
    losses = {int(entry['epoch']): entry['loss'] for entry in stage.get('history', []) if 'loss' in entry}
    return {'epochs': list(monitor['epochs']), 'knn': list(monitor['knn']), 'start': monitor['start'],
            'loss': [losses.get(int(epoch)) for epoch in monitor['epochs']],
            'lr': stage['lr'], 'cache_hit': stage['cache_hit'],
            'train_seconds': train_seconds, 'monitor_seconds': monitor.get('seconds')}


def _first(epochs, values, predicate):
    for epoch, value in zip(epochs, values):
        if epoch > 0 and predicate(value):
            return epoch
    return None


def summarise(curves: dict[str, dict[int, dict]]) -> dict[str, dict]:
    """Per task, over its seeds: mean curve, random-init mean, best and its epoch, first epoch above random init
    and first epoch ``CLEAR_MARGIN`` above it, saturation epoch, minutes of training per epoch."""
    out = {}
    for task, by_seed in curves.items():
        seeds = sorted(by_seed)
        epochs = by_seed[seeds[0]]['epochs']
        common = [e for e in epochs if all(e in by_seed[s]['epochs'] for s in seeds)]
        matrix = np.array([[by_seed[s]['knn'][by_seed[s]['epochs'].index(e)] for e in common] for s in seeds])
        mean = matrix.mean(axis=0)
        start = float(np.mean([by_seed[s]['start'] for s in seeds]))
        best_index = int(np.argmax(mean))
        # training seconds as recorded when the stage was trained (a cached stage keeps its record)
        trained = [by_seed[s]['train_seconds'] for s in seeds if by_seed[s]['train_seconds']]
        last = max(common) if common else 0
        minutes_per_epoch = float(np.mean(trained)) / 60 / max(1, last) if trained else None
        saturation = _first(common, mean, lambda v: v >= mean[best_index] - SATURATION_TOLERANCE)
        out[task] = {
            'seeds': seeds, 'epochs': common, 'mean_knn': mean.tolist(),
            'std_knn': matrix.std(axis=0, ddof=1).tolist() if len(seeds) > 1 else None,
            'random_init': start, 'best': float(mean[best_index]), 'best_epoch': int(common[best_index]),
            'final': float(mean[-1]), 'gain_at_best': float(mean[best_index] - start),
            'first_epoch_above_random': _first(common, mean, lambda v: v > start),
            'first_epoch_clearly_above_random': _first(common, mean, lambda v: v >= start + CLEAR_MARGIN),
            'saturation_epoch': saturation, 'minutes_per_epoch': minutes_per_epoch,
            'lrs': [by_seed[s]['lr'] for s in seeds],
        }
    return out


def _backbone_text(cfg: dict) -> str:
    """``type key=value ...`` of a backbone config (the type first)."""
    return ' '.join([str(cfg.get('type'))] + [f'{k}={v}' for k, v in cfg.items() if k != 'type'])


def render_markdown(report: dict) -> str:
    s = report['settings']
    lines = [f'# Budget curves: {s["dataset"]} at {s["image_size"]} px, {s["epochs"]} epochs', '',
             *provenance_lines(report),
             *([f'Backbone: `{_backbone_text(s["backbone"])}`  '] if s.get('backbone') else []),
             f'Seeds: {", ".join(str(x) for x in s["seeds"])}; precision {report.get("precision", "-")}; kNN '
             f'(k={s["k"]}) balanced accuracy on the val split, labeled memory of at most {s["max_images"]} train '
             'images; epoch 0 = random initialisation (the same backbone for every task of a seed).', '',
             '| task | random init | best (epoch) | final | gain at best | first epoch above random | '
             f'first epoch ≥ +{CLEAR_MARGIN * 100:.0f} points | saturates at | min / epoch | lr |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for task, row in report['summary'].items():
        minutes = '-' if row['minutes_per_epoch'] is None else f'{row["minutes_per_epoch"]:.2f}'
        lines.append(
            f'| {task} | {row["random_init"]:.3f} | {row["best"]:.3f} ({row["best_epoch"]}) | {row["final"]:.3f} | '
            f'{100 * row["gain_at_best"]:+.1f} | {row["first_epoch_above_random"] or "never"} | '
            f'{row["first_epoch_clearly_above_random"] or "never"} | {row["saturation_epoch"]} | {minutes} | '
            f'{", ".join(f"{lr:.3g}" for lr in row["lrs"])} |')
    lines += ['', 'Mean kNN balanced accuracy per epoch (over seeds):', '',
              '| epoch | ' + ' | '.join(report['summary']) + ' |', '|---|' + '---|' * len(report['summary'])]
    all_epochs = sorted({e for row in report['summary'].values() for e in row['epochs']})
    for epoch in all_epochs:
        cells = []
        for row in report['summary'].values():
            cells.append(f'{row["mean_knn"][row["epochs"].index(epoch)]:.3f}' if epoch in row['epochs'] else '-')
        lines.append(f'| {epoch} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    return '\n'.join(lines)


def render_plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    starts = []
    for task, row in report['summary'].items():
        minutes = '' if row['minutes_per_epoch'] is None else f', {row["minutes_per_epoch"]:.1f} min/epoch'
        axis.plot(row['epochs'], row['mean_knn'], marker='o', markersize=3, label=f'{task}{minutes}')
        if row['std_knn'] is not None:
            mean, std = np.array(row['mean_knn']), np.array(row['std_knn'])
            axis.fill_between(row['epochs'], mean - std, mean + std, alpha=0.15)
        starts.append(row['random_init'])
    if starts:
        axis.axhline(float(np.mean(starts)), color='black', linestyle='--', linewidth=1, label='random init')
    s = report['settings']
    axis.set_xlabel('epoch')
    axis.set_ylabel('kNN balanced accuracy (val)')
    axis.set_title(f'{s["dataset"]}, {s["image_size"]} px, seeds {",".join(str(x) for x in s["seeds"])}')
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(out_dir: str, report: dict) -> list[str]:
    """``budget.json``, ``budget.md``, ``budget.png`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in ('budget.json', 'budget.md', 'budget.png')]
    write_json_atomic(paths[0], report)
    with open(paths[1], 'w') as handle:
        handle.write(render_markdown(report))
    render_plot(report, paths[2])
    return paths
