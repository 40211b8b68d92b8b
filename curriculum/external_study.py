"""External evaluation of a study: the fine-tuned models of the cells a study compares, applied to another dataset.

``python tools/study.py external EXPERIMENT --dataset NAME --data-root PATH`` works from the study's stored runs
(``docs/results/<study>.jsonl``). For each label fraction it takes, under the ``finetune`` protocol, the cells the
report compares, chosen on the validation split by :func:`curriculum.study_cells.select_on_val`: training from scratch,
the best single task and the best multi-task ordering. Each seed of each cell is found in its sweep folder
(:func:`curriculum.leaderboard.sweep_work_dir`) and used only when the folder's ``result.json`` is that very run
(ordering, seed, label fraction and config hash as stored) and holds a ``finetuned.pth``; otherwise the seed is
skipped with the reason. The scoring itself (class mapping by name, metrics with bootstrap CIs) is
``tools/evaluate.py``'s, passed in as a callable; this module writes its report beside the run as
``external-<dataset>.json`` and keeps one compact record per (label fraction, role, ordering, seed) in
``docs/results/external/<study>.<dataset>.jsonl`` (a re-run replaces records of the same key; the file is sorted).
:func:`external_section` renders those records as Markdown for the study report. Written here: no library knows
this study's layout.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.metrics import mean_t_interval

from .errors import CheckpointError, EngineError
from .finetuned import CHECKPOINT, read_result
from .leaderboard import comparison_key, run_label, sweep_work_dir
from .results import json_lines
from .study_cells import paired_difference, select_on_val, signed_ci

PROTOCOL = 'finetune'
#: the cells of a study that are scored, in table order (the keys of :func:`curriculum.study_cells.select_on_val`)
ROLES = ('scratch', 'best_single', 'best_multi')
ROLE_TITLES = {'scratch': 'from scratch', 'best_single': 'best single task', 'best_multi': 'best multi-task'}
METRICS = ('balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa')
#: what makes two records the same measurement: a re-run replaces the record of the same key
KEY_FIELDS = ('study', 'dataset', 'label_fraction', 'role', 'ordering', 'seed')


def records_path(results_dir: str, study: str, dataset: str) -> str:
    """``<results_dir>/external/<study>.<dataset>.jsonl``."""
    return os.path.join(results_dir, 'external', f'{study}.{dataset}.jsonl')


def output_name(dataset: str) -> str:
    """The per-run report's file name in the run folder (one per dataset, so datasets do not overwrite each other)."""
    return f'external-{dataset}.json'


@dataclass
class Target:
    """One seed of one chosen cell: the stored run and the folder that should hold its fine-tuned model."""
    label_fraction: float
    role: str
    ordering: str
    seed: int
    run: dict
    work_dir: str
    #: below 100 % of the labels: ``seed<N>``, where sweeps made before :func:`sweep_work_dir` told fractions apart
    #: left the run (used only when it holds this very run)
    older_work_dir: str | None = None


# -- which runs --------------------------------------------------------------------------------------------------
def _fraction(run: dict) -> float:
    return float(run.get('label_fraction', 1.0))


def fraction_groups(runs: list[dict]) -> tuple[dict[float, list[dict]], list[str]]:
    """The runs of each label fraction that are compared together, and notes. Runs are comparable when
    :func:`comparison_key` agrees; where a fraction has several such groups (the study's config changed between
    runs), the group holding the most recently created run is used and the others are named in a note."""
    by_key: dict[str, list[dict]] = {}
    for run in runs:
        by_key.setdefault(comparison_key(run), []).append(run)
    chosen: dict[float, list[dict]] = {}
    notes = []
    for fraction in sorted({_fraction(r) for r in runs}, reverse=True):
        groups = [group for group in by_key.values() if _fraction(group[0]) == fraction]
        groups.sort(key=lambda group: max(str(r.get('created') or '') for r in group), reverse=True)
        chosen[fraction] = groups[0]
        if len(groups) > 1:
            notes.append(f'label fraction {fraction:g}: {sum(len(g) for g in groups[1:])} run(s) made with another '
                         f'config are not considered (the latest config\'s {len(groups[0])} run(s) are)')
    return chosen, notes


