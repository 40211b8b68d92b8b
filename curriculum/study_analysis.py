"""Statistics and tables for the study report (``docs/results.md``), rendered by :mod:`curriculum.report`.

Its job is everything the report states beyond the per-board findings and leaderboards:

* the curriculum-hypothesis test of one board: does a curriculum label (``C`` against ``AC``/``MC``) predict the
  gain of a multi-task ordering over its first task alone? A Spearman rank correlation with a two-sided
  permutation p-value, exact (every assignment of the C labels) when that is affordable, else Monte Carlo;
* the label-efficiency series: from scratch, the best single task and the best multi-task ordering, each chosen
  on the validation split at each label fraction, with a Student-t 95 % CI over seeds;
* the side-by-side table with the source study's Table 1 (orderings of relloc, moco and odc, fine-tuned, all
  labels) and what differs between its set-up and ours, from the stored configs;
* the compute each row of a study cost (pretraining of its stages, downstream evaluation per label fraction).

Everything is computed from the stored run records (the dicts of ``docs/results/*.jsonl``) with numpy only, and
renders deterministically. Written here: no library knows this study's records.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from benchmarks.metrics import mean_t_interval, percent_with_ci

from .leaderboard import comparison_key, curriculum_label, run_label
from .study_cells import select_on_val

#: the largest number of label assignments enumerated exactly; above it, Monte-Carlo permutations
EXACT_LIMIT = 200_000
#: random permutations of the Monte-Carlo path (numpy ``default_rng(MONTE_CARLO_SEED)``)
MONTE_CARLO_DRAWS = 100_000
MONTE_CARLO_SEED = 0
#: a permuted statistic at least this close to the observed one (in absolute value) counts as as extreme
TIE_TOLERANCE = 1e-12

#: Sirotkin et al. 2021, "Improved skin lesion recognition by a self-supervised curricular deep learning
#: approach" (arXiv:2112.12086), Table 1: balanced accuracy (%) on ISIC-2019 after fine-tuning, quoted exactly
#: as the issue gives them; keys are this engine's ordering labels ('none' = from scratch).
SOURCE_TABLE_1 = {
    'odc,moco': '75.44',
    'relloc,odc,moco': '75.00',
    'moco': '72.74',
    'relloc': '69.52',
    'odc': '63.52',
    'imagenet': '73.76',
    'none': '49.27',
}
SOURCE_TASKS = frozenset({'relloc', 'moco', 'odc'})
SOURCE_DATA = 'ISIC-2019, 25,331 dermoscopy training images, 8 classes'
NOT_RESTATED = "the paper's (not restated here)"


# --- rank correlation and the permutation test ----------------------------------------------------------------

def average_ranks(values) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind='mergesort')
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks; NaN when either is constant."""
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    norm = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / norm if norm > 0 else float('nan')


@dataclass(frozen=True)
class PermutationTest:
    """Observed Spearman ρ, two-sided p, the number of label assignments (exact) or permutations (Monte Carlo)
    behind it and how many were at least as extreme as the observed one."""
    rho: float
    p: float
    assignments: int
    hits: int
    exact: bool


def _null_exact(scores: np.ndarray, k: int) -> np.ndarray:
    """Σ of ``scores`` over the positions of the C labels, for every distinct set of ``k`` positions."""
    n = len(scores)
    count = math.comb(n, k)
    flat = itertools.chain.from_iterable(itertools.combinations(range(n), k))
    positions = np.fromiter(flat, dtype=np.intp, count=count * k).reshape(count, k)
    return scores[positions].sum(axis=1)


