"""Study reports: experiment files (a run config plus a ``study:`` section) and ``docs/results.md``.

The report is rendered from compact JSON Lines exports of the results store only, so it can be rebuilt in seconds
on any machine and compared byte for byte. It holds, per experiment: the set-up as run, computed findings (the
best multi-task ordering, chosen on the validation split, against training from scratch and against the best
single task, with paired 95 % CIs over seeds; and, unselected, every multi-task ordering against both), whether
the curriculum label predicts the gain, the source study's Table 1 beside ours, the leaderboards of
:mod:`curriculum.leaderboard`, the compute of each row, a label-efficiency plot, reference numbers from the
literature, and the hand-written discussion ``docs/results_discussion.md``. A
study whose experiment file names a successor (``study.superseded_by``) follows the current ones, marked. The
statistics and tables beyond the findings are computed in :mod:`curriculum.study_analysis`. Written here: no
library knows this study's layout.
"""
from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from benchmarks.metrics import mean_t_interval, percent_with_ci

from .errors import PlanError
from .external_study import external_section
from .leaderboard import build_leaderboards, comparison_key, curriculum_label, render_markdown, run_label
from .plan import parse_order, read_yaml
from .study_analysis import (SERIES, compute_table, curriculum_gains, curriculum_hypothesis_line, distinct_stages,
                             label_efficiency_series, source_section, spread_and_selection_line)
from .study_cells import Cell, board_cells, paired_difference, protocol_runs, select_on_val, signed_ci

DISCUSSION_FILE = 'results_discussion.md'
PLOT_FILE = 'results_label_efficiency.png'
#: numbers quoted from the literature (not measured here)
REFERENCES = [
    ('Sirotkin et al. 2021 (arXiv:2112.12086), ISIC-2019, fine-tuned ResNet, balanced accuracy',
     [('ODC→MoCo v2 (best curriculum)', '75.44'), ('MoCo v2 alone', '72.74'), ('ImageNet weights', '73.76'),
      ('from scratch', '49.27')]),
    ('MedMNIST v2 (Yang et al. 2023), DermaMNIST 28 px, supervised ResNet-18, MedMNIST split (not lesion-grouped)',
     [('accuracy', '73.5'), ('AUC', '91.7')]),
]


STUDY_NAME = re.compile(r'[A-Za-z0-9_.-]+')   # a study's name is a file name (its export) and a heading


@dataclass
class Study:
    name: str
    orders: list[tuple[str, ...]]
    seeds: list[int]
    label_fractions: list[float]
    baselines: list[str]
    superseded_by: str | None = None   # the study that replaces this one in the report (kept for the record)
    superseded_why: str = ''


@dataclass
class Experiment:
    path: str
    config: dict
    study: Study


