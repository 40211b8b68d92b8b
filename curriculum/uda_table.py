"""The domain-adaptation table (``tools/uda_table.py``): one ordering's final backbone adapted from the labelled
downstream data to an unlabelled target by each UDA method, over seeds, as the AISEEME deliverable reports it
(its Tables 4-6: no alignment, DCAN, DCAN without the feature regulariser; DANN added here): target balanced
accuracy per method with a Student-t 95 % interval over seeds and each seed's bootstrap interval over target test
images.

Every (method, seed) is one run of the engine (:func:`curriculum.run.run_curriculum`, protocol uda only) in
``<work root>/uda/<ordering>/<method>/seed<N>``: the stages come from the cache (shared by the methods of one seed),
and a run the results store already holds is not run again, so an interrupted table continues where it stopped.
Writes ``uda.json`` (settings, provenance, every run's metrics) and ``uda.md``.
"""
from __future__ import annotations

import json
import os

from benchmarks.metrics import mean_t_interval
from benchmarks.protocols.adaptation import METHODS

from .cli import provenance_lines
from .errors import PlanError
from .leaderboard import comparison_key, run_label

#: how the deliverable names the methods
METHOD_TITLES = {'source_only': 'no alignment (source only)', 'dann': 'DANN', 'dcan': 'DCAN',
                 'dcan_noreg': 'DCAN without feature regulariser'}
METRICS = ('balanced_accuracy', 'auc', 'accuracy', 'macro_f1', 'kappa')


def parse_methods(text: str) -> list[str]:
    """``"dcan,dann"`` → ``['dcan', 'dann']``; a PlanError naming an unknown method."""
    methods = [part.strip() for part in text.split(',') if part.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise PlanError(f'--methods: unknown method {unknown[0]!r}; known: {", ".join(METHODS)}' if unknown
                        else '--methods is empty')
    return methods


def uda_work_dir(work_root: str, label: str, method: str, seed: int) -> str:
    return os.path.join(work_root, 'uda', label, method, f'seed{int(seed)}')


def stored_run(plan, init: str | None, seed: int, results: list[dict]) -> dict | None:
    """The stored result of the same run (config but the seed, ordering, init, seed), or None."""
    probe = {'config': plan.config, 'order': plan.order, 'init': init, 'seed': seed}
    for stored in results:
        if (comparison_key(stored) == comparison_key(probe) and run_label(stored) == run_label(probe)
                and int(stored['seed']) == int(seed)):
            return stored
    return None


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: ``{'seeds', 'per_seed': [{seed, <metrics>, balanced_accuracy_ci, source_val}], '<metric>':
    [mean, low, high]}`` from the runs' uda results (t interval over seeds; NaN bounds for one seed)."""
    table = {}
    for method, results in runs.items():
        rows = []
        for result in sorted(results, key=lambda r: r['seed']):
            metrics = result['downstream']['uda']
            rows.append({'seed': int(result['seed']), **{m: metrics.get(m) for m in METRICS},
                         'balanced_accuracy_ci': metrics.get('balanced_accuracy_ci'),
                         'source_val': (metrics.get('val') or {}).get('balanced_accuracy'),
                         'steps': metrics.get('steps')})
        entry = {'seeds': [row['seed'] for row in rows], 'per_seed': rows}
        for metric in (*METRICS, 'source_val'):
            entry[metric] = list(mean_t_interval([row[metric] for row in rows]))
        table[method] = entry
    return table


def _pct(value) -> str:
    return '-' if value is None or value != value else f'{100 * value:.2f}'


def render_markdown(report: dict) -> str:
    """The table as Markdown: one row per method."""
    settings = report['settings']
    lines = [f'# Unsupervised domain adaptation: {settings["source"]} → {settings["target"]}', '',
             *provenance_lines(report), '',
             f'Backbone: ordering `{settings["order"]}` (its final backbone, fine-tuned by each method); '
             f'{settings["image_size"]} px; seeds {", ".join(map(str, settings["seeds"]))}; classes '
             f'{", ".join(f"{s} → {t}" for s, t in settings["class_map"].items())} (source → target); '
             f'left out of training: {", ".join(settings["left_out"]) or "none"}. Model selection: '
             f'{settings["selection"]} (target labels are read only for the test metrics).', '',
             '| method | target balanced accuracy (%) | 95% CI (t over seeds) | per seed [bootstrap 95% CI] '
             '| target AUC (%) | source val balanced accuracy (%) |',
             '|---|---|---|---|---|---|']
    for method, entry in report['methods'].items():
        mean, low, high = entry['balanced_accuracy']
        per_seed = '; '.join(f'{row["seed"]}: {_pct(row["balanced_accuracy"])} '
                             f'[{_pct((row["balanced_accuracy_ci"] or [None, None])[0])}, '
                             f'{_pct((row["balanced_accuracy_ci"] or [None, None])[1])}]'
                             for row in entry['per_seed'])
        lines.append(f'| {METHOD_TITLES.get(method, method)} | {_pct(mean)} | [{_pct(low)}, {_pct(high)}] | '
                     f'{per_seed} | {_pct(entry["auc"][0])} | {_pct(entry["source_val"][0])} |')
    lines += ['', 'Chance balanced accuracy: '
              f'{100 / len(settings["classes"]):.1f} % ({len(settings["classes"])} classes). '
              'A t interval needs at least two seeds ("-" otherwise).', '']
    return '\n'.join(lines)


def write_report(out_dir: str, report: dict) -> list[str]:
    """``uda.json`` and ``uda.md`` in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, 'uda.json'), os.path.join(out_dir, 'uda.md')]
    with open(paths[0], 'w') as handle:
        json.dump(report, handle, indent=1, default=float)   # methods in table order
        handle.write('\n')
    with open(paths[1], 'w') as handle:
        handle.write(render_markdown(report))
    return paths