def _null_monte_carlo(scores: np.ndarray, x: np.ndarray, draws: int, seed: int, chunk: int = 10_000) -> np.ndarray:
    """Σ of ``scores`` over the C positions for ``draws`` random permutations of ``x`` (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, draws, chunk):
        size = min(chunk, draws - start)
        out.append(rng.permuted(np.tile(x, (size, 1)), axis=1) @ scores)
    return np.concatenate(out)


def label_permutation_test(is_c, gains, exact_limit: int = EXACT_LIMIT, draws: int = MONTE_CARLO_DRAWS,
                           seed: int = MONTE_CARLO_SEED) -> PermutationTest:
    """Spearman ρ between ``is_c`` (1 for a curriculum, 0 otherwise) and ``gains``, and its two-sided permutation
    p-value. Under the null the k C labels fall on any k of the n orderings alike: with at most ``exact_limit``
    distinct assignments all are enumerated and p = hits / assignments (the observed one included); otherwise
    p = (1 + hits) / (1 + draws) over ``draws`` random permutations. A hit is |ρ_perm| ≥ |ρ_obs| − 1e-12.
    Needs both labels present and gains not all equal (the caller checks)."""
    x = np.asarray(is_c, dtype=np.float64)
    n, k = len(x), int(x.sum())
    rho = spearman(x, gains)
    # for a 0/1 x with k ones, ρ of an assignment is Σ_{C positions} (centred gain ranks) / denominator
    scores = average_ranks(gains)
    scores = scores - scores.mean()
    denominator = math.sqrt(k * (n - k) / n) * math.sqrt(float(scores @ scores))
    exact = math.comb(n, k) <= exact_limit
    sums = _null_exact(scores, k) if exact else _null_monte_carlo(scores, x, draws, seed)
    hits = int(np.count_nonzero(np.abs(sums / denominator) >= abs(rho) - TIE_TOLERANCE))
    p = hits / len(sums) if exact else (1 + hits) / (1 + draws)
    return PermutationTest(rho, p, len(sums), hits, exact)


def curriculum_gains(cells: dict, single_scores: dict[str, float]) -> list[tuple[str, float]]:
    """``(curriculum label, gain)`` of each multi-task ordering among ``cells`` (report ``Cell`` objects by label)
    whose first task has its own single-task cell and whose label is not '-': gain = mean test headline of the
    ordering − mean test headline of its first task alone. Baselines and non-finite gains are left out."""
    out = []
    for label in sorted(cells):
        cell = cells[label]
        if cell.baseline or len(cell.order) < 2 or cell.order[0] not in cells:
            continue
        tag = curriculum_label(cell.order, single_scores)
        gain = cell.test_mean() - cells[cell.order[0]].test_mean()
        if tag != '-' and math.isfinite(gain):
            out.append((tag, gain))
    return out


def _untestable(pairs: list[tuple[str, float]]) -> str | None:
    """Why the hypothesis cannot be tested on ``pairs`` (None when it can)."""
    n = len(pairs)
    curricula = sum(tag == 'C' for tag, _ in pairs)
    if n < 3:
        return f'{n} labelled multi-task ordering(s) whose first task was run alone (needs at least 3)'
    if curricula == 0:
        return f'no curriculum (C) among the {n} labelled orderings'
    if curricula == n:
        return f'all {n} labelled orderings are curricula (C), none AC/MC'
    if len({gain for _, gain in pairs}) == 1:
        return f'all {n} gains are equal'
    return None


def _p_text(p: float) -> str:
    return f'{p:.2f}' if p >= 0.01 else f'{p:.2g}'


def curriculum_hypothesis_line(pairs: list[tuple[str, float]]) -> str:
    """The findings line of the curriculum-hypothesis test over ``pairs`` of :func:`curriculum_gains`."""
    head = '- Curriculum hypothesis (does a C label predict the gain over the first task?): '
    reason = _untestable(pairs)
    if reason:
        return head + f'not testable here: {reason}.'
    is_c = [tag == 'C' for tag, _ in pairs]
    test = label_permutation_test(is_c, [gain for _, gain in pairs])
    k, n = sum(is_c), len(pairs)
    if test.exact:
        how = (f'exact permutation p = {_p_text(test.p)} (two-sided; {test.hits} of {test.assignments:,} label '
               'assignments at least as extreme)')
    else:
        how = (f'Monte-Carlo permutation p = {_p_text(test.p)} (two-sided, {test.assignments:,} random '
               f'permutations, seed {MONTE_CARLO_SEED})')
    return (head + f'Spearman ρ = {test.rho:+.2f} between C (1) vs AC/MC (0) and the gain, {how}, '
            f'n = {n} orderings ({k} C, {n - k} AC/MC).')


def spread_and_selection_line(cells: list, chosen) -> str | None:
    """How far apart the rows of one board are, and how much choosing on val can be trusted there: the range of
    the rows' mean test scores, and among the multi-task orderings the Spearman correlation of mean val with mean
    test and the test rank of the ordering chosen on val (``chosen``). A small range and a weak val-test
    correlation say the orderings cannot be told apart, whatever the best-on-val line above reads. ``cells``: the
    board's :class:`curriculum.study_cells.Cell` s; None with fewer than two rows measured."""
    means = {c.label: c.test_mean() for c in cells if math.isfinite(c.test_mean())}
    if len(means) < 2:
        return None
    low, high = min(means, key=means.get), max(means, key=means.get)
    line = (f'- Spread: the {len(means)} rows\' mean test scores span {(means[high] - means[low]) * 100:.2f} '
            f'points ({low} {means[low] * 100:.2f} to {high} {means[high] * 100:.2f})')
    multi = [c for c in cells if len(c.order) >= 2 and not c.baseline
             and math.isfinite(c.test_mean()) and math.isfinite(c.val_mean())]
    if chosen is not None and len(multi) >= 3:
        rho = spearman([c.val_mean() for c in multi], [c.test_mean() for c in multi])
        by_test = sorted(multi, key=lambda c: -c.test_mean())
        rank = next(i for i, c in enumerate(by_test, 1) if c.label == chosen.label)
        line += (f'; among the {len(multi)} multi-task orderings, mean val and mean test rank them with Spearman '
                 f'ρ = {rho:+.2f}, and the one chosen on val ({chosen.label}) is {rank} of {len(multi)} on test')
    return line + '.'