def load_experiment(path: str) -> Experiment:
    """Read and check an experiment file (``yaml.safe_load``); the run config itself is checked by the plan."""
    config = read_yaml(path)
    section = config.get('study')
    if not isinstance(section, dict):
        raise PlanError(f'{path}: no "study:" section (name, orders, seeds, label_fractions, baselines)')
    name = str(section.get('name') or '')
    if not STUDY_NAME.fullmatch(name):
        raise PlanError(f'{path}: study.name must be letters, digits, "_", "-" or ".", got {name!r}')
    orders_text = section.get('orders') or []
    if not isinstance(orders_text, list) or not orders_text:
        raise PlanError(f'{path}: study.orders must be a non-empty list of orderings like "odc,moco"')
    orders = []
    for text in orders_text:
        order = tuple(parse_order(str(text)))
        if not order:
            raise PlanError(f'{path}: study.orders lists pretext orderings; "none" goes in study.baselines')
        orders.append(order)
    seeds = section.get('seeds', [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise PlanError(f'{path}: study.seeds must be a list of non-negative integers, got {seeds!r}')
    fractions = section.get('label_fractions', [1.0])
    if not isinstance(fractions, list) or not fractions or not all(
            isinstance(f, (int, float)) and 0 < f <= 1 for f in fractions):
        raise PlanError(f'{path}: study.label_fractions must be a list of numbers in (0, 1], got {fractions!r}')
    baselines = section.get('baselines', ['none'])
    if not isinstance(baselines, list) or not all(isinstance(b, str) for b in baselines):
        raise PlanError(f'{path}: study.baselines must be a list ("none" and/or weight files)')
    superseded_by = section.get('superseded_by')
    if superseded_by is not None and (not isinstance(superseded_by, str) or superseded_by == name
                                      or not STUDY_NAME.fullmatch(superseded_by)):
        raise PlanError(f'{path}: study.superseded_by must name another study, got {superseded_by!r}')
    why = section.get('superseded_why', '')
    if not isinstance(why, str) or (why and superseded_by is None):
        raise PlanError(f'{path}: study.superseded_why is one line of text, given with study.superseded_by')
    return Experiment(os.path.abspath(path), config,
                      Study(name, orders, list(seeds), [float(f) for f in fractions], list(baselines),
                            superseded_by, why.strip()))


# --- statistics over seeds -------------------------------------------------------------------------------------

def _pct(value: float) -> str:
    return '-' if value is None or not math.isfinite(value) else f'{value * 100:.2f}'


#: fewest paired seeds for a better/worse verdict: a t-interval over two seeds rests on one degree of freedom and
#: collapses when both seeds happen to give the same difference (balanced accuracies on a fixed test split are
#: discrete, so that does happen), so with two seeds the interval is shown without a verdict
MIN_SEEDS_FOR_VERDICT = 3


def _verdict_kind(low: float, high: float, pairs: int) -> str:
    """``no_interval``, ``too_few`` (fewer than :data:`MIN_SEEDS_FOR_VERDICT` pairs), ``better``, ``worse`` or
    ``none`` (the interval contains 0)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return 'no_interval'
    if pairs < MIN_SEEDS_FOR_VERDICT:
        return 'too_few'
    return 'better' if low > 0 else 'worse' if high < 0 else 'none'


def _verdict(low: float, high: float, pairs: int) -> str:
    return {'no_interval': 'no interval (fewer than 2 paired seeds)',
            'too_few': f'no verdict with {pairs} paired seeds (needs {MIN_SEEDS_FOR_VERDICT})',
            'better': 'better (95% CI above 0)', 'worse': 'worse (95% CI below 0)',
            'none': 'no significant difference (95% CI contains 0)'}[_verdict_kind(low, high, pairs)]


# --- per-board findings ----------------------------------------------------------------------------------------

def _compare(a: Cell, b: Cell) -> str:
    """``a − b``: a paired t-interval over seeds, or with a single common seed the two bootstrap intervals over
    test images and whether they overlap (no paired per-image test is possible from the stored metrics)."""
    mean, low, high, n = paired_difference(a.test, b.test)
    if n >= 2:
        return f'{signed_ci(mean, low, high)} points over {n} paired seeds: {_verdict(low, high, n)}'
    seeds = sorted(set(a.test) & set(b.test))
    if not seeds:
        return 'no common seed'
    seed = seeds[0]
    ca, cb = a.ci.get(seed) or [], b.ci.get(seed) or []
    if len(ca) != 2 or len(cb) != 2:
        return f'{mean * 100:+.2f} points (one seed, no interval)'
    overlap = ca[0] <= cb[1] and cb[0] <= ca[1]
    return (f'{mean * 100:+.2f} points, one seed: {_pct(ca[0])}-{_pct(ca[1])} vs {_pct(cb[0])}-{_pct(cb[1])} '
            f'(bootstrap 95% CIs over test images) {"overlap: no clear difference" if overlap else "do not overlap"}')


def every_ordering_vs(cells: list[Cell], reference: Cell, reference_title: str) -> str:
    """Every ordering of ``cells`` against ``reference``, paired over seeds: how many intervals lie above 0, below 0
    or contain it. The unselected view beside the chosen-on-val comparison (a best-on-val ordering may owe its rank
    to noise); the intervals are not corrected for the number of comparisons, which the line says."""
    verdicts: dict[str, list[str]] = {'better': [], 'worse': [], 'none': [], 'unpaired': []}
    for cell in sorted(cells, key=lambda c: c.label):
        mean, low, high, n = paired_difference(cell.test, reference.test)
        kind = _verdict_kind(low, high, n)
        if kind in ('better', 'worse'):
            verdicts[kind].append(f'{cell.label} {signed_ci(mean, low, high)}')
        else:
            verdicts['none' if kind == 'none' else 'unpaired'].append(cell.label)
    parts = [f'CI {side} 0: {len(verdicts[kind])}' + (f' ({"; ".join(verdicts[kind])})' if verdicts[kind] else '')
             for side, kind in (('above', 'better'), ('below', 'worse'))]
    parts.append(f'CI contains 0: {len(verdicts["none"])}')
    if verdicts['unpaired']:
        parts.append(f'fewer than {MIN_SEEDS_FOR_VERDICT} paired seeds, no verdict: {len(verdicts["unpaired"])}')
    return (f'- Every multi-task ordering vs {reference_title} (paired 95% CIs over seeds, points; not corrected '
            f'for the {len(cells)} comparisons): ' + '; '.join(parts) + '.')


def findings(runs: list[dict], protocol: str) -> list[str]:
    """Computed statements for one board: best multi-task ordering (chosen on val) vs scratch and vs the best single
    task (chosen on val), with paired 95 % CIs over seeds; and the mean gain by curriculum label."""
    headline, cells = board_cells(runs, protocol)
    multi = [c for c in cells.values() if len(c.order) >= 2 and not c.baseline]
    single = [c for c in cells.values() if len(c.order) == 1 and not c.baseline]
    chosen = select_on_val(runs, protocol)
    scratch, best_single = chosen['scratch'], chosen['best_single']
    lines = []
    if multi:
        best = chosen['best_multi']
        lines.append(f'- Best multi-task ordering (highest mean validation {headline}): **{best.label}**, test '
                     f'{percent_with_ci(*mean_t_interval(list(best.test.values())))} over {len(best.test)} seed(s).')
        if scratch:
            lines.append(f'  - vs from scratch ({percent_with_ci(*mean_t_interval(list(scratch.test.values())))}): '
                         f'{_compare(best, scratch)}.')
        if single:
            interval = percent_with_ci(*mean_t_interval(list(best_single.test.values())))
            lines.append(f'  - vs the best single task, **{best_single.label}** ({interval}): '
                         f'{_compare(best, best_single)}.')
    if single and scratch:
        lines.append(f'- Best single task ({best_single.label}, chosen on val) vs from scratch: '
                     f'{_compare(best_single, scratch)}.')
    if multi and scratch:
        lines.append(every_ordering_vs(multi, scratch, 'from scratch'))
    if multi and single:
        lines.append(every_ordering_vs(multi, best_single,
                                       f'the best single task ({best_single.label}, chosen on val)'))
    scores = {c.order[0]: c.test_mean() for c in single}
    by_label: dict[str, list[float]] = {}
    for cell in multi:
        first = cells.get(cell.order[0])
        label = curriculum_label(cell.order, scores)
        if first is None or label == '-':
            continue
        by_label.setdefault(label, []).append(cell.test_mean() - first.test_mean())
    if by_label:
        parts = [f'{label}: {np.mean(gains) * 100:+.2f} over {len(gains)} ordering(s)'
                 for label, gains in sorted(by_label.items())]
        lines.append('- Mean gain of a multi-task ordering over its first task alone, by curriculum label: '
                     + '; '.join(parts) + '.')
    if multi:
        lines.append(curriculum_hypothesis_line(curriculum_gains(cells, scores)))
    spread = spread_and_selection_line(list(cells.values()), chosen.get('best_multi'))
    if spread:
        lines.append(spread)
    return lines


# --- the report ------------------------------------------------------------------------------------------------

def _experiment_runs(results_dir: str) -> dict[str, list[dict]]:
    from .results import read_jsonl

    out = {}
    for path in sorted(glob.glob(os.path.join(results_dir, '*.jsonl'))):
        runs = read_jsonl(path)
        if runs:  # an empty export (a study stopped before its first run) is a study not run yet
            out[os.path.splitext(os.path.basename(path))[0]] = runs
    return out


def _latest(runs: list[dict]) -> dict:
    """The most recently created run (its config states the study as last planned)."""
    return max(runs, key=lambda r: str(r.get('created') or ''))


def _setup_lines(name: str, runs: list[dict]) -> list[str]:
    config = _latest(runs).get('config') or {}
    study = config.get('study') or {}
    epochs = {task: (cfg or {}).get('epochs') for task, cfg in sorted((config.get('tasks') or {}).items())}
    used = set()
    for run in runs:
        for stage in run.get('stages', []):
            epochs[stage['task']] = stage['epochs']
            used.add(stage['task'])
    planned = {task.strip() for order in study.get('orders') or []
               for task in (order.split(',') if isinstance(order, str) else order)}
    # the study's own tasks: a config's tasks: section also carries every recipe's defaults
    tasks = sorted(task for task in epochs if task in planned | used or not planned)
    devices = sorted({r.get('device', '?') for r in runs})
    versions = runs[-1].get('versions') or {}
    evaluation = config.get('evaluation') or {}
    return [
        f'- Command: `python tools/study.py run configs/experiments/{name}.yaml` (then `python tools/study.py '
        'render`).',
        f'- Data: `{config.get("dataset")}` at `{config.get("data_root")}`, {config.get("image_size")} px; '
        f'downstream `{runs[0].get("downstream_dataset")}`; split {runs[0].get("split")}.',
        f'- Backbone: {config.get("backbone")}; stage epochs: '
        + ', '.join(f'{t} {epochs[t]}' for t in tasks) + f'; LR-search trials per stage: '
        f'{(config.get("lr_search") or {}).get("trials")}.',
        f'- Protocols: {", ".join(evaluation.get("protocols") or [])}; fine-tuning: {_finetune_budget(evaluation)}; '
        f'seeds planned: {study.get("seeds")}; '
        f'label fractions planned: {study.get("label_fractions")}.',
        f'- Stored runs: {len(runs)}; distinct stages: {len(distinct_stages(runs))} (their compute: "Compute per '
        f'row" below); device(s): {", ".join(devices)}; torch {versions.get("torch")}, '
        f'mmpretrain {versions.get("mmpretrain")}, {versions.get("platform")}.',
        precision_line(runs),
    ]


def precision_line(runs: list[dict]) -> str:
    """The training precisions a study's stored runs used, counted per distinct stage and per run (downstream
    evaluation): a study resumed across machines can mix them (``amp: auto`` trains in bf16 only where the CPU
    or GPU has it), and a reader comparing rows needs to know."""
    def counts(records) -> str:
        tally: dict[str, int] = {}
        for record in records:
            used = (record.get('precision') or {}).get('used') or 'not recorded'
            tally[used] = tally.get(used, 0) + 1
        return ', '.join(f'{used} {n}' for used, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))

    stages = distinct_stages(runs)
    text = f'- Training precision: downstream runs {counts(runs)}'
    if stages:
        text += f'; distinct stages {counts(stages.values())}'
    if len({(r.get('precision') or {}).get('used') for r in runs}) > 1:
        text += ' (mixed: the study ran on machines with and without bf16; each run\'s precision is in its record)'
    return text + '.'


def _finetune_budget(evaluation: dict) -> str:
    """The fine-tuning budget as configured: a step budget (evaluation.finetune.steps) or epochs."""
    budget = evaluation.get('finetune') or {}
    if budget.get('steps'):
        every = budget.get('eval_every') or max(1, int(budget['steps']) // 20)
        patience = budget.get('patience')
        text = (f'{budget["steps"]} steps whatever the label fraction, val every {every} steps'
                + (f', early stop after {patience} evaluations without gain' if patience else ''))
    else:
        text = f'{(evaluation.get("epochs") or {}).get("finetune", "default")} epochs'
    return text + (f', learning rate {budget["lr"]:g}' if budget.get('lr') else '')


def _missing_cells(runs: list[dict]) -> list[str]:
    study = (_latest(runs).get('config') or {}).get('study') or {}
    wanted = set()
    for fraction in study.get('label_fractions', [1.0]):
        for seed in study.get('seeds', [0]):
            for order in list(study.get('orders', [])) + list(study.get('baselines', ['none'])):
                wanted.add((str(order), int(seed), float(fraction)))
    have = {(run_label(r), int(r['seed']), float(r.get('label_fraction', 1.0))) for r in runs}
    missing = sorted(wanted - have, key=lambda x: (x[2], x[0], x[1]))
    return [f'{order} seed {seed} fraction {fraction:g}' for order, seed, fraction in missing]


#: the three label-efficiency series: legend text, x offset factor (so error bars do not hide each other), style
_SERIES_STYLE = {
    'scratch': ('from scratch (none)', 1.0, dict(color='black', linestyle='--', marker='s')),
    'best_single': ('best single task (chosen on val)', 0.94, dict(color='#1f77b4', marker='o')),
    'best_multi': ('best multi-task ordering (chosen on val)', 1.06, dict(color='#d62728', marker='^')),
}


def _label_efficiency_panel(axis, runs: list[dict], name: str, protocol: str) -> None:
    """Draw the three series of one experiment × protocol on ``axis``; the two "best" series' points carry the
    label of the ordering chosen (single task to the left, multi-task ordering to the right)."""
    series = label_efficiency_series(runs, protocol)
    fractions = sorted({p.fraction for points in series.values() for p in points})
    for key in SERIES:
        legend, shift, style = _SERIES_STYLE[key]
        points = series[key]
        if not points:
            continue
        xs, ys = [p.fraction * shift for p in points], [p.mean * 100 for p in points]
        errors = [[(p.mean - p.low) * 100 if math.isfinite(p.low) else 0.0 for p in points],
                  [(p.high - p.mean) * 100 if math.isfinite(p.high) else 0.0 for p in points]]
        axis.errorbar(xs, ys, yerr=errors, label=legend, capsize=3, linewidth=1.5, markersize=4, **style)
        if key != 'scratch':
            left = key == 'best_single'
            for point, x, y in zip(points, xs, ys):
                axis.annotate(point.label, (x, y), xytext=(-5 if left else 5, 0), textcoords='offset points',
                              ha='right' if left else 'left', va='center', fontsize=6, color=style['color'])
    axis.set_xscale('log')
    if fractions:
        axis.set_xlim(fractions[0] / 2.5, fractions[-1] * 2.5)
        axis.set_xticks(fractions, [f'{f:g}' for f in fractions])
        axis.minorticks_off()
    axis.set_xlabel('label fraction of the training split (log scale)')
    axis.set_ylabel(f'test {next(protocol_runs(runs, protocol))[2]} (%)')
    axis.set_title(f'{name} · {protocol}: mean and 95% CI over seeds', fontsize=9)
    axis.legend(fontsize=7)


def _plot_label_efficiency(experiments: dict[str, list[dict]], path: str) -> bool:
    """One panel per experiment × protocol with two or more label fractions (two panels a row): test headline
    against label fraction for scratch, the best single task and the best multi-task ordering, each chosen on val
    at each fraction."""
    panels = []
    for name, runs in experiments.items():
        if len({float(r.get('label_fraction', 1.0)) for r in runs}) >= 2:
            panels.extend((name, p) for p in sorted({p for r in runs for p in r.get('downstream', {})}))
    if not panels:
        return False
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    columns = min(2, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.5 * columns, 4.6 * rows), squeeze=False)
    for axis, (name, protocol) in zip(axes.flat, panels):
        _label_efficiency_panel(axis, experiments[name], name, protocol)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={'Software': None})
    plt.close(fig)
    return True


def _experiment_files(experiments_dir: str | None) -> list[tuple[str, Study]]:
    """``(path relative to the repository, study)`` of every experiment file in ``experiments_dir``."""
    if not experiments_dir:
        return []
    root = os.path.dirname(os.path.dirname(os.path.abspath(experiments_dir)))  # the repository
    return [(os.path.relpath(os.path.abspath(path), root), load_experiment(path).study)
            for path in sorted(glob.glob(os.path.join(experiments_dir, '*.yaml')))]


def _superseded(files: list[tuple[str, Study]], names: set[str]) -> dict[str, tuple[str, str]]:
    """``name -> (successor, why)`` for the experiment files that name a successor (``study.superseded_by``); a
    successor that no experiment file or stored study defines is a plan error."""
    known = names | {study.name for _, study in files}
    out = {}
    for path, study in files:
        if study.superseded_by:
            if study.superseded_by not in known:
                raise PlanError(f'{path}: study.superseded_by names {study.superseded_by!r}, which no experiment '
                                'file or stored study defines')
            out[study.name] = (study.superseded_by, study.superseded_why)
    return out


def _experiment_section(results_dir: str, name: str, runs: list[dict]) -> list[str]:
    """One study's part of the report below its heading: set-up, findings, the source study's table,
    leaderboards, compute and external evaluations."""
    parts = ['### Set-up', '', *_setup_lines(name, runs), '']
    missing = _missing_cells(runs)
    if missing:
        parts += [f'**Incomplete:** {len(missing)} planned run(s) are not stored yet: '
                  + ', '.join(missing[:12]) + (' …' if len(missing) > 12 else '') + '.', '']
    groups: dict[str, list[dict]] = {}
    for run in runs:
        groups.setdefault(comparison_key(run), []).append(run)
    parts += ['### Findings', '']
    for key in sorted(groups, key=lambda k: -float(groups[k][0].get('label_fraction', 1.0))):
        group = groups[key]
        fraction = float(group[0].get('label_fraction', 1.0))
        for protocol in sorted({p for r in group for p in r.get('downstream', {})}):
            parts.append(f'**{protocol}, label fraction {fraction:g}**')
            parts.append('')
            parts += findings(group, protocol) or ['- not enough runs for a comparison yet.']
            parts.append('')
    evaluation = (_latest(runs).get('config') or {}).get('evaluation') or {}
    parts += source_section(name, runs, _finetune_budget(evaluation))
    boards = render_markdown(build_leaderboards(runs)).replace('### ', '#### ')
    parts += ['### Leaderboards', '', boards.rstrip('\n'), '', *compute_table(runs)]
    parts += external_section(results_dir, name)
    return parts


def render_report(results_dir: str, out_dir: str, discussion_path: str | None = None,
                  experiments_dir: str | None = None) -> str:
    """The text of ``docs/results.md`` from the exports in ``results_dir``; the label-efficiency PNG is written to
    ``out_dir``; ``discussion_path`` (default ``<out_dir>/results_discussion.md``) is included when it exists;
    experiments of ``experiments_dir`` without stored runs are listed as not run yet."""
    experiments = _experiment_runs(results_dir)
    if not experiments:
        raise PlanError(f'no stored study results (*.jsonl) in {results_dir}')
    parts = ['# Results: does curricular SSL beat single tasks and training from scratch?', '',
             '<!-- Generated by `python tools/study.py render` from docs/results/*.jsonl; do not edit by hand. '
             'The discussion comes from docs/results_discussion.md. -->', '',
             'Every number below was measured by this engine on the data named in each section and is re-rendered '
             'from the stored runs in `docs/results/`. Balanced accuracy is the headline metric (macro recall over '
             'the classes present in the test split); 95% confidence intervals are Student-t over seeds (or a '
             'bootstrap over test images for a single seed). The "best multi-task ordering" and the "best single '
             'task" are chosen on the **validation** split, then reported on the test split, so the comparison is '
             'not tuned on test.', '']
    files = _experiment_files(experiments_dir)
    superseded = _superseded(files, set(experiments))
    # current studies (stored, then planned) first; a superseded one follows them, marked, and stays out of the
    # label-efficiency plot
    current = {name: runs for name, runs in experiments.items() if name not in superseded}
    for name, runs in current.items():
        parts += [f'## {name}', '', *_experiment_section(results_dir, name, runs)]
    for path, study in files:
        if study.name not in experiments:
            parts += [f'## {study.name}', '', f'**Not run yet.** Planned in `{path}`; run it with '
                      f'`python tools/study.py run {path}`.', '']
    for name, (successor, why) in superseded.items():
        if name in experiments:
            parts += [f'## {name}', '',
                      f'**Superseded** by [`{successor}`](#{successor.replace(".", "")}) and kept for the record'
                      + (f': {why}' if why else '.'), '', *_experiment_section(results_dir, name, experiments[name])]
    if _plot_label_efficiency(current, os.path.join(out_dir, PLOT_FILE)):
        parts += ['## Label efficiency', '', f'![label efficiency]({PLOT_FILE})', '',
                  'Test headline metric (mean over seeds, error bars: Student-t 95% CI) against the labeled '
                  'fraction of the training split (drawn per class; log scale), one panel per experiment and '
                  'protocol: from scratch (dashed black), the best single task and the best multi-task ordering, '
                  'each chosen on the validation split at each fraction (its label is written by each point; '
                  'the two "best" series are drawn slightly left and right of their fraction so the error bars '
                  'stay apart).', '']
    parts += ['## Reference numbers from the literature (quoted, not measured here)', '']
    for title, rows in REFERENCES:
        parts.append(f'- {title}: ' + '; '.join(f'{what} {value}' for what, value in rows) + '.')
    parts.append('')
    discussion = discussion_path or os.path.join(out_dir, DISCUSSION_FILE)
    if os.path.exists(discussion):
        with open(discussion) as handle:
            parts += ['## Discussion', '', handle.read().strip(), '']
    return '\n'.join(parts)
