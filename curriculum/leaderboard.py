"""Leaderboards across orderings: curriculum labels, aggregation over seeds with 95 % CIs, and rendering.

Written here because no library knows curricula. Curriculum labels follow the source study (Sirotkin et al.):
single tasks are ranked by their own downstream score; an ordering whose tasks go from lower to higher single-task
score is a curriculum (``C``), from higher to lower an anti-curriculum (``AC``), anything else mixed (``MC``);
single tasks and baselines get ``-``.
"""
from __future__ import annotations

import csv
import html
import itertools
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from benchmarks.metrics import mean_t_interval

METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa')


def sweep_work_dir(work_root: str, label: str, seed: int, label_fraction: float = 1.0) -> str:
    """The work dir of one sweep run: ``<work_root>/sweeps/<label>/seed<seed>`` with all the labels (the folder
    sweeps have always used), ``.../seed<seed>-labels<fraction>`` otherwise, so that runs of one ordering and seed
    at several label fractions keep their own result.json and finetuned.pth."""
    fraction = float(label_fraction)
    name = f'seed{int(seed)}' if fraction == 1.0 else f'seed{int(seed)}-labels{fraction:g}'
    return os.path.join(work_root, 'sweeps', label, name)


def all_orderings(tasks: list[str], max_len: int) -> list[tuple[str, ...]]:
    """Every ordering of distinct tasks of length 1..max_len (15 for 3 tasks up to length 3)."""
    out = []
    for length in range(1, min(max_len, len(tasks)) + 1):
        out.extend(itertools.permutations(tasks, length))
    return out


