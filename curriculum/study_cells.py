"""The cells of a study board: per ordering (or baseline) and protocol, the test and validation headline per seed,
and the cells a study compares, chosen on validation (scratch, best single task, best multi-task ordering).

Shared by the report (:mod:`curriculum.report`), its analyses (:mod:`curriculum.study_analysis`) and the external
evaluation (:mod:`curriculum.external_study`). Written here: no library knows this study's layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from benchmarks.metrics import mean_t_interval

from .leaderboard import nan_low, run_label


@dataclass
class Cell:
    """One ordering (or baseline) under one protocol: test and val headline per seed."""
    label: str
    order: tuple[str, ...]
    baseline: bool
    test: dict[int, float]
    val: dict[int, float]
    ci: dict[int, list] = field(default_factory=dict)   # bootstrap 95 % CI over test images, per seed

    def test_mean(self) -> float:
        return mean_t_interval(list(self.test.values()))[0]

    def val_mean(self) -> float:
        return mean_t_interval(list(self.val.values()))[0]


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, float, int]:
    """Mean of a − b over the seeds both have (finite in both), its 95 % t interval and the number of pairs."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if math.isfinite(a[s]) and math.isfinite(b[s])]
    mean, low, high = mean_t_interval(diffs)
    return mean, low, high, len(diffs)


def signed_ci(mean: float, low: float, high: float) -> str:
    """A difference (fractions, shown in points) with its sign, and its interval where there is one:
    ``+1.23 [-0.40, +2.86]``; ``-`` when the difference is not a number."""
    if not math.isfinite(mean):
        return '-'
    text = f'{mean * 100:+.2f}'
    return text if not math.isfinite(low) else f'{text} [{low * 100:+.2f}, {high * 100:+.2f}]'


def protocol_runs(runs: list[dict], protocol: str):
    """``(run, metrics, headline)`` for every run evaluated with ``protocol``."""
    for run in runs:
        metrics = (run.get('downstream') or {}).get(protocol)
        if metrics:
            yield run, metrics, metrics.get('headline', 'balanced_accuracy')


def board_cells(runs: list[dict], protocol: str) -> tuple[str, dict[str, Cell]]:
    """The headline metric and one :class:`Cell` per ordering label of the runs evaluated with ``protocol``."""
    cells: dict[str, Cell] = {}
    headline = 'balanced_accuracy'
    for run, metrics, headline in protocol_runs(runs, protocol):
        label = run_label(run)
        cell = cells.setdefault(label, Cell(label, tuple(run['order']), not run['order'] or bool(run.get('init')),
                                            {}, {}))
        value = metrics.get(headline)
        cell.test[int(run['seed'])] = float('nan') if value is None else float(value)
        val = (metrics.get('val') or {}).get(headline)
        cell.val[int(run['seed'])] = float('nan') if val is None else float(val)
        cell.ci[int(run['seed'])] = list(metrics.get(f'{headline}_ci') or [])
    return headline, cells


def select_on_val(runs: list[dict], protocol: str) -> dict[str, Cell | None]:
    """The cells a study compares under ``protocol``: ``scratch`` (the ``none`` baseline), ``best_single`` (the
    single task with the highest mean validation headline) and ``best_multi`` (the same among orderings of two or
    more tasks); None where the runs have no such cell. Chosen on val, never on test."""
    _, cells = board_cells(runs, protocol)
    pretrained = [c for c in cells.values() if not c.baseline]

    def best(candidates: list[Cell]) -> Cell | None:
        return max(candidates, key=lambda c: nan_low(c.val_mean())) if candidates else None

    return {'scratch': cells.get('none'),
            'best_single': best([c for c in pretrained if len(c.order) == 1]),
            'best_multi': best([c for c in pretrained if len(c.order) >= 2])}
