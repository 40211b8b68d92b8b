"""A leaderboard row fusing the K best orderings (``tools/leaderboard.py --fuse-top K``).

Among the pretrained orderings of one board (comparable runs, one protocol; at most ``--fuse-max-len`` tasks long
when given), the K with the highest mean validation headline over seeds are chosen (never on test). For every seed
that all K were run with, one run fuses their final backbones with protocol dvme: the best ordering is run again
(its stages come from the cache) with ``evaluation.protocols: [dvme]`` and ``evaluation.fuse`` naming the other K-1
runs (their sweep folders, or their last stage folders when the sweep folder holds another run), in ``<work
root>/sweeps/dvme[a + b + c]/seed<N>``. A fused run that the results store already holds is not run again. The fused
runs' dvme metrics become one row, ``dvme[a + b + c]``, of the board, with a footer line giving how it was made and
the mean attention weight of each source.
"""
from __future__ import annotations

import copy
import json
import os

import numpy as np

from .cache import stage_dir
from .errors import CheckpointError, PlanError
from .fusion import final_backbone_file
from .leaderboard import METRICS, Leaderboard, Row, comparison_key, dvme_label, nan_low, run_label, sweep_work_dir
from .study_cells import board_cells


def top_orderings(runs: list[dict], protocol: str, k: int, max_len: int | None = None) -> list[str]:
    """The labels of the ``k`` pretrained orderings (no baseline, no init; at most ``max_len`` tasks long when
    given) of ``runs`` with the highest mean validation headline under ``protocol``, best first; a PlanError when
    there are fewer."""
    _, cells = board_cells(runs, protocol)
    candidates = [cell for cell in cells.values()
                  if not cell.baseline and (max_len is None or len(cell.order) <= max_len)]
    if len(candidates) < k:
        longest = '' if max_len is None else f' of at most {max_len} task(s)'
        raise PlanError(f'--fuse-top {k}: only {len(candidates)} pretrained ordering(s){longest} were evaluated '
                        f'with {protocol}')
    ranked = sorted(candidates, key=lambda cell: (-nan_low(cell.val_mean()), cell.label))
    return [cell.label for cell in ranked[:k]]


def run_folder(run: dict, work_root: str) -> str:
    """What ``--fuse`` names for a stored run: its sweep folder when that holds this very run (same ordering and
    seed), else the folder of its last stage in the cache (a CheckpointError when the final backbone is gone)."""
    folder = sweep_work_dir(work_root, run_label(run), int(run['seed']), float(run.get('label_fraction', 1.0)))
    try:
        with open(os.path.join(folder, 'result.json')) as handle:
            stored = json.load(handle)
        if list(stored.get('order') or []) == list(run['order']) and int(stored.get('seed', -1)) == int(run['seed']):
            final_backbone_file(stored, folder)
            return folder
    except (OSError, ValueError):
        pass
    return os.path.dirname(final_backbone_file(run, run_label(run), work_root))


def fused_jobs(runs: list[dict], protocol: str, k: int, work_root: str, max_len: int | None = None) \
        -> tuple[list[str], list[dict]]:
    """The chosen labels (:func:`top_orderings`) and one job per seed they share: ``{'seed', 'order', 'init',
    'config', 'work_dir', 'sources', 'missing'}``, the config being the best ordering's stored one with protocol dvme
    fusing the others, ``sources`` the names a stored fused run may give each source (:func:`_source_names`).
    ``missing`` is the CheckpointError of a backbone not found under ``work_root`` (None when all
    are there): such a job can only be answered from a stored fused run (:func:`stored_fused_run`)."""
    labels = top_orderings(runs, protocol, k, max_len)
    by_seed: dict[int, dict[str, dict]] = {}
    for run in runs:
        if (run.get('downstream') or {}).get(protocol):
            by_seed.setdefault(int(run['seed']), {})[run_label(run)] = run
    jobs = []
    for seed in sorted(by_seed):
        chosen = by_seed[seed]
        if not all(label in chosen for label in labels):
            continue
        first = chosen[labels[0]]
        config = copy.deepcopy(first['config'])
        evaluation = config.setdefault('evaluation', {})
        evaluation['protocols'] = ['dvme']
        missing = None
        try:
            if first['stages']:
                final_backbone_file(first, labels[0], work_root)   # its stages must come from the cache
            evaluation['fuse'] = [run_folder(chosen[label], work_root) for label in labels[1:]]
        except CheckpointError as exc:
            missing, evaluation['fuse'] = exc, list(labels[1:])
        name = dvme_label(labels)
        jobs.append({'seed': seed, 'order': ','.join(first['order']), 'init': first.get('init'), 'config': config,
                     'work_dir': sweep_work_dir(work_root, name, seed, float(first.get('label_fraction', 1.0))),
                     'sources': [_source_names(chosen[label], label) for label in labels], 'missing': missing})
    if not jobs:
        raise PlanError(f'--fuse-top {k}: no seed has runs of all of {", ".join(labels)}')
    return labels, jobs


