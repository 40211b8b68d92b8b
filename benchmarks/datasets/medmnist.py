"""Layout ``medmnist``: one MedMNIST ``.npz`` file (the root is the file itself).

Keys ``{train,val,test}_{images,labels}`` give the published split. Images are ``(N,H,W)`` grayscale or
``(N,H,W,3)`` RGB; 3-D MedMNIST volumes are rejected (the backbones are 2-D). Labels ``(N,1)`` are single-label;
``(N,C)`` with ``C > 1`` is multi-label (ChestMNIST). Class names come from a table of the known MedMNIST files,
matched by file name (``pneumoniamnist.npz``, ``dermamnist_64.npz``, ...), from the option ``class_names``, or are
``class_0 .. class_{K-1}``.
"""
from __future__ import annotations

import os
import re
import zipfile
import zlib

import numpy as np

from .base import SPLIT_NAMES, ArrayImageSource, ImageRecords, file_fingerprint
from .errors import DatasetError, MissingColumnError, MissingFileError, UnknownLabelError
from .layout_helpers import reject_options, require_root
from .registry import register_dataset

_ORGAN = ['bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left', 'kidney-right', 'liver', 'lung-left',
          'lung-right', 'pancreas', 'spleen']
_DERMA = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']

#: class names of the known 2-D MedMNIST files, in label order
KNOWN_CLASS_NAMES: dict[str, list[str]] = {
    'pneumoniamnist': ['normal', 'pneumonia'],
    'dermamnist': _DERMA,
    'ham10000': _DERMA,  # DermaMNIST-format npz built from HAM10000
    'chestmnist': ['Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
                   'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening',
                   'Hernia'],
    'breastmnist': ['malignant', 'normal_or_benign'],
    'bloodmnist': ['basophil', 'eosinophil', 'erythroblast', 'immature_granulocyte', 'lymphocyte', 'monocyte',
                   'neutrophil', 'platelet'],
    'pathmnist': ['adipose', 'background', 'debris', 'lymphocytes', 'mucus', 'smooth_muscle',
                  'normal_colon_mucosa', 'cancer_associated_stroma', 'colorectal_adenocarcinoma_epithelium'],
    'octmnist': ['choroidal_neovascularization', 'diabetic_macular_edema', 'drusen', 'normal'],
    'retinamnist': ['grade_0', 'grade_1', 'grade_2', 'grade_3', 'grade_4'],
    'organamnist': _ORGAN,
    'organcmnist': _ORGAN,
    'organsmnist': _ORGAN,
}


@register_dataset('medmnist')
def load_medmnist(root: str | None, class_names: list[str] | None = None, **options) -> ImageRecords:
    reject_options('medmnist', options, ('class_names',))
    path = require_root(root, 'medmnist', 'path of the .npz file')
    if os.path.isdir(path):
        found = sorted(f for f in os.listdir(path) if f.endswith('.npz'))
        if len(found) != 1:
            raise MissingFileError(f'medmnist: --data-root must be one .npz file; {path} is a folder holding '
                                   f'{len(found)} .npz files')
        path = os.path.join(path, found[0])
    if not os.path.isfile(path):
        raise MissingFileError(f'MedMNIST file not found: {path}')
    images, labels, split = [], [], []
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f'cannot read {path} as an .npz file: {exc or type(exc).__name__}') from None
    if not hasattr(archive, 'files'):  # np.load of a plain .npy file gives an array
        raise DatasetError(f'{path}: a single .npy array, not an .npz archive of MedMNIST splits')
    with archive:
        for name in SPLIT_NAMES:
            for key in (f'{name}_images', f'{name}_labels'):
                if key not in archive.files:
                    raise MissingColumnError(f'{path}: missing key {key} (found: {", ".join(archive.files)})')
            try:
                part_images = archive[f'{name}_images']
                part_labels = archive[f'{name}_labels']
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DatasetError(f'{path}: truncated or corrupt .npz archive ({name} split: '
                                   f'{exc or type(exc).__name__})') from None
            _check_2d(part_images, path, name)
            if part_images.ndim == 3:
                part_images = part_images[..., None]
            if part_labels.ndim == 1:
                part_labels = part_labels[:, None]
            if part_labels.ndim != 2 or len(part_labels) != len(part_images):
                raise DatasetError(f'{path}: {name}_labels has shape {part_labels.shape} for '
                                   f'{len(part_images)} images')
            images.append(part_images)
            labels.append(part_labels)
            split.extend([name] * len(part_images))
    shapes = {part.shape[1:] for part in images if len(part)}
    if len(shapes) > 1:
        raise DatasetError(f'{path}: the splits hold images of different shapes {sorted(shapes)}')
    widths = {part.shape[1] for part in labels}
    if len(widths) > 1:
        raise DatasetError(f'{path}: the splits hold labels of different widths {sorted(widths)}')
    all_images = np.concatenate(images)
    all_labels = np.concatenate(labels)
    if not len(all_images):
        raise DatasetError(f'{path}: the archive holds no images')
    multilabel = all_labels.shape[1] > 1
    stem = re.sub(r'_\d+$', '', os.path.splitext(os.path.basename(path))[0].lower())
    if multilabel:
        count = all_labels.shape[1]
        values = all_labels.astype(np.float32)
    else:
        values = all_labels[:, 0].astype(np.int64)
        if len(values) and values.min() < 0:
            raise UnknownLabelError(f'{path}: negative label {int(values.min())}')
        count = int(values.max()) + 1 if len(values) else 0
    names = _class_names(class_names, stem, count, multilabel, path)
    source = ArrayImageSource(all_images, fingerprint=file_fingerprint(path))
    return ImageRecords(name='medmnist', root=path, class_names=names, labels=values, source=source,
                        multilabel=multilabel, split=np.asarray(split))


def _check_2d(images: np.ndarray, path: str, split: str) -> None:
    if images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3)):
        return
    if images.ndim in (4, 5):
        raise DatasetError(f'{path}: {split}_images has shape {images.shape}, a 3-D MedMNIST volume set; '
                           f'3-D MedMNIST is not supported (the backbones are 2-D)')
    raise DatasetError(f'{path}: {split}_images has shape {images.shape}; expected (N,H,W) or (N,H,W,3)')


def _class_names(given, stem: str, count: int, multilabel: bool, path: str) -> list[str]:
    if given is not None:
        names, origin = [str(n) for n in given], 'option class_names'
    elif stem in KNOWN_CLASS_NAMES:
        names, origin = list(KNOWN_CLASS_NAMES[stem]), f'the {stem} class table'
    else:
        return [f'class_{i}' for i in range(count)]
    if (multilabel and len(names) != count) or (not multilabel and len(names) < count):
        raise UnknownLabelError(f'{path}: labels need {count} classes but {origin} has {len(names)}: {names}')
    return names
