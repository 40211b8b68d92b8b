"""Layout ``isic2019``: the ISIC 2019 Challenge training set as published.

``root/ISIC_2019_Training_GroundTruth.csv`` (image + one-hot columns MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK) and
``root/ISIC_2019_Training_Input/<image>.jpg``. The optional ``ISIC_2019_Training_Metadata.csv`` gives lesion ids,
used as groups so that images of one lesion never straddle splits (an empty lesion id makes the image its own
group). UNK has no training images but stays in the class list. There is no published split.
"""
from __future__ import annotations

import os

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv, require_dir
from .layout_helpers import index_images, lookup_images, parse_one_hot, reject_options, require_root
from .registry import register_dataset

CLASS_NAMES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC', 'UNK']
GROUND_TRUTH = 'ISIC_2019_Training_GroundTruth.csv'
METADATA = 'ISIC_2019_Training_Metadata.csv'
IMAGE_DIR = 'ISIC_2019_Training_Input'


@register_dataset('isic2019')
def load_isic2019(root: str | None, **options) -> ImageRecords:
    reject_options('isic2019', options)
    root = require_root(root, 'isic2019', f'folder holding {GROUND_TRUTH} and {IMAGE_DIR}/')
    csv_path = os.path.join(root, GROUND_TRUTH)
    rows = read_csv(csv_path, ['image'] + CLASS_NAMES)
    image_dir = require_dir(os.path.join(root, IMAGE_DIR), 'ISIC 2019 image folder')
    nested = os.path.join(image_dir, IMAGE_DIR)  # some unzip tools add one more level
    folders = [image_dir, nested] if os.path.isdir(nested) else [image_dir]
    ids = [row['image'] for row in rows]
    labels = np.asarray([parse_one_hot([row[c] for c in CLASS_NAMES], f'image {row["image"]}', csv_path)
                         for row in rows], dtype=np.int64)
    paths = lookup_images(index_images(folders), ids, folders)

    groups = None
    meta_path = os.path.join(root, METADATA)
    if os.path.exists(meta_path):
        lesion_of = {row['image']: row['lesion_id'] for row in read_csv(meta_path, ['image', 'lesion_id'])}
        groups = np.asarray([lesion_of.get(image) or image for image in ids])
    return ImageRecords(name='isic2019', root=root, class_names=list(CLASS_NAMES), labels=labels,
                        source=FileImageSource(paths, channels=3), groups=groups)