def distinct_prefixes(orderings: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Stage runs a sweep needs with the prefix cache: one per distinct prefix."""
    return {ordering[:k] for ordering in orderings for k in range(1, len(ordering) + 1)}


def curriculum_label(ordering: tuple[str, ...], single_scores: dict[str, float]) -> str:
    if len(ordering) < 2 or any(task not in single_scores for task in ordering):
        return '-'
    scores = [single_scores[task] for task in ordering]
    if all(a < b for a, b in zip(scores, scores[1:])):
        return 'C'
    if all(a > b for a, b in zip(scores, scores[1:])):
        return 'AC'
    return 'MC'


def _set_entries(value):
    """``value`` without the mapping entries that are null (or mappings left empty by that), recursively. In a run
    config null means "not set, the built-in behaviour", the same as a missing key."""
    if isinstance(value, dict):
        kept = {key: _set_entries(item) for key, item in value.items() if item is not None}
        return {key: item for key, item in kept.items() if item != {}}
    if isinstance(value, list):
        return [_set_entries(item) for item in value]
    return value


def comparison_key(result: dict) -> str:
    """Runs are comparable when everything but the ordering, the seed and the init file is the same. A study's
    ``study:`` section (what to run: orderings, seeds, fractions) is not part of how a run was made, and a key set
    to null is the same as a missing one, so a config default added later as null (a new option, off by default)
    leaves the stored runs comparable with new ones and a study resumes from them."""
    config = {k: v for k, v in (result.get('config') or {}).items() if k not in ('seed', 'study')}
    text = json.dumps(_set_entries(config), sort_keys=True, default=str)
    import hashlib
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def run_label(result: dict) -> str:
    if result.get('init'):
        base = f'init:{os.path.basename(result["init"])}'
        return base + (f'+{",".join(result["order"])}' if result['order'] else '')
    return ','.join(result['order']) or 'none'


def is_fused(result: dict) -> bool:
    """Whether the run fused other runs' backbones (protocol dvme with ``evaluation.fuse``)."""
    return bool(((result.get('config') or {}).get('evaluation') or {}).get('fuse'))


def dvme_label(sources: list[str]) -> str:
    """The row label of a fusion of ``sources``: ``dvme[odc,moco + moco + odc]``."""
    return f'dvme[{" + ".join(sources)}]'


def fused_label(result: dict) -> str:
    """The row label of a run's dvme result (its sources, this run first)."""
    return dvme_label((((result.get('downstream') or {}).get('dvme') or {}).get('sources')) or [run_label(result)])


@dataclass
class Row:
    label: str
    order: tuple[str, ...]
    baseline: bool
    values: dict[str, list[float]] = field(default_factory=dict)   # metric → one value per seed
    cis: list[list[float]] = field(default_factory=list)           # bootstrap CI of the headline per seed
    seeds: list[int] = field(default_factory=list)
    attention: list[float] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        values = [v for v in self.values.get(metric, []) if v is not None and math.isfinite(v)]
        return float(np.mean(values)) if values else float('nan')

    def interval(self, metric: str) -> tuple[float, float, str]:
        """95 % CI: Student-t over seeds when there are several, else the bootstrap over test images."""
        values = [v for v in self.values.get(metric, []) if v is not None and math.isfinite(v)]
        if len(values) >= 2:
            _, low, high = mean_t_interval(values)
            return low, high, f't over {len(values)} seeds'
        if len(self.cis) == 1 and self.cis[0] and all(math.isfinite(x) for x in self.cis[0]):
            return float(self.cis[0][0]), float(self.cis[0][1]), 'bootstrap over test images'
        return float('nan'), float('nan'), 'n/a'


@dataclass
class Leaderboard:
    protocol: str
    headline: str
    rows: list[Row]
    dataset: str
    downstream: str
    label_fraction: float
    single_scores: dict[str, float]
    stage_counts: dict[str, int] | None = None
    key: str = ''                                # the comparison key of its runs
    notes: list[str] = field(default_factory=list)   # extra footer lines (e.g. how a fused row was made)

    def baselines(self) -> list[Row]:
        return [row for row in self.rows if row.baseline]


def build_leaderboards(results: list[dict], stage_counts: dict[str, int] | None = None) -> list[Leaderboard]:
    """Group comparable runs and build one leaderboard per (comparison key, protocol). The latest run of each
    (ordering, init, seed) wins when a run was repeated."""
    latest: dict[tuple, dict] = {}
    for result in results:
        latest[(comparison_key(result), run_label(result), result['seed'])] = result
    groups: dict[str, list[dict]] = {}
    for (key, _, _), result in latest.items():
        groups.setdefault(key, []).append(result)
    boards = []
    for key, runs in sorted(groups.items()):
        protocols = sorted({p for run in runs for p in run.get('downstream', {})})
        for protocol in protocols:
            rows: dict[str, Row] = {}
            headline = 'balanced_accuracy'
            for run in sorted(runs, key=lambda r: (run_label(r), r['seed'])):
                metrics = run.get('downstream', {}).get(protocol)
                if not metrics:
                    continue
                headline = metrics.get('headline', headline)
                if protocol == 'dvme':   # a fusion of several runs' backbones: no ordering of its own
                    label, order, baseline = fused_label(run), (), False
                else:
                    label, order, baseline = run_label(run), tuple(run['order']), not run['order'] or bool(
                        run.get('init'))
                row = rows.setdefault(label, Row(label, order, baseline=baseline))
                for metric in METRICS:
                    row.values.setdefault(metric, []).append(metrics.get(metric))
                row.cis.append(metrics.get(f'{headline}_ci') or [])
                row.seeds.append(run['seed'])
                attention = (run.get('attention') or {}).get('mean')
                if attention is not None:
                    row.attention.append(float(attention))
            singles = {row.order[0]: row.mean(headline) for row in rows.values()
                       if len(row.order) == 1 and not row.baseline}
            first = runs[0]
            boards.append(Leaderboard(protocol, headline, sorted(rows.values(), key=lambda r: -nan_low(
                r.mean(headline))), first['dataset'], first.get('downstream_dataset', first['dataset']),
                float(first.get('label_fraction', 1.0)), singles, stage_counts, key=key))
    return boards


def nan_low(value: float) -> float:
    """A sort key for scores that ranks a missing (nan / inf) score below every real one."""
    return value if math.isfinite(value) else -1e9


def _fmt(value: float, digits: int = 2, scale: float = 100.0) -> str:
    return '-' if value is None or not math.isfinite(value) else f'{value * scale:.{digits}f}'


def table_rows(board: Leaderboard) -> tuple[list[str], list[list[str]]]:
    """Header and cell strings of a leaderboard (percentages for the metrics)."""
    baselines = board.baselines()
    header = ['ordering', 'label', f'{board.headline} (%)', '95% CI', 'seeds', 'δ vs first task']
    header += [f'> {b.label}' for b in baselines]
    header += [m for m in METRICS if m != board.headline]
    if any(row.attention for row in board.rows):
        header.append('attention in ROI')
    out = []
    for row in board.rows:
        mean = row.mean(board.headline)
        low, high, _ = row.interval(board.headline)
        first = board.single_scores.get(row.order[0]) if row.order and not row.baseline else None
        delta = '-' if first is None or len(row.order) < 2 else f'{(mean - first) * 100:+.2f}'
        cells = [row.label, '-' if row.baseline else curriculum_label(row.order, board.single_scores),
                 _fmt(mean), f'[{_fmt(low)}, {_fmt(high)}]', str(len(row.seeds)), delta]
        for base in baselines:
            cells.append('-' if base is row else ('yes' if mean > base.mean(board.headline) else 'no'))
        cells += [_fmt(row.mean(m)) for m in METRICS if m != board.headline]
        if 'attention in ROI' in header:
            cells.append(_fmt(float(np.mean(row.attention))) if row.attention else '-')
        out.append(cells)
    return header, out


def footer(board: Leaderboard) -> str:
    ranking = ' < '.join(f'{t} ({v * 100:.2f})' for t, v in sorted(board.single_scores.items(), key=lambda kv: kv[1]))
    lines = [
        f'Dataset {board.dataset} → downstream {board.downstream}, protocol `{board.protocol}`, label fraction '
        f'{board.label_fraction:g}. Metrics in %, test split.',
        f'Curriculum labels: single tasks ranked by their own {board.headline}: {ranking or "no single-task runs"}. '
        'An ordering whose tasks go from lower to higher single-task score is a curriculum (C), from higher to '
        'lower an anti-curriculum (AC), otherwise mixed (MC); single tasks and baselines are "-".',
        '95% CI: Student-t over seeds when there are several; for one seed a percentile bootstrap over test '
        'images. δ: difference to the ordering\'s first task alone (points). "> baseline": mean above that '
        'baseline\'s mean (not a significance test).',
    ]
    if board.stage_counts:
        counts = board.stage_counts
        lines.append(f'Stage runs: planned {counts.get("planned")}, run {counts.get("run")}, '
                     f'reused from the prefix cache {counts.get("reused")}.')
    lines.extend(board.notes)
    return '\n'.join(lines)


def render_markdown(boards: list[Leaderboard]) -> str:
    parts = []
    for board in boards:
        header, rows = table_rows(board)
        parts.append(f'### {board.dataset} → {board.downstream} · {board.protocol} · '
                     f'label fraction {board.label_fraction:g}\n')
        parts.append('| ' + ' | '.join(header) + ' |')
        parts.append('|' + '---|' * len(header))
        parts.extend('| ' + ' | '.join(cells) + ' |' for cells in rows)
        parts.append('\n' + footer(board) + '\n')
    return '\n'.join(parts)


def write_outputs(boards: list[Leaderboard], out_dir: str) -> dict[str, str]:
    """leaderboard.md / .csv / .html / .png in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f'leaderboard.{ext}') for ext in ('md', 'csv', 'html', 'png')}
    with open(paths['md'], 'w') as handle:
        handle.write(render_markdown(boards))
    with open(paths['csv'], 'w', newline='') as handle:
        writer = csv.writer(handle)
        for board in boards:
            header, rows = table_rows(board)
            writer.writerow(['dataset', 'downstream', 'protocol', 'label_fraction'] + header)
            for cells in rows:
                writer.writerow([board.dataset, board.downstream, board.protocol, board.label_fraction] + cells)
    with open(paths['html'], 'w') as handle:
        handle.write(_html(boards))
    _plot(boards, paths['png'])
    return paths


def _html(boards: list[Leaderboard]) -> str:
    parts = ['<!doctype html><html><head><meta charset="utf-8"><title>Leaderboard</title><style>'
             'body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:0.5em}'
             'td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child{text-align:left}'
             'p{max-width:60em;color:#444}</style></head><body><h1>Curriculum SSL leaderboard</h1>']
    for board in boards:
        header, rows = table_rows(board)
        parts.append(f'<h2>{html.escape(board.dataset)} → {html.escape(board.downstream)} · '
                     f'{html.escape(board.protocol)} · label fraction {board.label_fraction:g}</h2><table><tr>')
        parts.extend(f'<th>{html.escape(h)}</th>' for h in header)
        parts.append('</tr>')
        for cells in rows:
            parts.append('<tr>' + ''.join(f'<td>{html.escape(c)}</td>' for c in cells) + '</tr>')
        parts.append('</table>')
        parts.extend(f'<p>{html.escape(line)}</p>' for line in footer(board).splitlines())
    parts.append('</body></html>')
    return '\n'.join(parts)


def _plot(boards: list[Leaderboard], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    count = max(1, len(boards))
    height = max(3.0, 0.35 * max((len(b.rows) for b in boards), default=1) + 1.5)
    fig, axes = plt.subplots(1, count, figsize=(6.5 * count, height), squeeze=False)
    colours = {'C': '#2a9d8f', 'AC': '#e76f51', 'MC': '#e9c46a', '-': '#8d99ae'}
    for axis, board in zip(axes[0], boards):
        rows = list(reversed(board.rows))
        means = [row.mean(board.headline) * 100 for row in rows]
        lows, highs = zip(*[row.interval(board.headline)[:2] for row in rows]) if rows else ((), ())
        errors = [[max(0.0, m - lo * 100) if math.isfinite(lo) else 0 for m, lo in zip(means, lows)],
                  [max(0.0, hi * 100 - m) if math.isfinite(hi) else 0 for m, hi in zip(means, highs)]]
        labels = ['-' if row.baseline else curriculum_label(row.order, board.single_scores) for row in rows]
        axis.barh(range(len(rows)), means, xerr=errors, color=[colours[x] for x in labels], capsize=3)
        axis.set_yticks(range(len(rows)))
        axis.set_yticklabels([f'{row.label} [{lab}]' for row, lab in zip(rows, labels)], fontsize=8)
        axis.set_xlabel(f'{board.headline} (%) with 95% CI')
        axis.set_title(f'{board.downstream} · {board.protocol} · {board.label_fraction:g}', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