# --- boards by label fraction and the label-efficiency series -------------------------------------------------

def board_by_fraction(runs: list[dict]) -> dict[float, list[dict]]:
    """The runs of each label fraction; where runs of one fraction were made under several configurations
    (comparison keys), those of the configuration of the most recently created run."""
    latest: dict[float, tuple[str, str]] = {}
    for run in runs:
        fraction = float(run.get('label_fraction', 1.0))
        stamp = (str(run.get('created') or ''), comparison_key(run))
        latest[fraction] = max(latest.get(fraction, stamp), stamp)
    return {fraction: [r for r in runs if float(r.get('label_fraction', 1.0)) == fraction
                       and comparison_key(r) == key]
            for fraction, (_, key) in sorted(latest.items())}


@dataclass(frozen=True)
class EfficiencyPoint:
    """One point of a label-efficiency series: test headline mean and 95 % t-CI over seeds, as fractions."""
    fraction: float
    label: str
    mean: float
    low: float
    high: float
    seeds: int


SERIES = ('scratch', 'best_single', 'best_multi')


def label_efficiency_series(runs: list[dict], protocol: str) -> dict[str, list[EfficiencyPoint]]:
    """For each of :data:`SERIES`, the cell chosen on val by ``study_cells.select_on_val`` at each label fraction."""

    series: dict[str, list[EfficiencyPoint]] = {name: [] for name in SERIES}
    for fraction, board in board_by_fraction(runs).items():
        chosen = select_on_val(board, protocol)
        for name in SERIES:
            cell = chosen[name]
            if cell is None:
                continue
            mean, low, high = mean_t_interval(list(cell.test.values()))
            if math.isfinite(mean):
                series[name].append(EfficiencyPoint(fraction, cell.label, mean, low, high, len(cell.test)))
    return series