def plan_targets(runs: list[dict], work_root: str, fractions: list[float] | None = None
                 ) -> tuple[list[Target], dict[tuple[float, str], str], list[str]]:
    """The (fraction, role, ordering, seed) to score, the ordering chosen for each (fraction, role), and notes.

    ``fractions`` restricts the label fractions (all stored ones by default)."""

    groups, notes = fraction_groups(runs)
    targets, chosen_orderings = [], {}
    for fraction, group in groups.items():
        if fractions is not None and not any(math.isclose(fraction, f) for f in fractions):
            continue
        chosen = select_on_val(group, PROTOCOL)
        if not any(chosen.values()):
            notes.append(f'label fraction {fraction:g}: no run evaluated with the {PROTOCOL} protocol')
            continue
        stored = {(run_label(r), int(r['seed'])): r for r in group if (r.get('downstream') or {}).get(PROTOCOL)}
        for role in ROLES:
            cell = chosen[role]
            if cell is None:
                notes.append(f'label fraction {fraction:g}: no {ROLE_TITLES[role]} cell among the stored runs')
                continue
            chosen_orderings[(fraction, role)] = cell.label
            for seed in sorted(cell.test):
                older = None if fraction == 1.0 else sweep_work_dir(work_root, cell.label, seed, 1.0)
                targets.append(Target(fraction, role, cell.label, seed, stored[(cell.label, seed)],
                                      sweep_work_dir(work_root, cell.label, seed, fraction), older))
    return targets, chosen_orderings, notes


def _differences(found: dict, stored: dict) -> list[str]:
    """How the run in a folder (``found``, its result.json) differs from the stored record of the wanted run."""
    out = []
    if list(found.get('order') or []) != list(stored.get('order') or []):
        out.append(f'ordering {",".join(found.get("order") or []) or "none"}')
    if found.get('seed') is None or int(found['seed']) != int(stored['seed']):
        out.append(f'seed {found.get("seed")}')
    if not math.isclose(_fraction(found), _fraction(stored)):
        out.append(f'label fraction {_fraction(found):g}')
    if found.get('config_hash') and stored.get('config_hash'):
        if found['config_hash'] != stored['config_hash']:
            out.append(f'config {found["config_hash"]}, not {stored["config_hash"]}')
    elif json.dumps(found.get('config') or {}, sort_keys=True, default=str) != \
            json.dumps(stored.get('config') or {}, sort_keys=True, default=str):
        out.append('another config')
    return out


def check_folder(work_dir: str, run: dict) -> str | None:
    """Why ``work_dir`` cannot be scored as the stored ``run`` (None when it holds that run's result.json and
    fine-tuned model)."""
    if not os.path.isdir(work_dir):
        return f'no run folder {work_dir}'
    try:
        found = read_result(work_dir)
    except EngineError as exc:
        return str(exc)
    if found is None:
        return f'no result.json in {work_dir}'
    differences = _differences(found, run)
    if differences:
        return f'{work_dir} holds another run ({"; ".join(differences)})'
    if not os.path.isfile(os.path.join(work_dir, CHECKPOINT)):
        return f'no {CHECKPOINT} in {work_dir}'
    return None


def locate(target: Target) -> tuple[str | None, str | None]:
    """``(folder, None)`` for the folder that holds ``target``'s run and model, else ``(None, why)``: its sweep
    folder, or else its older folder (see :class:`Target`) when that holds this very run."""
    reasons = []
    for work_dir in filter(None, (target.work_dir, target.older_work_dir)):
        reason = check_folder(work_dir, target.run)
        if reason is None:
            return work_dir, None
        reasons.append(reason)
    return None, reasons[0] + (f' (nor in the older folder: {reasons[1]})' if len(reasons) > 1 else '')


