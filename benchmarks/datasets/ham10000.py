"""Layout ``ham10000``: HAM10000 as published (the source of DermaMNIST).

``root/HAM10000_metadata.csv`` (lesion_id, image_id, dx, ...) and images ``<image_id>.jpg`` in ``root/images/``
or the official ``HAM10000_images_part_1/`` and ``HAM10000_images_part_2/``. Classes in DermaMNIST order; groups
are lesion ids. Lesion masks ``<image_id>_segmentation.png`` are read from ``root/masks/`` (or the official
``HAM10000_segmentations_lesion_tschandl/``) when present, None per missing file. ``root/splits.csv`` (image_id,
split) is the published split when present; there is none otherwise.
"""
from __future__ import annotations

import os

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv
from .errors import DatasetError, MissingFileError, UnknownLabelError
from .layout_helpers import index_images, lookup_images, reject_options, require_root
from .registry import register_dataset

CLASS_NAMES = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']
METADATA = 'HAM10000_metadata.csv'
IMAGE_DIRS = ('images', 'HAM10000_images_part_1', 'HAM10000_images_part_2')
MASK_DIRS = ('masks', 'HAM10000_segmentations_lesion_tschandl')
SPLITS = 'splits.csv'
SPLIT_ALIASES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'test': 'test'}


@register_dataset('ham10000')
def load_ham10000(root: str | None, **options) -> ImageRecords:
    reject_options('ham10000', options)
    root = require_root(root, 'ham10000', f'folder holding {METADATA} and images/')
    csv_path = os.path.join(root, METADATA)
    rows = read_csv(csv_path, ['lesion_id', 'image_id', 'dx'])
    class_index = {c: i for i, c in enumerate(CLASS_NAMES)}
    labels = np.empty(len(rows), dtype=np.int64)
    for i, row in enumerate(rows):
        label = class_index.get(row['dx'].lower())
        if label is None:
            raise UnknownLabelError(f'{csv_path}: unknown dx {row["dx"]!r} for image {row["image_id"]} '
                                    f'(known: {", ".join(CLASS_NAMES)})')
        labels[i] = label
    ids = [row['image_id'] for row in rows]

    folders = [os.path.join(root, d) for d in IMAGE_DIRS if os.path.isdir(os.path.join(root, d))]
    if not folders:
        raise MissingFileError(f'HAM10000 image folder not found: {os.path.join(root, "images")} '
                               f'(or {" / ".join(IMAGE_DIRS[1:])})')
    paths = lookup_images(index_images(folders), ids, folders)

    masks = None
    mask_dirs = [os.path.join(root, d) for d in MASK_DIRS if os.path.isdir(os.path.join(root, d))]
    if mask_dirs:
        mask_index = index_images(mask_dirs, ('.png',))
        masks = [mask_index.get(f'{image_id}_segmentation') for image_id in ids]

    split = None
    split_path = os.path.join(root, SPLITS)
    if os.path.exists(split_path):
        split_of = {r['image_id']: r['split'] for r in read_csv(split_path, ['image_id', 'split'])}
        split = []
        for image_id in ids:
            value = split_of.get(image_id)
            if value is None:
                raise DatasetError(f'{split_path}: no row for image {image_id} of {csv_path}')
            if value.lower() not in SPLIT_ALIASES:
                raise UnknownLabelError(f'{split_path}: split {value!r} of image {image_id} is not train/val/test')
            split.append(SPLIT_ALIASES[value.lower()])
        split = np.asarray(split)
    return ImageRecords(name='ham10000', root=root, class_names=list(CLASS_NAMES), labels=labels,
                        source=FileImageSource(paths, channels=3),
                        groups=np.asarray([row['lesion_id'] or row['image_id'] for row in rows]), split=split,
                        masks=masks)
