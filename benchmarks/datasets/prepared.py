"""The engine's view of a dataset: decoded pixels at one size, splits, label fractions, an unlabeled view.

``load_dataset(name, root, image_size, seed)`` is the single entry point used by the curriculum and the
benchmarks. Labels never reach a pretext task: pretext stages receive :class:`UnlabeledImages` only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .base import SPLIT_NAMES, ImageRecords
from .cache import decoded_images, resize_uint8
from .errors import DatasetError, EmptySplitError, TooFewClassesError
from .registry import load_records
from .splits import DEFAULT_FRACTIONS, label_fraction_subset, make_splits


@dataclass(frozen=True)
class UnlabeledImages:
    """Pixels only: what a pretext task may see. ``images`` is ``(N, S, S, C)`` uint8."""

    images: np.ndarray
    fingerprint: str

    def __len__(self) -> int:
        return len(self.images)


class PreparedDataset:
    """A dataset decoded at ``image_size`` with a deterministic split."""

    def __init__(self, records: ImageRecords, image_size: int, seed: int = 0, cache_dir: str | None = None,
                 fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, stratify: bool = True):
        """``stratify=False`` draws a split that the layout does not publish without looking at the labels
        (grouped, not stratified): the split of an unlabelled target domain, whose labels may be read only for the
        final test metrics."""
        self.records = records
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.cache_dir = cache_dir
        self.images = decoded_images(records.source, self.image_size, cache_dir)
        strata = records.labels if stratify else np.zeros(len(records), dtype=np.int64)
        if records.split is not None:
            self.split = records.split.copy()
            self.split_origin = 'published'
            if not (self.split == 'val').any() and (self.split == 'train').any():
                # a published train/test split without val: carve val from train (grouped, stratified, 10 %)
                train = np.flatnonzero(self.split == 'train')
                groups = None if records.groups is None else records.groups[train]
                carved = make_splits(strata[train], groups, seed, (0.9, 0.1, 0.0))
                self.split[train[carved == 'val']] = 'val'
                self.split_origin = f'published (val carved from train, seed {seed}' \
                                    f'{"" if stratify else ", not stratified"})'
        else:
            self.split = make_splits(strata, records.groups, seed, fractions)
            self.split_origin = f'generated (seed {seed}, {"grouped, " if records.groups is not None else ""}' \
                                f'{"stratified" if stratify else "not stratified"} ' \
                                f'{"/".join(str(f) for f in fractions)})'
        digest = hashlib.sha256()
        digest.update(f'{records.name}:{self.image_size}:{records.source.fingerprint()}'.encode())
        digest.update(np.ascontiguousarray(records.labels).tobytes())
        digest.update('|'.join(self.split.tolist()).encode())
        self.fingerprint = digest.hexdigest()[:16]

    # -- metadata -------------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.records.name

    @property
    def class_names(self) -> list[str]:
        return self.records.class_names

    @property
    def num_classes(self) -> int:
        return self.records.num_classes

    @property
    def multilabel(self) -> bool:
        return self.records.multilabel

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels

    @property
    def channels(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    # -- splits ---------------------------------------------------------------------------------------------
    def indices(self, split: str) -> np.ndarray:
        """Indices of one split; :class:`EmptySplitError` when it is empty."""
        found = np.flatnonzero(self.split == split)
        if len(found) == 0:
            raise EmptySplitError(f'{self.name}: split {split!r} has no images')
        return found

    def train_indices(self, label_fraction: float = 1.0, seed: int | None = None) -> np.ndarray:
        """Training indices subsampled per class to ``label_fraction``."""
        subset = label_fraction_subset(self.indices('train'), self.labels, label_fraction,
                                       self.seed if seed is None else seed)
        if len(subset) == 0:
            raise EmptySplitError(f'{self.name}: label fraction {label_fraction} of train is empty')
        return subset

    def check_classes(self, label_fraction: float = 1.0, seed: int | None = None) -> None:
        """The labels can train and score a classifier: the labeled training images (at ``label_fraction``) hold
        at least two classes, and every class with val or test images has at least one of them (single-label);
        at least two classes with positive training labels (multi-label). :class:`TooFewClassesError` otherwise."""
        train = self.train_indices(label_fraction, seed)
        where = f'{self.name} ({self.records.root})'
        fraction = '' if label_fraction >= 1.0 else f' at label fraction {label_fraction:g}'
        if self.multilabel:
            positive = np.nan_to_num(self.labels[train], nan=0.0) > 0.5
            present = [self.class_names[c] for c in np.flatnonzero(positive.any(0))]
            if len(present) < 2:
                raise TooFewClassesError(f'{where}: the training images{fraction} have positive labels for '
                                         f'{len(present)} class(es) {present}; at least 2 are needed')
            return
        present = sorted(set(np.unique(self.labels[train]).tolist()))
        if len(present) < 2:
            names = [self.class_names[c] for c in present]
            raise TooFewClassesError(f'{where}: the training images{fraction} hold {len(present)} class '
                                     f'{names}; a classifier needs at least 2 classes')
        for split in ('val', 'test'):
            held = set(np.unique(self.labels[self.split == split]).tolist())
            missing = sorted(held - set(present))
            if missing:
                raise TooFewClassesError(f'{where}: class {self.class_names[missing[0]]!r} has {split} images but '
                                         f'no labeled training image{fraction}')

    # -- group ids (patient / lesion) ---------------------------------------------------------------------------
    @property
    def has_groups(self) -> bool:
        """Whether the layout gives every image a group id (patient or lesion)."""
        return self.records.groups is not None

    def group_ids(self, split: str = 'train') -> np.ndarray:
        """The int64 group ids of the images of ``split``, aligned with :meth:`unlabeled` (``split``); equal ids in
        the metadata are equal codes in every split. :class:`DatasetError` when the layout has no group ids."""
        if self.records.groups is None:
            raise DatasetError(f'{self.name} ({self.records.root}) has no group ids (patient or lesion)')
        codes = np.unique(self.records.groups, return_inverse=True)[1].astype(np.int64).reshape(-1)
        return codes[self.indices(split)]

    def groups_across_splits(self) -> list[str]:
        """The group ids found in more than one split (sorted; empty when the split is grouped, as generated
        splits always are, or when there are no group ids)."""
        if self.records.groups is None:
            return []
        codes, first = np.unique(self.records.groups, return_inverse=True)
        first = first.reshape(-1)
        split_code = np.select([self.split == name for name in SPLIT_NAMES], range(len(SPLIT_NAMES)))
        table = np.zeros((len(codes), len(SPLIT_NAMES)), dtype=bool)
        table[first, split_code] = True
        return [str(codes[i]) for i in np.flatnonzero(table.sum(1) > 1)]

    def unlabeled(self, split: str = 'train') -> UnlabeledImages:
        """The images of ``split`` without labels, for pretext training."""
        idx = self.indices(split)
        return UnlabeledImages(self.images[idx], f'{self.fingerprint}:{split}')

    def masks(self, indices: np.ndarray) -> list[np.ndarray | None]:
        """ROI masks of ``indices`` resized exactly as their images (nearest neighbour), or None per missing."""
        from .base import FileImageSource

        if self.records.masks is None:
            return [None] * len(indices)
        out = []
        for i in indices:
            path = self.records.masks[int(i)]
            if not path:
                out.append(None)
                continue
            mask = FileImageSource([path], channels=1).decode(0)
            threshold = 0 if mask.max() <= 1 else 127  # masks stored as 0/1 or as 0/255
            out.append(resize_uint8(mask, self.image_size, nearest=True)[..., 0] > threshold)
        return out


def load_dataset(name: str, root: str | None = None, image_size: int = 64, seed: int = 0,
                 cache_dir: str | None = None, stratify: bool = True, **options) -> PreparedDataset:
    """Read ``name`` in its published layout at ``root`` and decode it at ``image_size`` (cached); ``stratify``
    as :class:`PreparedDataset`."""
    return PreparedDataset(load_records(name, root, **options), image_size, seed, cache_dir, stratify=stratify)