# -- records -----------------------------------------------------------------------------------------------------
def record_key(record: dict) -> tuple:
    return tuple(record[field] for field in KEY_FIELDS)


def _sort_key(record: dict) -> tuple:
    return (record['study'], record['dataset'], -float(record['label_fraction']), ROLES.index(record['role']),
            record['ordering'], int(record['seed']))


def _finite(value):
    """A metric or interval with non-finite numbers (an undefined AUC) as None, so the file stays plain JSON."""
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return float(value) if value is not None and math.isfinite(float(value)) else None


def make_record(target: Target, study: str, report: dict) -> dict:
    """The compact record of one scored run from ``tools/evaluate.py``'s report."""
    metrics = report['metrics']
    own = (target.run.get('downstream') or {}).get(PROTOCOL) or {}
    return {
        'study': study, 'dataset': report['dataset'],
        'data_root': os.path.basename(os.path.normpath(report['data_root'])) if report.get('data_root') else None,
        'label_fraction': target.label_fraction, 'role': target.role, 'ordering': target.ordering,
        'seed': target.seed, 'config_hash': target.run.get('config_hash'), 'split': report['split'],
        'metrics': {key: _finite(metrics.get(key)) for name in METRICS for key in (name, f'{name}_ci')},
        'own_test_balanced_accuracy': _finite(own.get('balanced_accuracy')),
        'n_images': int(report['n_images']), 'classes_mapped': dict(report['class_mapping']),
        'classes_left_out': dict(report['unmapped_classes']), 'n_left_out': int(report['n_left_out']),
        'created': report['date'],
    }


def skipped_record(target: Target, study: str, dataset: str, data_root: str | None, reason: str,
                   created: str) -> dict:
    return {'study': study, 'dataset': dataset,
            'data_root': os.path.basename(os.path.normpath(data_root)) if data_root else None,
            'label_fraction': target.label_fraction, 'role': target.role, 'ordering': target.ordering,
            'seed': target.seed, 'config_hash': target.run.get('config_hash'), 'skipped': reason,
            'created': created}


def read_records(path: str) -> list[dict]:
    """The records of one ``external/<study>.<dataset>.jsonl`` file ([] when it does not exist)."""
    if not os.path.exists(path):
        return []
    out = []
    for number, record in json_lines(path):
        try:
            record_key(record)
        except (ValueError, KeyError, TypeError):
            raise EngineError(f'{path}: line {number} is not an external-evaluation record') from None
        out.append(record)
    return out


def merge_records(existing: list[dict], new: list[dict], chosen: dict[tuple[float, str], str] | None = None
                  ) -> list[dict]:
    """``existing`` with ``new`` merged in, sorted. A new record replaces the one of the same key, except that a
    skipped seed does not replace a measurement of the same run (same config hash: a machine without the run
    folders keeps the numbers); records of a (fraction, role) whose chosen ordering (``chosen``) is now another
    one are dropped (the selection moved)."""
    by_key = {}
    for record in existing:
        fraction_role = (float(record['label_fraction']), record['role'])
        if chosen is not None and fraction_role in chosen and chosen[fraction_role] != record['ordering']:
            continue
        by_key[record_key(record)] = record
    for record in new:
        key = record_key(record)
        held = by_key.get(key)
        if 'skipped' in record and held is not None and 'skipped' not in held \
                and held.get('config_hash') == record.get('config_hash'):
            continue
        by_key[key] = record
    return sorted(by_key.values(), key=_sort_key)


def write_records(path: str, records: list[dict]) -> None:
    """One JSON object a line, keys sorted, written atomically."""
    from benchmarks.files import temporary_name

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    with open(tmp, 'w') as handle:
        for record in records:
            handle.write(json.dumps(record, sort_keys=True) + '\n')
    os.replace(tmp, path)