# --- side by side with the source study's Table 1 -------------------------------------------------------------

def has_source_orderings(runs: list[dict]) -> bool:
    """Whether the runs include a multi-task ordering made only of the source study's tasks (relloc, moco, odc):
    a study of its Table 1, not merely one that shares a single task with it."""
    return any(len(r['order']) >= 2 and not r.get('init') and set(r['order']) <= SOURCE_TASKS for r in runs)


def _per_seed(runs: list[dict], protocol: str, metric: str) -> dict[str, dict[int, float]]:
    """``{ordering label: {seed: test metric}}`` of the runs evaluated with ``protocol``."""
    out: dict[str, dict[int, float]] = {}
    for run in runs:
        value = ((run.get('downstream') or {}).get(protocol) or {}).get(metric)
        if value is not None:
            out.setdefault(run_label(run), {})[int(run['seed'])] = float(value)
    return out


def _source_rows(measured: dict[str, dict[int, float]]) -> list[str]:
    """Labels of the table's rows: quoted orderings (by source score), other relloc/moco/odc orderings found in
    the runs, then from scratch."""
    orderings = [label for label in measured if label != 'none' and set(label.split(',')) <= SOURCE_TASKS]
    quoted = sorted((x for x in orderings if x in SOURCE_TABLE_1), key=lambda x: -float(SOURCE_TABLE_1[x]))
    others = sorted((x for x in orderings if x not in SOURCE_TABLE_1), key=lambda x: (x.count(','), x))
    return quoted + others + (['none'] if 'none' in measured else [])


def _ranks(means: dict[str, float]) -> dict[str, int]:
    """Competition ranks by mean (1 = best)."""
    return {label: 1 + sum(other > mean for other in means.values()) for label, mean in means.items()}


def source_table(board: list[dict], protocol: str = 'finetune') -> list[str]:
    """The Markdown table of our ``protocol`` runs of ``board`` beside the source study's Table 1."""
    measured = _per_seed(board, protocol, 'balanced_accuracy')
    labels = _source_rows(measured)
    means = {label: mean_t_interval(list(measured[label].values()))[0] for label in labels}
    ranks = _ranks({label: mean for label, mean in means.items() if math.isfinite(mean)})
    lines = ['| ordering | source: ISIC-2019 balanced accuracy (%) | ours: test balanced accuracy (%), mean '
             '[95% CI] | seeds | our rank |', '|---|---|---|---|---|']
    for label in labels:
        name = 'from scratch (`none`)' if label == 'none' else f'`{label}`'
        lines.append(f'| {name} | {SOURCE_TABLE_1.get(label, "not quoted here")} | '
                     f'{percent_with_ci(*mean_t_interval(list(measured[label].values())))} | {len(measured[label])} | '
                     f'{ranks.get(label, "-")} |')
    lines.insert(2 + sum(label != 'none' for label in labels),
                 f'| ImageNet weights | {SOURCE_TABLE_1["imagenet"]} | not run (no ImageNet weights on this '
                 'machine) | - | - |')
    return lines


def _stage_epochs(runs: list[dict]) -> str:
    """Stage epochs per task as stored in the runs' stages (several values joined by '/')."""
    epochs: dict[str, set] = {}
    for run in runs:
        for stage in run.get('stages', []):
            epochs.setdefault(stage['task'], set()).add(stage.get('epochs'))
    return ', '.join(f'{task} {"/".join(str(e) for e in sorted(values, key=str))}'
                     for task, values in sorted(epochs.items())) or 'no stages'


