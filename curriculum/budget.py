"""Budget curves: each pretext task trained alone from random initialisation, its kNN monitor read every epoch.

The question they answer: after how many epochs does a task's backbone beat the random initialisation it started
from (kNN balanced accuracy on the validation split, :mod:`curriculum.monitor`), and where does it saturate? That
sets the epochs of a study, and shows which task recipes learn on a dataset at all.

Each (task, seed) is one ordinary single-stage run (:func:`curriculum.run.run_curriculum`), so the stage cache
makes the sweep resumable: a finished stage is read back, a killed one resumes from its last epoch checkpoint. The
random-initialisation line is the monitor's epoch 0, which is the same backbone for every task of a seed. With
downstream protocols (``--protocols linear,knn``) each curve's final backbone, and each seed's random
initialisation, is also evaluated on the test split (balanced accuracy with its CI). Curves of another budget report
(another backbone, ``--beside DIR``) are shown beside this report's on an axis of training minutes, the way to
compare methods whose epochs cost very different amounts.
"""
from __future__ import annotations

import os

import numpy as np

from benchmarks.metrics import mean_t_interval, percent_with_ci

from .cli import provenance_lines
from .errors import PlanError
from .stage import write_json_atomic

#: a task "clearly" beats random initialisation at this margin (balanced-accuracy points / 100)
CLEAR_MARGIN = 0.03
#: a curve has saturated at the first epoch within this of its best value
SATURATION_TOLERANCE = 0.01


def downstream_of(result: dict) -> dict:
    """``{protocol: {'balanced_accuracy', 'balanced_accuracy_ci', 'seconds'}}`` of a run's downstream results (empty
    when it ran no protocol)."""
    return {protocol: {'balanced_accuracy': metrics.get('balanced_accuracy'),
                       'balanced_accuracy_ci': metrics.get('balanced_accuracy_ci'),
                       'seconds': metrics.get('seconds')}
            for protocol, metrics in (result.get('downstream') or {}).items()}


def curve_of(result: dict) -> dict:
    """``{'epochs', 'knn', 'loss', 'start', 'lr', 'cache_hit', 'train_seconds', 'monitor_seconds', 'downstream'}`` of
    a single-stage run's result (``loss`` is None at epoch 0; ``downstream`` as :func:`downstream_of`)."""
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
            'train_seconds': train_seconds, 'monitor_seconds': monitor.get('seconds'),
            'downstream': downstream_of(result)}


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
            'downstream': summarise_downstream({s: by_seed[s].get('downstream') or {} for s in seeds}),
        }
    return out


def summarise_downstream(by_seed: dict[int, dict]) -> dict[str, dict]:
    """Per protocol, over the seeds that ran it: the mean test balanced accuracy and its 95 % interval (one seed:
    the bootstrap interval over test images; several: Student's t over seeds), the per-seed values and the mean
    seconds the protocol took."""
    out = {}
    protocols = sorted({protocol for results in by_seed.values() for protocol in results})
    for protocol in protocols:
        runs = [by_seed[seed][protocol] for seed in sorted(by_seed) if protocol in by_seed[seed]]
        values = [run['balanced_accuracy'] for run in runs]
        if len(runs) == 1:
            low, high = runs[0].get('balanced_accuracy_ci') or (None, None)
            mean, interval = values[0], 'bootstrap over test images'
        else:
            mean, low, high = mean_t_interval(values)
            interval = 't over seeds'
        seconds = [run['seconds'] for run in runs if run.get('seconds') is not None]
        out[protocol] = {'mean': mean, 'low': low, 'high': high, 'interval': interval, 'per_seed': values,
                         'seconds': float(np.mean(seconds)) if seconds else None}
    return out


def backbone_label(cfg: dict | None) -> str:
    """A short name of a backbone config: ``ResNet-18``, ``ResNet-18 (width 16)``, ``VisionTransformer deit-tiny/8``
    (arch / patch size)."""
    cfg = cfg or {}
    kind = str(cfg.get('type', 'ResNet'))
    if 'depth' in cfg:   # a narrowed ResNet says its width
        width = cfg.get('base_channels', 64)
        return f'{kind}-{cfg["depth"]}' + ('' if width == 64 else f' (width {width})')
    detail = '/'.join(str(cfg[key]) for key in ('arch', 'patch_size') if key in cfg)
    return f'{kind} {detail}'.strip()