# -- the command ---------------------------------------------------------------------------------------------------
def run_external(runs: list[dict], study: str, dataset: str, data_root: str | None, work_root: str,
                 results_dir: str, score: Callable[[str], dict], fractions: list[float] | None = None,
                 log: Callable[[str], None] = print) -> dict:
    """Score the chosen cells of ``runs`` (a study's stored runs) on ``dataset``; ``score(work_dir)`` returns
    ``tools/evaluate.py``'s report for one run folder. Writes each run's ``external-<dataset>.json`` and merges the
    records into ``records_path(results_dir, study, dataset)`` after each run (an interruption keeps what was
    scored). Returns ``{'scored': n, 'skipped': n, 'path': file}``. A folder that is missing or holds another run,
    a missing or unloadable model: the seed is skipped with the reason; any other error is the dataset's and is
    raised."""
    from datetime import datetime, timezone

    from benchmarks.files import write_json_atomic

    targets, chosen, notes = plan_targets(runs, work_root, fractions)
    for note in notes:
        log(f'[external] note: {note}')
    if not targets:
        raise EngineError(f'study {study}: no stored {PROTOCOL} run to score'
                          + (f' at label fraction(s) {", ".join(f"{f:g}" for f in fractions)}' if fractions else ''))
    path = records_path(results_dir, study, dataset)
    records = merge_records(read_records(path), [], chosen)
    scored = skipped = 0
    last = None
    for target in targets:
        what = f'label fraction {target.label_fraction:g}, {target.role} {target.ordering}, seed {target.seed}'
        work_dir, reason = locate(target)
        report = None
        if reason is None:
            try:
                report = score(work_dir)
            except CheckpointError as exc:
                reason = str(exc).strip().splitlines()[0]
        if report is None:
            skipped += 1
            log(f'[external] {what}: skipped: {reason}')
            created = datetime.now(timezone.utc).isoformat(timespec='seconds')
            record = skipped_record(target, study, dataset, data_root, reason, created)
        else:
            scored += 1
            out = os.path.join(work_dir, output_name(dataset))
            write_json_atomic(out, report)
            record = make_record(target, study, report)
            last = record
            metrics = record['metrics']
            low, high = metrics['balanced_accuracy_ci'] or (None, None)
            interval = f' [{low:.4f}, {high:.4f}]' if low is not None and high is not None else ''
            log(f'[external] {what}: balanced_accuracy {_number(metrics["balanced_accuracy"])}{interval}, '
                f'auc {_number(metrics["auc"])} on {record["n_images"]} image(s); wrote {out}')
        records = merge_records(records, [record])
        write_records(path, records)
    if last is not None:
        log(f'[external] {_classes_sentence(last)}')
    log(f'[external] {study} on {dataset}: {scored} run(s) scored, {skipped} skipped; records in {path}')
    return {'scored': scored, 'skipped': skipped, 'path': path}


def _number(value) -> str:
    return '-' if value is None else f'{value:.4f}'


# -- the report section --------------------------------------------------------------------------------------------
def _pct(value: float) -> str:
    return '-' if value is None or not math.isfinite(value) else f'{value * 100:.2f}'


def _classes_sentence(record: dict) -> str:
    mapped = ', '.join(f'{name} → {run}' for name, run in sorted(record['classes_mapped'].items()))
    left = ', '.join(f'{name} ({count} image{"" if count == 1 else "s"})'
                     for name, count in sorted(record['classes_left_out'].items()) if count)
    return (f'Classes mapped (dataset → run): {mapped}; left out (no counterpart in the run): {left or "none"}; '
            f'{record["n_images"]} image(s) scored (split {record["split"]}).')


def _per_seed(group: list[dict]) -> dict[int, float]:
    """Balanced accuracy per seed of one cell's scored records (NaN where the record has none)."""
    values = {int(r['seed']): r['metrics'].get('balanced_accuracy') for r in group if 'skipped' not in r}
    return {seed: float('nan') if value is None else float(value) for seed, value in values.items()}


def _paired_text(cell: dict[int, float], scratch: dict[int, float]) -> str:
    """``cell − scratch`` over their common seeds: mean with its t interval, the mean alone for one pair."""
    mean, low, high, pairs = paired_difference(cell, scratch)
    if not pairs:
        return 'no common seed'
    return f'{signed_ci(mean, low, high)} ({pairs} seed{"s" if pairs > 1 else ""})'