def _data_text(name: str, run: dict) -> str:
    """Experiment, dataset, classes and split sizes of a run as stored."""
    config = run.get('config') or {}
    classes = len(run['classes']) if run.get('classes') else config.get('num_classes', 'unknown')
    text = (f'experiment `{name}`, dataset `{run.get("dataset", config.get("dataset"))}` (downstream '
            f'`{run.get("downstream_dataset")}`), {classes} classes')
    split = run.get('split') or {}
    if all(isinstance(split.get(part), int) for part in ('train', 'val', 'test')):
        text += (f', {split["train"]:,} training / {split["val"]:,} validation / {split["test"]:,} test images '
                 f'(split: {split.get("origin", "?")})')
    return text


def _backbone_text(config: dict) -> str:
    backbone = config.get('backbone')
    if isinstance(backbone, dict) and backbone.get('type'):
        return f'{backbone["type"]}' + (f'-{backbone["depth"]}' if backbone.get('depth') else '')
    return str(backbone) if backbone else 'not stated in the stored config'


def what_differs(name: str, board: list[dict], finetune_budget: str) -> list[str]:
    """Bullet lines: the source study's set-up against ours, ours read from the stored runs of ``board``."""
    run = max(board, key=lambda r: str(r.get('created') or ''))
    config = run.get('config') or {}
    devices = ', '.join(sorted({str(r.get('device', '?')) for r in board}))
    rows = [r for r in board if r['order'] and set(r['order']) <= SOURCE_TASKS]
    return [
        f'- Data — source: {SOURCE_DATA}; ours: {_data_text(name, run)}.',
        f'- Image size — source: {NOT_RESTATED}; ours: {config.get("image_size")} px.',
        f'- Stage epochs — source: {NOT_RESTATED}; ours: {_stage_epochs(rows)} (from the stored stages).',
        f'- Backbone — source: {NOT_RESTATED}; ours: {_backbone_text(config)}.',
        f'- Fine-tuning — source: {NOT_RESTATED}; ours: {finetune_budget}.',
        f'- Hardware — source: {NOT_RESTATED}; ours: {devices} (the device of these {len(board)} runs).',
        '', "The source study's backbone, resolution, epochs, fine-tuning schedule and hardware are the paper's; "
        'they are not restated here because we could not verify them on this machine.',
    ]


def source_section(name: str, runs: list[dict], finetune_budget: str) -> list[str]:
    """The ``### Side by side with the source study (Table 1)`` section of an experiment (fine-tuning, all
    labels); empty when the runs have no ordering of relloc, moco and odc only."""
    if not has_source_orderings(runs):
        return []
    lines = ['### Side by side with the source study (Table 1)', '']
    board = board_by_fraction(runs).get(1.0, [])
    if not any('finetune' in (r.get('downstream') or {}) for r in board):
        return lines + ['No fine-tuning runs at label fraction 1 are stored yet.', '']
    lines += ['Sirotkin et al. 2021 (arXiv:2112.12086), Table 1 (quoted, not measured here), beside our '
              '`finetune` runs at label fraction 1: every ordering of relloc, moco and odc we ran, from scratch, '
              'and ImageNet weights. Our rank is by mean among the rows we ran (1 = best).', '']
    lines += source_table(board) + ['', 'What differs:', ''] + what_differs(name, board, finetune_budget) + ['']
    return lines


# --- compute per row ------------------------------------------------------------------------------------------

def _pretraining_seconds(run: dict) -> float | None:
    """Original training + LR-search time of the run's stages (cache hits included); None when unknown."""
    if run.get('init'):
        return None
    seconds = [_stage_training_seconds(stage) for stage in run.get('stages', [])]
    return None if None in seconds else sum(seconds)


def _downstream_seconds(run: dict) -> float | None:
    """Wall time of the run outside its stages: run seconds − Σ stage seconds; None when unknown."""
    if run.get('seconds') is None:
        return None
    return float(run['seconds']) - sum(float(s.get('seconds') or 0.0) for s in run.get('stages', []))


def _minutes(values: list[float]) -> str:
    return f'{np.mean(values) / 60:.1f}' if values else '-'


