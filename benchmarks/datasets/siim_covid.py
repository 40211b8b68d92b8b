"""Layout ``siim_covid``: SIIM-FISABIO-RSNA COVID-19 Detection (Kaggle) training set.

``root/train_study_level.csv`` (id ``<study>_study`` + four one-hot columns) labels studies;
``root/train_image_level.csv`` (id ``<image>_image``, StudyInstanceUID, boxes, label) lists the images. Each image
takes its study's label and is grouped by study. Images are the original DICOM files
``root/train/<study>/<series>/<image>.dcm`` or converted PNG/JPEG files, either flat (``root/train/<image>.png``)
or in the same tree; a converted file is preferred over the DICOM of the same image. Grayscale; no published split
(the Kaggle test set has no labels).
"""
from __future__ import annotations

import os

import numpy as np

from .base import FileImageSource, ImageRecords, read_csv, require_dir
from .errors import UnknownLabelError
from .layout_helpers import index_images, lookup_images, parse_one_hot, reject_options, require_root
from .registry import register_dataset

CLASS_NAMES = ['Negative for Pneumonia', 'Typical Appearance', 'Indeterminate Appearance', 'Atypical Appearance']
STUDY_CSV = 'train_study_level.csv'
IMAGE_CSV = 'train_image_level.csv'
EXTENSIONS = ('.png', '.jpg', '.jpeg', '.dcm')


def _strip(value: str, suffix: str) -> str:
    return value[:-len(suffix)] if value.endswith(suffix) else value


@register_dataset('siim_covid')
def load_siim_covid(root: str | None, **options) -> ImageRecords:
    reject_options('siim_covid', options)
    root = require_root(root, 'siim_covid', f'folder holding {STUDY_CSV}, {IMAGE_CSV} and train/')
    study_path = os.path.join(root, STUDY_CSV)
    image_path = os.path.join(root, IMAGE_CSV)
    study_rows = read_csv(study_path, ['id'] + CLASS_NAMES)
    image_rows = read_csv(image_path, ['id', 'StudyInstanceUID'])
    study_label = {_strip(row['id'], '_study'): parse_one_hot([row[c] for c in CLASS_NAMES],
                                                                f'study {row["id"]}', study_path)
                   for row in study_rows}
    labels = np.empty(len(image_rows), dtype=np.int64)
    for i, row in enumerate(image_rows):
        label = study_label.get(row['StudyInstanceUID'])
        if label is None:
            raise UnknownLabelError(f'{image_path}: study {row["StudyInstanceUID"]} of image {row["id"]} has no '
                                    f'row in {study_path}')
        labels[i] = label
    folder = require_dir(os.path.join(root, 'train'), 'SIIM-COVID image folder')
    stems = [_strip(row['id'], '_image') for row in image_rows]
    paths = lookup_images(index_images([folder], EXTENSIONS, recursive=True), stems, [folder], EXTENSIONS)
    return ImageRecords(name='siim_covid', root=root, class_names=list(CLASS_NAMES), labels=labels,
                        source=FileImageSource(paths, channels=1),
                        groups=np.asarray([row['StudyInstanceUID'] for row in image_rows]))