def external_section(results_dir: str, study_name: str) -> list[str]:
    """Markdown lines for the study report from ``<results_dir>/external/<study_name>.*.jsonl``: per dataset a
    table of label fraction, role, ordering, seeds, balanced accuracy (mean over seeds with its 95 % Student-t
    interval, or one seed's bootstrap interval), mean AUC and the difference from scratch paired over the seeds both
    have (mean in points with its 95 % t interval), then which classes were mapped and which left out.
    [] when nothing was scored externally. Deterministic: the same records give the same lines whatever their
    order in the files."""
    pattern = os.path.join(glob.escape(os.path.join(results_dir, 'external')), f'{glob.escape(study_name)}.*.jsonl')
    records = [r for path in sorted(glob.glob(pattern)) for r in read_records(path) if r.get('study') == study_name]
    if not records:
        return []
    lines = ['### External evaluation', '',
             'The fine-tuned models of the cells compared above (from scratch, and the best single task and best '
             'multi-task ordering chosen on the validation split) applied to other datasets, whose classes map '
             'onto the run\'s by name (`python tools/study.py external`). Balanced accuracy and AUC in % over the '
             'mapped classes, the model\'s scores renormalised over them; 95% CI: Student-t over seeds, or for a '
             'single seed the percentile bootstrap over the scored images. "vs from scratch": the difference in '
             'balanced accuracy, paired over the seeds both cells have, with its Student-t 95% CI (points).', '']
    for dataset in sorted({r['dataset'] for r in records}):
        rows = sorted((r for r in records if r['dataset'] == dataset), key=_sort_key)
        roots = sorted({r.get('data_root') or '-' for r in rows})
        lines += [f'#### {dataset} ({", ".join(f"`{root}`" for root in roots)})', '',
                  '| label fraction | role | ordering | seeds | balanced accuracy (%) [95% CI] | AUC (%) | '
                  'vs from scratch (points) |',
                  '|---|---|---|---|---|---|---|']
        cells: dict[tuple, list[dict]] = {}
        for row in rows:
            cells.setdefault((row['label_fraction'], row['role'], row['ordering']), []).append(row)
        skipped_notes = []
        scratch = {fraction: _per_seed(group) for (fraction, role, _), group in cells.items() if role == 'scratch'}
        for (fraction, role, ordering), group in cells.items():
            scored = [r for r in group if 'skipped' not in r]
            skipped = [r for r in group if 'skipped' in r]
            mean, low, high = mean_t_interval([r['metrics'].get('balanced_accuracy') for r in scored])
            if len(scored) == 1 and scored[0]['metrics'].get('balanced_accuracy_ci'):
                low, high = scored[0]['metrics']['balanced_accuracy_ci']    # one seed: its bootstrap interval
            auc = mean_t_interval([r['metrics'].get('auc') for r in scored])[0]
            interval = f' [{_pct(low)}, {_pct(high)}]' if math.isfinite(low) else ''
            seeds = ', '.join(str(r['seed']) for r in scored) or 'none'
            if skipped:
                seeds += f' ({len(skipped)} skipped)'
                skipped_notes += [f'{float(fraction):g} {ordering} seed {r["seed"]}: {r["skipped"]}' for r in skipped]
            versus = '-' if role == 'scratch' else _paired_text(_per_seed(group), scratch.get(fraction, {}))
            lines.append(f'| {float(fraction):g} | {ROLE_TITLES[role]} | {ordering} | {seeds} | '
                         f'{_pct(mean)}{interval} | {_pct(auc)} | {versus} |')
        lines.append('')
        sentences = sorted({_classes_sentence(r) for r in rows if 'skipped' not in r})
        lines += sentences + ([''] if sentences else [])
        if skipped_notes:
            lines += ['Skipped: ' + '; '.join(skipped_notes) + '.', '']
    return lines