def _row_order(label: str, runs: list[dict]) -> tuple:
    """Baselines first, then orderings by length, then by label."""
    run = runs[0]
    return (0 if (not run['order'] or run.get('init')) else 1, len(run['order']), label)


def distinct_stages(runs: list[dict]) -> dict[str, dict]:
    """``{stage key: record}`` of every stage the stored runs used, each once: the record of the run that trained it
    where a stored run did, else the record a run read from the stage cache, which carries the same training times
    and precision (a stage whose training process stored no run, e.g. one stopped before its evaluations, is a cache
    hit in every stored run)."""
    stages: dict[str, dict] = {}
    for run in runs:
        for stage in run.get('stages', []):
            key = stage.get('key')
            if key not in stages or (stages[key].get('cache_hit') and not stage.get('cache_hit')):
                stages[key] = stage
    return stages


def _stage_training_seconds(stage: dict) -> float | None:
    train, search = stage.get('train_seconds'), stage.get('lr_search_seconds')
    return None if train is None or search is None else float(train) + float(search)


def total_compute_line(runs: list[dict]) -> str:
    """What the stored runs cost in all: each distinct stage once (its original training and LR-search time, as the
    first run that trained it stored it) plus every run's downstream evaluation."""
    stages = distinct_stages(runs)
    timed = [v for v in map(_stage_training_seconds, stages.values()) if v is not None]
    downstream = [v for r in runs if (v := _downstream_seconds(r)) is not None]
    untimed = len(stages) - len(timed) + len(runs) - len(downstream)
    return (f'Total compute of the {len(runs)} stored runs: {len(stages)} distinct stages, {sum(timed) / 3600:.2f} h '
            f'of training (each stage once) + {sum(downstream) / 3600:.2f} h of downstream evaluation = '
            f'{(sum(timed) + sum(downstream)) / 3600:.2f} h of one worker\'s wall clock'
            + (f' ({untimed} stage(s) or run(s) without timings left out)' if untimed else '') + '.')


def compute_table(runs: list[dict]) -> list[str]:
    """The ``### Compute per row`` section: minutes of pretraining and of downstream evaluation per ordering."""
    by_label: dict[str, list[dict]] = {}
    for run in runs:
        by_label.setdefault(run_label(run), []).append(run)
    fractions = sorted({float(r.get('label_fraction', 1.0)) for r in runs}, reverse=True)
    lines = ['### Compute per row', '',
             '| ordering | pretraining (min) | ' + ' | '.join(f'downstream at {f:g} (min)' for f in fractions)
             + ' |', '|---|---|' + '---|' * len(fractions)]
    for label in sorted(by_label, key=lambda x: _row_order(x, by_label[x])):
        group = by_label[label]
        pretraining = {(r['seed'], tuple(s.get('key') for s in r.get('stages', []))): _pretraining_seconds(r)
                       for r in group}
        cells = [_minutes([v for v in pretraining.values() if v is not None])]
        for fraction in fractions:
            cells.append(_minutes([v for r in group if float(r.get('label_fraction', 1.0)) == fraction
                                   and (v := _downstream_seconds(r)) is not None]))
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    devices = ', '.join(sorted({str(r.get('device', '?')) for r in runs}))
    lines += ['', total_compute_line(runs)]
    lines += ['', 'Wall-clock minutes on the runs\' device(s) ({}), mean over seeds. Pretraining: the original '
              'training and learning-rate search time of the ordering\'s stages as stored (a stage reused as a '
              'cached prefix is counted in every ordering that uses it, so each row is the cost to produce that '
              'row alone, and the column does not add up to the study\'s compute); "-" where a stage lacks its '
              'timing. Downstream: the run\'s wall time minus the time its stages took in that run (all '
              'evaluation protocols, data loading included). The total takes each stage\'s time as stored: a '
              'stage resumed from an epoch checkpoint counts only its part after the resume, and time a process '
              'spent paused counts.'.format(devices), '']
    return lines