def _source_names(run: dict, label: str) -> list[str]:
    """The names a fused run may have recorded for source ``run``: its ordering label (a run folder), or its last
    stage folder's name (:func:`run_folder` falls back to that folder when the sweep folder holds another run)."""
    names = [label]
    last = run['stages'][-1] if run.get('stages') else {}
    if last.get('task') and last.get('key'):
        names.append(os.path.basename(stage_dir('', last['task'], last['key'])))
    return names


def _without_fuse_paths(config: dict) -> dict:
    """``config`` without ``evaluation.fuse``: where the fused backbones lay is not part of what was fused (the
    sources are matched by their labels)."""
    evaluation = {key: value for key, value in (config.get('evaluation') or {}).items() if key != 'fuse'}
    return {**config, 'evaluation': evaluation}


def stored_fused_run(job: dict, results: list[dict]) -> dict | None:
    """The stored result of ``job``: same config (but the seed and the fused folders' paths), same ordering, seed and
    sources; or None. Matching without the paths lets a board be re-rendered from exports where the stage cache
    is absent (a fresh clone)."""
    probe = {'config': _without_fuse_paths(job['config']), 'order': job['order'].split(','), 'init': job['init']}
    key = comparison_key(probe)
    for stored in results:
        dvme = (stored.get('downstream') or {}).get('dvme') or {}
        sources = list(dvme.get('sources') or [])
        if (int(stored['seed']) == job['seed'] and len(sources) == len(job['sources'])
                and all(name in names for name, names in zip(sources, job['sources']))
                and run_label(stored) == run_label(probe)
                and comparison_key({'config': _without_fuse_paths(stored.get('config') or {})}) == key):
            return stored
    return None


def add_fused_row(board: Leaderboard, labels: list[str], fused: list[dict], protocol: str) -> Row:
    """Append the row of the fused runs (their dvme metrics) to ``board``, re-rank it and add the footer line."""
    label = dvme_label(labels)   # the chosen orderings, even where a run named a stage folder
    row = Row(label, (), baseline=False)
    attention: dict[str, list[float]] = {}
    for result in sorted(fused, key=lambda r: r['seed']):
        metrics = result['downstream']['dvme']
        for metric in METRICS:
            row.values.setdefault(metric, []).append(metrics.get(metric))
        row.cis.append(metrics.get(f'{board.headline}_ci') or [])
        row.seeds.append(result['seed'])
        as_label = dict(zip(metrics.get('sources') or [], labels))   # a stage folder's name -> its ordering
        for name, weight in (metrics.get('attention') or {}).items():
            attention.setdefault(as_label.get(name, name), []).append(float(weight))
    board.rows.append(row)
    board.rows.sort(key=lambda r: -nan_low(r.mean(board.headline)))
    # in the order of the fused label, so a board rendered from a (key-sorted) JSON Lines export reads the same
    rank = {name: index for index, name in enumerate(labels)}
    names = sorted(attention, key=lambda name: rank.get(name, len(rank)))
    weights = ', '.join(f'{name} {np.mean(attention[name]):.2f}' for name in names)
    board.notes.append(f'{label}: the {len(labels)} orderings with the highest mean val {board.headline} under '
                       f'{protocol} (chosen on val), their final backbones frozen and fused by protocol dvme, per '
                       f'seed; mean attention weight on test: {weights}.')
    return row