def read_beside(paths: list[str] | None, dataset: str) -> list[dict]:
    """The budget reports named by ``--beside`` (a folder holding ``budget.json``, or the file), each as
    ``{'source', 'backbone', 'summary', 'random_init_downstream'}``; a PlanError naming the path for a missing or
    unreadable report or one made on another dataset."""
    import json

    reports = []
    for path in paths or []:
        file = os.path.join(path, 'budget.json') if os.path.isdir(path) else path
        try:
            with open(file) as handle:
                report = json.load(handle)
            settings, summary = report['settings'], report['summary']
        except FileNotFoundError:
            raise PlanError(f'--beside {path}: no budget report at {file}') from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanError(f'--beside {path}: not a budget report ({type(exc).__name__}: {exc})') from None
        if settings.get('dataset') != dataset:
            raise PlanError(f'--beside {path}: its curves are on {settings.get("dataset")!r}, these on {dataset!r}')
        reports.append({'source': file, 'backbone': backbone_label(settings.get('backbone')), 'summary': summary,
                        'random_init_downstream': report.get('random_init_downstream') or {}})
    return reports


def _rows(report: dict) -> list[tuple[str, str, dict]]:
    """``(task, backbone, summary row)`` of this report's curves, then of every ``beside`` report's."""
    own = backbone_label(report['settings'].get('backbone'))
    rows = [(task, own, row) for task, row in report['summary'].items()]
    for other in report.get('beside') or []:
        rows += [(task, other['backbone'], row) for task, row in other['summary'].items()]
    return rows


def _training_minutes(row: dict) -> float | None:
    """A curve's training minutes in all (its epochs x its minutes per epoch); None without a measured cost."""
    return row['minutes_per_epoch'] * max(row['epochs']) if row.get('minutes_per_epoch') else None


def _knn_within(row: dict, minutes: float) -> tuple[int, float]:
    """The epoch and mean kNN of the last epoch a curve with a measured cost reached within ``minutes`` of training
    (epochs assumed to cost the same; epoch 0 costs nothing)."""
    per_epoch = row['minutes_per_epoch']
    return [(epoch, knn) for epoch, knn in zip(row['epochs'], row['mean_knn'])
            if epoch * per_epoch <= minutes + 1e-9][-1]


def _backbone_text(cfg: dict) -> str:
    """``type key=value ...`` of a backbone config (the type first)."""
    return ' '.join([str(cfg.get('type'))] + [f'{k}={v}' for k, v in cfg.items() if k != 'type'])


def _downstream_lines(report: dict) -> list[str]:
    """The test-split table of the final backbones and the random initialisations (when protocols ran)."""
    rows = [(task, backbone, row.get('downstream') or {}, row) for task, backbone, row in _rows(report)]
    inits = [('random init', backbone_label(report['settings'].get('backbone')),
              report.get('random_init_downstream') or {}, None)]
    inits += [('random init', other['backbone'], other.get('random_init_downstream') or {}, None)
              for other in report.get('beside') or []]
    everything = [entry for entry in inits + rows if entry[2]]
    protocols = sorted({protocol for entry in everything for protocol in entry[2]})
    if not protocols:
        return []
    intervals = sorted({result['interval'] for entry in everything for result in entry[2].values()})
    lines = ['', 'The final backbone of each curve (and each backbone\'s random initialisation) on the test split: '
             f'balanced accuracy in %, 95 % interval ({"; ".join(intervals)}); training minutes = the curve\'s '
             'epochs × its minutes per epoch.', '',
             '| task | backbone | epochs | training minutes | ' + ' | '.join(protocols) + ' |',
             '|---|---|---|---|' + '---|' * len(protocols)]
    for task, backbone, results, row in everything:
        epochs = '0' if row is None else str(max(row['epochs']))
        total = None if row is None else _training_minutes(row)
        minutes = '0' if row is None else ('-' if total is None else f'{total:.1f}')
        cells = [percent_with_ci(results[p]['mean'], results[p]['low'], results[p]['high']) if p in results else '-'
                 for p in protocols]
        lines.append(f'| {task} | {backbone} | {epochs} | {minutes} | ' + ' | '.join(cells) + ' |')
    return lines


