"""Layout ``image_folder``: a plain class-per-folder tree, ``root/<class>/*`` or ``root/<split>/<class>/*``.

Classes are the folder names, sorted (empty class folders stay in the class list). When every sub-folder of the
root is a split name (train / val / valid / validation / test) the tree is taken as a published split. Options:
``channels`` (3 = RGB, default; 1 = grayscale).

This module also holds the small helpers the other layout modules share (root check, unknown-option check, one
folder scan per image folder instead of one ``os.path.exists`` per image).
"""
from __future__ import annotations

import os

import numpy as np

from .base import FileImageSource, ImageRecords, require_dir
from .errors import DatasetError, EmptySplitError
from .layout_helpers import IMAGE_EXTENSIONS, SPLIT_DIR_NAMES, _walk, reject_options, require_root
from .registry import register_dataset

@register_dataset('image_folder')
def load_image_folder(root: str | None, channels: int = 3, **options) -> ImageRecords:
    """Read ``root/<class>/*`` or ``root/<split>/<class>/*``."""
    reject_options('image_folder', options, ('channels',))
    root = require_dir(require_root(root, 'image_folder', 'folder holding <class>/ or <split>/<class>/ folders'),
                       'image_folder root')
    if channels not in (1, 3):
        raise DatasetError(f'dataset image_folder: option channels must be 1 or 3, got {channels!r}')
    subdirs = _subdirs(root)
    is_split = bool(subdirs) and all(d.lower() in SPLIT_DIR_NAMES for d in subdirs)
    # (split name or None, folder holding class folders)
    parts = [(SPLIT_DIR_NAMES[d.lower()], os.path.join(root, d)) for d in subdirs] if is_split else [(None, root)]
    class_names = sorted({c for _, folder in parts for c in _subdirs(folder)})
    class_index = {c: i for i, c in enumerate(class_names)}
    paths: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    extensions = tuple(IMAGE_EXTENSIONS)
    for split, folder in parts:
        for class_name in _subdirs(folder):
            for directory, files in _walk(os.path.join(folder, class_name), recursive=True):
                for file_name in files:
                    if file_name.startswith('.') or not file_name.lower().endswith(extensions):
                        continue
                    paths.append(os.path.join(directory, file_name))
                    labels.append(class_index[class_name])
                    splits.append(split or '')
    if not paths:
        raise EmptySplitError(f'image_folder: no image files ({", ".join(IMAGE_EXTENSIONS)}) in class folders '
                              f'under {root}')
    return ImageRecords(name='image_folder', root=root, class_names=class_names,
                        labels=np.asarray(labels, dtype=np.int64),
                        source=FileImageSource(paths, channels=channels),
                        split=np.asarray(splits) if is_split else None)


def _subdirs(folder: str) -> list[str]:
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith('.'))
