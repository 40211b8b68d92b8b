"""Layout ``chexpert``: CheXpert (e.g. the published ``CheXpert-v1.0-small`` zip).

``root/train.csv`` and ``root/valid.csv`` list images by ``Path`` (``CheXpert-v1.0-small/train/patient00001/
study1/view1_frontal.jpg``), resolved against ``root`` and against its parent (the zip puts the folder name in
front), with the 14 observations as labels: 1.0 positive, 0.0 negative, -1.0 uncertain, blank not mentioned.
Multi-label, grayscale, grouped by patient (``patientNNNNN`` in the path).

Uncertainty policy (option ``uncertain``, default ``'ones'``):

- ``'ones'``  (U-Ones, Irvin et al. 2019): an uncertain label counts as positive;
- ``'zeros'`` (U-Zeros): an uncertain label counts as negative;
- ``'ignore'`` (U-Ignore): an uncertain label is NaN, which metrics and losses skip.

A blank (not mentioned) is a negative under every policy. The applied policy is also written to ``records.notes``.

Split: train.csv → train, with a validation set carved from it by patient (deterministic: ``seed`` option,
default 0, ``val_fraction`` option, default 1/8); valid.csv (the official 234-image validation set, labelled by
radiologists) → test.
"""
from __future__ import annotations

import os
import re

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv
from .errors import DatasetError, MissingFileError, UnknownLabelError
from .layout_helpers import reject_options, require_root
from .registry import register_dataset
from .splits import make_splits

OBSERVATIONS = ['No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity', 'Lung Lesion', 'Edema',
                'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax', 'Pleural Effusion', 'Pleural Other',
                'Fracture', 'Support Devices']
POLICIES = {'ones': 1.0, 'zeros': 0.0, 'ignore': np.nan}
_PATIENT = re.compile(r'(patient\d+)')


@register_dataset('chexpert')
def load_chexpert(root: str | None, uncertain: str = 'ones', seed: int = 0, val_fraction: float = 0.125,
                  **options) -> ImageRecords:
    reject_options('chexpert', options, ('uncertain', 'seed', 'val_fraction'))
    if uncertain not in POLICIES:
        raise DatasetError(f'chexpert: option uncertain must be one of {", ".join(POLICIES)}, got {uncertain!r}')
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f'chexpert: option val_fraction must be in [0, 1), got {val_fraction!r}')
    root = require_root(root, 'chexpert', 'folder holding train.csv and valid.csv, e.g. CheXpert-v1.0-small')
    values = {'1.0': 1.0, '1': 1.0, '0.0': 0.0, '0': 0.0, '': 0.0, '-1.0': POLICIES[uncertain],
              '-1': POLICIES[uncertain]}
    paths, label_rows, split = [], [], []
    resolve = _Resolver(root)
    relative_paths = []
    for file_name, part in (('train.csv', 'train'), ('valid.csv', 'test')):
        csv_path = os.path.join(root, file_name)
        rows = read_csv(csv_path, ['Path'] + OBSERVATIONS)
        for line, row in enumerate(rows, start=2):
            paths.append(resolve(row['Path'], csv_path))
            relative_paths.append(row['Path'])
            try:
                label_rows.append([values[row[c]] for c in OBSERVATIONS])
            except KeyError:
                bad = next(c for c in OBSERVATIONS if row[c] not in values)
                raise UnknownLabelError(f'{csv_path} line {line}: value {row[bad]!r} in column {bad!r} '
                                        f'(expected 1.0, 0.0, -1.0 or blank)') from None
            split.append(part)
    labels = np.asarray(label_rows, dtype=np.float32).reshape(len(paths), len(OBSERVATIONS))
    groups = np.asarray([_patient(p) for p in relative_paths])
    split = np.asarray(split, dtype=object)
    train_idx = np.flatnonzero(split == 'train')
    if len(train_idx) and val_fraction > 0:
        split[train_idx] = make_splits(labels[train_idx], groups[train_idx], seed,
                                       (1.0 - val_fraction, val_fraction, 0.0))
    policy = {'ones': 'U-Ones (uncertain -1 → 1)', 'zeros': 'U-Zeros (uncertain -1 → 0)',
              'ignore': 'U-Ignore (uncertain -1 → NaN, skipped by metrics and losses)'}[uncertain]
    notes = [f'chexpert: uncertainty policy {policy}; blank → 0',
             f'chexpert: train.csv → train/val (val = {val_fraction:g} by patient, seed {seed}); valid.csv → test']
    return ImageRecords(name='chexpert', root=root, class_names=list(OBSERVATIONS), labels=labels,
                        source=FileImageSource(paths, channels=1), multilabel=True, groups=groups,
                        split=split.astype(str), notes=notes)


class _Resolver:
    """Resolve CSV paths against root, root's parent, or root with the leading folder name dropped (a renamed
    root). The strategy that worked last is tried first, so a whole CSV costs about one ``stat`` per row."""

    def __init__(self, root: str):
        self.root = root
        self.order = [self._in_root, self._in_parent, self._in_root_without_prefix]

    def _in_root(self, relative: str) -> str:
        return os.path.join(self.root, relative)

    def _in_parent(self, relative: str) -> str:
        return os.path.join(os.path.dirname(self.root), relative)

    def _in_root_without_prefix(self, relative: str) -> str:
        return os.path.join(self.root, relative.replace('\\', '/').partition('/')[2])

    def __call__(self, relative: str, csv_path: str) -> str:
        for i, strategy in enumerate(self.order):
            candidate = strategy(relative)
            if os.path.isfile(candidate):
                if i:
                    self.order.insert(0, self.order.pop(i))
                return candidate
        raise MissingFileError(f'{csv_path}: image {relative} not found under {self.root} '
                               f'or {os.path.dirname(self.root)}')


def _patient(path: str) -> str:
    found = _PATIENT.findall(path.replace('\\', '/'))
    return found[-1] if found else path
