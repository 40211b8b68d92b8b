"""The online kNN monitor: how good a stage's backbone is as a frozen feature extractor, while the stage trains.

Pretext losses do not say whether a representation improves (a loss can fall while features get worse for the
task that matters). The monitor answers that directly: a weighted kNN (k = 20, the downstream kNN protocol of
:mod:`benchmarks.protocols.knn`, eval-mode features) fitted on labeled *training* images and scored as balanced
accuracy on the *validation* split. Labels are read only here, for monitoring and for the LR search's ``knn``
objective; they never reach a pretext task, and the test split is never touched.

The labeled memory respects ``--label-fraction`` (a run that claims to use 1 % of the labels does not select its
learning rate with 100 % of them) and both sets are capped at ``max_images`` (a seeded, class-stratified subset),
which bounds the monitor's cost: one forward pass over at most ``2 * max_images`` images per monitored epoch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

DEFAULT_K = 20
DEFAULT_MAX_IMAGES = 1000


def capped_subset(indices: np.ndarray, labels: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """At most ``cap`` of ``indices``, drawn per class in proportion (at least one per class present), seeded;
    sorted. All of them when there are no more than ``cap``."""
    indices = np.asarray(indices)
    if cap <= 0 or len(indices) <= cap:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    keys = np.asarray(labels)[indices]
    if keys.ndim == 2:  # multi-label: stratify by the first positive label (-1: none)
        positive = np.nan_to_num(keys) > 0
        keys = np.where(positive.any(1), positive.argmax(1), -1)
    chosen = []
    classes, counts = np.unique(keys, return_counts=True)
    for cls, count in zip(classes, counts):
        members = indices[keys == cls]
        take = max(1, int(round(cap * count / len(indices))))
        chosen.append(rng.choice(members, size=min(take, len(members)), replace=False))
    out = np.concatenate(chosen)
    if len(out) > cap:
        out = rng.choice(out, size=cap, replace=False)
    return np.sort(out)


@dataclass
class KnnMonitor:
    """Labeled train images (the kNN memory) and validation images (the queries), uint8 NHWC."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    k: int = DEFAULT_K
    device: str = 'cpu'

    @classmethod
    def from_dataset(cls, dataset, label_fraction: float = 1.0, seed: int = 0,
                     max_images: int = DEFAULT_MAX_IMAGES, k: int = DEFAULT_K, device: str = 'cpu') -> 'KnnMonitor':
        """The monitor of a :class:`benchmarks.datasets.PreparedDataset` (its train split at ``label_fraction``,
        its val split), each capped at ``max_images``."""
        train = capped_subset(dataset.train_indices(label_fraction, seed), dataset.labels, max_images, seed)
        val = capped_subset(dataset.indices('val'), dataset.labels, max_images, seed + 1)
        return cls(train_images=dataset.images[train], train_labels=dataset.labels[train],
                   val_images=dataset.images[val], val_labels=dataset.labels[val], k=int(k), device=device)

    def num_classes(self) -> int | None:
        labels = np.asarray(self.train_labels)
        if labels.ndim == 2:
            return None
        return int(max(labels.max(), np.asarray(self.val_labels).max())) + 1

    def score(self, backbone) -> float:
        """kNN balanced accuracy on val of ``backbone``'s pooled features (eval mode; the backbone's mode and
        device are restored)."""
        from benchmarks.protocols.features import extract_features
        from benchmarks.protocols.knn import knn_score

        train = extract_features(backbone, self.train_images, self.device)
        val = extract_features(backbone, self.val_images, self.device)
        return float(knn_score(train, self.train_labels, val, self.val_labels, k=self.k,
                               num_classes=self.num_classes(), device=self.device))

    def timed_score(self, backbone) -> tuple[float, float]:
        """(score, seconds)."""
        started = time.perf_counter()
        value = self.score(backbone)
        return value, time.perf_counter() - started
