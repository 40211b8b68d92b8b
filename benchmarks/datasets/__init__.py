"""Datasets in their published layouts, one module per layout, one registry (names used by ``--dataset``).

Registered: isic2019, isic_archive, ham10000, medmnist, nih_cxr14, chexpert, siim_covid, image_folder,
synthetic_derm, synthetic_cxr.
"""
from . import (chexpert, ham10000, image_folder, isic2019, isic_archive, medmnist,  # noqa: F401  (registration)
               nih_cxr14, siim_covid, synthetic)
from .base import ArrayImageSource, FileImageSource, ImageRecords, ImageSource
from .errors import (CorruptImageError, DatasetError, EmptySplitError, MissingColumnError, MissingFileError,
                     TooFewClassesError, UnknownDatasetError, UnknownLabelError)
from .prepared import PreparedDataset, UnlabeledImages, load_dataset
from .registry import DATASETS, load_records

__all__ = [
    'ArrayImageSource', 'FileImageSource', 'ImageRecords', 'ImageSource', 'CorruptImageError', 'DatasetError',
    'EmptySplitError', 'TooFewClassesError', 'MissingColumnError', 'MissingFileError', 'UnknownDatasetError',
    'UnknownLabelError',
    'PreparedDataset', 'UnlabeledImages', 'load_dataset', 'DATASETS', 'load_records',
]
