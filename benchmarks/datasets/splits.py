"""Deterministic train/val/test splits and label fractions.

Splits are stratified by class and grouped by patient / lesion when a group id exists: every group lands in exactly
one split. Label fractions are drawn per class from the training split, so a 1 % subset still holds every class
that has at least one training image.
"""
from __future__ import annotations

import numpy as np

from .base import SPLIT_NAMES

DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


def stratum_of(labels: np.ndarray) -> np.ndarray:
    """One stratum id per image: the class, or for multi-label rows the first positive class (-1 if none)."""
    if labels.ndim == 1:
        return labels.astype(np.int64)
    positive = np.nan_to_num(labels, nan=0.0) > 0.5
    first = np.where(positive.any(1), positive.argmax(1), -1)
    return first.astype(np.int64)


def make_splits(labels: np.ndarray, groups: np.ndarray | None, seed: int,
                fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Assign 'train' / 'val' / 'test' to every image (an ``(N,)`` str array).

    Groups (or single images when ``groups`` is None) are shuffled with ``seed`` inside each stratum (the stratum of
    a group is its most common image stratum), then cut by cumulative image count at the requested fractions.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or (fractions < 0).any() or fractions.sum() <= 0:
        raise ValueError(f'split fractions must be three non-negative numbers, got {fractions.tolist()}')
    fractions = fractions / fractions.sum()
    count = len(labels)
    groups = np.arange(count).astype(str) if groups is None else np.asarray(groups).astype(str)
    strata = stratum_of(np.asarray(labels))
    group_ids, group_index = np.unique(groups, return_inverse=True)
    group_sizes = np.bincount(group_index, minlength=len(group_ids))
    # Stratum of a group: its most common image stratum (ties → smallest id), computed without Python loops.
    offset = strata.min()
    table = np.zeros((len(group_ids), strata.max() - offset + 1), dtype=np.int64)
    np.add.at(table, (group_index, strata - offset), 1)
    group_stratum = table.argmax(1) + offset
    rng = np.random.RandomState(seed)
    group_split = np.empty(len(group_ids), dtype=np.int64)
    bounds = np.cumsum(fractions)
    for stratum in np.unique(group_stratum):
        members = np.flatnonzero(group_stratum == stratum)
        members = members[rng.permutation(len(members))]
        sizes = group_sizes[members]
        # position of each group's centre along the stratum's image mass decides its split
        centre = (np.cumsum(sizes) - sizes / 2.0) / sizes.sum()
        group_split[members] = np.searchsorted(bounds, centre, side='right').clip(0, 2)
    return np.asarray(SPLIT_NAMES)[group_split[group_index]]


def label_fraction_subset(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-stratified subset of ``indices`` holding ``fraction`` of each class (at least one image per class
    present). Multi-label rows are stratified by their first positive class. Returns sorted indices."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f'label fraction must be in (0, 1], got {fraction}')
    indices = np.asarray(indices)
    if fraction >= 1.0:
        return np.sort(indices)
    strata = stratum_of(np.asarray(labels)[indices])
    rng = np.random.RandomState(seed + 7919)
    chosen = []
    for stratum in np.unique(strata):
        members = indices[strata == stratum]
        take = max(1, int(round(fraction * len(members))))
        chosen.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(chosen))
