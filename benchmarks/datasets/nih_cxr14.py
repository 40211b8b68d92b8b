"""Layout ``nih_cxr14``: NIH ChestX-ray14 as published.

``root/Data_Entry_2017.csv`` (Image Index, Finding Labels joined by ``|`` or 'No Finding', Patient ID) and images
in ``root/images/`` or the official tarball folders ``root/images_001/images/ ...``. Multi-label over the 14
findings; groups are patient ids; grayscale. When ``train_val_list.txt`` and ``test_list.txt`` exist they are the
published split; a validation set is carved from train_val by patient (deterministic: ``seed`` option, default 0,
``val_fraction`` option, default 1/8).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv
from .errors import DatasetError, MissingFileError, UnknownLabelError
from .layout_helpers import index_images, lookup_images, reject_options, require_root
from .registry import register_dataset
from .splits import make_splits

FINDINGS = ['Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
            'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening', 'Hernia']
NO_FINDING = 'No Finding'
DATA_ENTRY = 'Data_Entry_2017.csv'
TRAIN_VAL_LIST = 'train_val_list.txt'
TEST_LIST = 'test_list.txt'


@register_dataset('nih_cxr14')
def load_nih_cxr14(root: str | None, seed: int = 0, val_fraction: float = 0.125, **options) -> ImageRecords:
    reject_options('nih_cxr14', options, ('seed', 'val_fraction'))
    root = require_root(root, 'nih_cxr14', f'folder holding {DATA_ENTRY} and images/')
    csv_path = os.path.join(root, DATA_ENTRY)
    rows = read_csv(csv_path, ['Image Index', 'Finding Labels', 'Patient ID'])
    column = {name: i for i, name in enumerate(FINDINGS)}
    labels = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for finding in row['Finding Labels'].split('|'):
            finding = finding.strip()
            if finding == NO_FINDING:
                continue
            if finding not in column:
                raise UnknownLabelError(f'{csv_path}: unknown finding {finding!r} for image {row["Image Index"]} '
                                        f'(known: {", ".join(FINDINGS)}, {NO_FINDING})')
            labels[i, column[finding]] = 1.0
    names = [row['Image Index'] for row in rows]

    folders = [os.path.join(root, 'images')] if os.path.isdir(os.path.join(root, 'images')) else []
    folders += sorted(d for d in glob.glob(os.path.join(root, 'images_*', 'images')) if os.path.isdir(d))
    if not folders:
        raise MissingFileError(f'NIH ChestX-ray14 image folder not found: {os.path.join(root, "images")} '
                               f'(or {os.path.join(root, "images_001", "images")} ...)')
    paths = lookup_images(index_images(folders), [os.path.splitext(n)[0] for n in names], folders)
    groups = np.asarray([row['Patient ID'] for row in rows])

    split = None
    notes = []
    list_paths = [os.path.join(root, TRAIN_VAL_LIST), os.path.join(root, TEST_LIST)]
    present = [os.path.exists(p) for p in list_paths]
    if all(present):
        split = _published_split(names, labels, groups, list_paths, seed, val_fraction)
        notes.append(f'nih_cxr14: published split ({TRAIN_VAL_LIST} / {TEST_LIST}); val = {val_fraction:g} of '
                     f'train_val by patient, seed {seed}')
    elif any(present):
        notes.append(f'nih_cxr14: only one of {TRAIN_VAL_LIST} / {TEST_LIST} found; published split ignored')
    return ImageRecords(name='nih_cxr14', root=root, class_names=list(FINDINGS), labels=labels,
                        source=FileImageSource(paths, channels=1), multilabel=True, groups=groups, split=split,
                        notes=notes)


def _published_split(names, labels, groups, list_paths, seed, val_fraction) -> np.ndarray:
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f'nih_cxr14: option val_fraction must be in [0, 1), got {val_fraction!r}')
    train_val, test = (set(_read_list(p)) for p in list_paths)
    split = np.empty(len(names), dtype=object)
    for i, name in enumerate(names):
        in_train, in_test = name in train_val, name in test
        if in_train == in_test:
            where = 'both' if in_train else 'neither'
            raise DatasetError(f'nih_cxr14: image {name} is in {where} of {TRAIN_VAL_LIST} and {TEST_LIST}')
        split[i] = 'test' if in_test else 'train'
    train_idx = np.flatnonzero(split == 'train')
    if len(train_idx) and val_fraction > 0:
        carved = make_splits(labels[train_idx], groups[train_idx], seed, (1.0 - val_fraction, val_fraction, 0.0))
        split[train_idx] = carved
    return split.astype(str)


def _read_list(path: str) -> list[str]:
    with open(path, encoding='utf-8') as handle:
        return [line.strip() for line in handle if line.strip()]