def _equal_minutes_lines(report: dict) -> list[str]:
    """Every curve's val kNN after the training minutes of the cheapest curve in total (only with ``beside``)."""
    rows = [(task, backbone, row) for task, backbone, row in _rows(report) if row.get('minutes_per_epoch')]
    if not report.get('beside') or len(rows) < 2:
        return []
    budget = min(_training_minutes(row) for _, _, row in rows)
    lines = ['', f'At equal training minutes ({budget:.1f} min, the shortest curve\'s total): the last epoch each '
             'curve reached within them and its mean val kNN.', '',
             '| task | backbone | epoch | kNN | gain over its random init |', '|---|---|---|---|---|']
    for task, backbone, row in rows:
        epoch, knn = _knn_within(row, budget)
        lines.append(f'| {task} | {backbone} | {epoch} | {knn:.3f} | {100 * (knn - row["random_init"]):+.1f} |')
    return lines


def render_markdown(report: dict) -> str:
    s = report['settings']
    lines = [f'# Budget curves: {s["dataset"]} at {s["image_size"]} px, {s["epochs"]} epochs', '',
             *provenance_lines(report),
             *([f'Backbone: `{_backbone_text(s["backbone"])}`  '] if s.get('backbone') else []),
             *[f'Beside: {other["backbone"]} curves from `{other["source"]}`  ' for other in report.get('beside') or []],
             f'Seeds: {", ".join(str(x) for x in s["seeds"])}; precision {report.get("precision", "-")}; kNN '
             f'(k={s["k"]}) balanced accuracy on the val split, labeled memory of at most {s["max_images"]} train '
             'images; epoch 0 = random initialisation (the same backbone for every task of a seed).', '',
             '| task | backbone | random init | best (epoch) | final | gain at best | first epoch above random | '
             f'first epoch ≥ +{CLEAR_MARGIN * 100:.0f} points | saturates at | min / epoch | lr |',
             '|---|---|---|---|---|---|---|---|---|---|---|']
    for task, backbone, row in _rows(report):
        minutes = '-' if row['minutes_per_epoch'] is None else f'{row["minutes_per_epoch"]:.2f}'
        lines.append(
            f'| {task} | {backbone} | {row["random_init"]:.3f} | {row["best"]:.3f} ({row["best_epoch"]}) | '
            f'{row["final"]:.3f} | {100 * row["gain_at_best"]:+.1f} | {row["first_epoch_above_random"] or "never"} | '
            f'{row["first_epoch_clearly_above_random"] or "never"} | {row["saturation_epoch"]} | {minutes} | '
            f'{", ".join(f"{lr:.3g}" for lr in row["lrs"])} |')
    lines += _downstream_lines(report)
    lines += _equal_minutes_lines(report)
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
    """kNN on val against epochs (left) and against training minutes (right), every curve of the report and of
    the reports beside it; the dashed lines are the random initialisations."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    figure, (by_epoch, by_minutes) = plt.subplots(1, 2, figsize=(12, 4.5))
    starts = {}
    several_backbones = bool(report.get('beside'))
    for task, backbone, row in _rows(report):
        label = f'{task} ({backbone})' if several_backbones else task
        per_epoch = row['minutes_per_epoch']
        minutes = '' if per_epoch is None else f', {per_epoch:.1f} min/epoch'
        line, = by_epoch.plot(row['epochs'], row['mean_knn'], marker='o', markersize=3, label=f'{label}{minutes}')
        if row['std_knn'] is not None:
            mean, std = np.array(row['mean_knn']), np.array(row['std_knn'])
            by_epoch.fill_between(row['epochs'], mean - std, mean + std, alpha=0.15, color=line.get_color())
        if per_epoch:
            by_minutes.plot([e * per_epoch for e in row['epochs']], row['mean_knn'], marker='o', markersize=3,
                            color=line.get_color(), label=label)
        starts.setdefault(backbone, []).append(row['random_init'])
    for axis in (by_epoch, by_minutes):
        for index, (backbone, values) in enumerate(starts.items()):
            axis.axhline(float(np.mean(values)), color='black', linestyle=('--', ':', '-.')[index % 3], linewidth=1,
                         label=f'random init ({backbone})' if several_backbones else 'random init')
        axis.set_ylabel('kNN balanced accuracy (val)')
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    s = report['settings']
    by_epoch.set_xlabel('epoch')
    by_minutes.set_xlabel('training minutes')
    by_epoch.set_title(f'{s["dataset"]}, {s["image_size"]} px, seeds {",".join(str(x) for x in s["seeds"])}')
    by_minutes.set_title('the same curves against training time')
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
