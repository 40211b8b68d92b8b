"""Layout ``isic_archive``: an ISIC Archive collection exported as one labels file, e.g. "UDA-1" (557 dermoscopic
images, nevus vs melanoma; ``../shared/data/isic_archive_uda1``).

``root/labels.csv`` (image_id, benign_malignant, diagnosis, label_melanoma, ... further columns ignored) and
``root/images/<image_id>.jpg``. Classes use the ISIC-2019 names of the diagnoses present, so that a model trained on
``isic2019`` (or on ``ham10000``, through the synonyms of ``tools/evaluate.py``) maps onto them by name:
diagnosis ``melanoma`` → ``MEL``, ``nevus`` → ``NV``; ``label_melanoma`` must agree (1 for melanoma, 0 for nevus).

Images with an empty diagnosis (UDA-1 has two, both benign) have no known class: a benign lesion need not be a
nevus. They are left out, and their count is reported in a warning and in ``records.notes``. Any other diagnosis is
a one-line :class:`UnknownLabelError`.

There is no published split and no lesion id: the collection is meant as an external test set, which
``tools/evaluate.py`` scores whole (every split) by default. Like any layout without a split, the engine gives it a
deterministic split by seed, stratified by class, each image its own group (``benchmarks.datasets.splits``).
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv, require_dir
from .errors import UnknownLabelError
from .layout_helpers import index_images, lookup_images, reject_options, require_root
from .registry import register_dataset

CLASS_NAMES = ['MEL', 'NV']
#: diagnosis (lower case) → (class index, the label_melanoma value it must carry)
DIAGNOSES = {'melanoma': (0, '1'), 'nevus': (1, '0')}
LABELS = 'labels.csv'
IMAGE_DIR = 'images'
COLUMNS = ['image_id', 'benign_malignant', 'diagnosis', 'label_melanoma']


@register_dataset('isic_archive')
def load_isic_archive(root: str | None, **options) -> ImageRecords:
    """Read ``root/labels.csv`` and ``root/images/``; images without a diagnosis are left out (warned)."""
    reject_options('isic_archive', options)
    root = require_root(root, 'isic_archive', f'folder holding {LABELS} and {IMAGE_DIR}/')
    csv_path = os.path.join(root, LABELS)
    rows = read_csv(csv_path, COLUMNS)
    ids, labels, unlabeled = [], [], []
    for row in rows:
        diagnosis = row['diagnosis'].lower()
        if not diagnosis:
            unlabeled.append(f'{row["image_id"]} ({row["benign_malignant"] or "benign/malignant unknown"})')
            continue
        if diagnosis not in DIAGNOSES:
            raise UnknownLabelError(f'{csv_path}: unknown diagnosis {row["diagnosis"]!r} for image {row["image_id"]} '
                                    f'(known: {", ".join(DIAGNOSES)}, or empty)')
        label, melanoma = DIAGNOSES[diagnosis]
        if row['label_melanoma'].split('.')[0] != melanoma:
            raise UnknownLabelError(f'{csv_path}: image {row["image_id"]} has diagnosis {row["diagnosis"]!r} but '
                                    f'label_melanoma {row["label_melanoma"]!r} (expected {melanoma})')
        ids.append(row['image_id'])
        labels.append(label)
    image_dir = require_dir(os.path.join(root, IMAGE_DIR), 'ISIC archive image folder')
    paths = lookup_images(index_images([image_dir]), ids, [image_dir])
    notes = []
    if unlabeled:
        notes.append(f'isic_archive: {len(unlabeled)} of {len(rows)} image(s) left out, no diagnosis (class unknown): '
                     f'{", ".join(unlabeled[:5])}{", ..." if len(unlabeled) > 5 else ""}')
        warnings.warn(notes[-1], stacklevel=2)
    return ImageRecords(name='isic_archive', root=root, class_names=list(CLASS_NAMES),
                        labels=np.asarray(labels, dtype=np.int64), source=FileImageSource(paths, channels=3),
                        notes=notes)
