"""The dataset contract shared by every layout loader.

A layout loader (one module per published layout) reads only metadata and returns :class:`ImageRecords`: class
names, labels, optional group ids (patient / lesion), an optional published split, optional ROI masks and an
:class:`ImageSource` that can decode image *i*. Pixels are decoded once, resized and cached on disk by
:mod:`benchmarks.datasets.cache`; :class:`PreparedDataset` (in :mod:`benchmarks.datasets.prepared`) is what the
engine trains and evaluates on.
"""
from __future__ import annotations

import csv
import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from .digests import content_digests
from .errors import (CorruptImageError, DatasetError, EmptySplitError, MissingColumnError, MissingFileError,
                     UnknownLabelError)

SPLIT_NAMES = ('train', 'val', 'test')


class ImageSource(ABC):
    """Random access to the raw images of a dataset (before resizing)."""

    #: number of channels of decoded images: 1 (grayscale) or 3 (RGB)
    channels: int = 3

    @abstractmethod
    def __len__(self) -> int:
        ...

    @abstractmethod
    def decode(self, index: int) -> np.ndarray:
        """Image ``index`` as a ``(H, W, C)`` uint8 array, ``C == self.channels``."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A string that changes whenever any image could have changed (used as cache key)."""

    def describe(self, index: int) -> str:
        """Human-readable name of image ``index`` for error messages."""
        return f'image #{index}'


class FileImageSource(ImageSource):
    """Images stored as files (JPEG, PNG, ... or DICOM when pydicom is installed)."""

    #: total number of image files decoded by any instance; tests use it to show that cached passes decode nothing
    decode_calls = 0

    def __init__(self, paths: Sequence[str], channels: int = 3):
        self.paths = [os.fspath(p) for p in paths]
        self.channels = channels
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self, index: int) -> str:
        return self.paths[index]

    def fingerprint(self) -> str:
        """Hash of every file's contents, in order (computed once per instance; files unchanged since they were
        last hashed on this machine are not read again: :mod:`benchmarks.datasets.digests`)."""
        if self._fingerprint is None:
            try:
                digests = content_digests(self.paths)
            except FileNotFoundError as exc:
                raise MissingFileError(f'image file not found: {exc.filename}') from None
            digest = hashlib.sha256(f'files:{self.channels}:{len(digests)}'.encode())
            digest.update('\n'.join(digests).encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def decode(self, index: int) -> np.ndarray:
        path = self.paths[index]
        FileImageSource.decode_calls += 1
        if not os.path.exists(path):
            raise MissingFileError(f'image file not found: {path}')
        if path.lower().endswith('.dcm'):
            return _decode_dicom(path, self.channels)
        try:
            with Image.open(path) as image:
                image = image.convert('RGB' if self.channels == 3 else 'L')
                array = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise CorruptImageError(f'cannot decode image {path}: {exc}') from None
        return array[..., None] if array.ndim == 2 else array


def _decode_dicom(path: str, channels: int) -> np.ndarray:
    try:
        import pydicom
    except ImportError:
        raise MissingFileError(
            f'{path} is DICOM but pydicom is not installed: pip install -e ".[dicom]"') from None
    try:
        dataset = pydicom.dcmread(path)
        pixels = dataset.pixel_array.astype(np.float32)
    except Exception as exc:  # pydicom raises many unrelated types for broken files
        raise CorruptImageError(f'cannot decode DICOM {path}: {exc}') from None
    if getattr(dataset, 'PhotometricInterpretation', '') == 'MONOCHROME1':
        pixels = pixels.max() - pixels
    low, high = float(pixels.min()), float(pixels.max())
    pixels = (pixels - low) / max(high - low, 1e-6) * 255.0
    array = pixels.round().astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if channels == 3 and array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


class ArrayImageSource(ImageSource):
    """Images already in memory (MedMNIST npz files, built-in generated datasets)."""

    def __init__(self, images: np.ndarray, fingerprint: str, names: Sequence[str] | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise CorruptImageError(f'{fingerprint}: images must be uint8, found {images.dtype}')
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise CorruptImageError(f'{fingerprint}: images must be (N,H,W) or (N,H,W,1|3), found {images.shape}')
        self.images = images
        self.channels = images.shape[-1]
        self._fingerprint = fingerprint
        self.names = list(names) if names is not None else None

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, index: int) -> str:
        return self.names[index] if self.names else f'{self._fingerprint}[{index}]'

    def decode(self, index: int) -> np.ndarray:
        return self.images[index]

    def fingerprint(self) -> str:
        return self._fingerprint


def file_fingerprint(path: str) -> str:
    """Identity of one data file (an npz archive): a digest of its contents, so a copy or a re-provisioned file
    with new timestamps keeps every cache key."""
    try:
        return f'content:{content_digests([path])[0]}'
    except FileNotFoundError:
        raise MissingFileError(f'file not found: {path}') from None


@dataclass
class ImageRecords:
    """Everything a layout loader knows about a dataset, pixels excepted."""

    name: str
    root: str
    class_names: list[str]
    #: ``(N,)`` int64 class index, or for multi-label layouts ``(N, C)`` float32 with 1/0 and NaN = unknown (ignored)
    labels: np.ndarray
    source: ImageSource
    multilabel: bool = False
    #: ``(N,)`` patient or lesion id, or None when the layout has none
    groups: np.ndarray | None = None
    #: ``(N,)`` 'train' / 'val' / 'test' when the layout publishes a split, else None
    split: np.ndarray | None = None
    #: ROI mask file (or None) per image, when the layout has masks
    masks: list[str | None] | None = None
    #: free-form notes shown to the user (e.g. the CheXpert uncertainty policy applied)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        count = len(self.source)
        self.labels = np.asarray(self.labels)
        if len(self.labels) != count:
            raise ValueError(f'{self.name}: {len(self.labels)} labels for {count} images')
        if self.multilabel:
            self.labels = self.labels.astype(np.float32)
            if self.labels.ndim != 2 or self.labels.shape[1] != len(self.class_names):
                raise ValueError(f'{self.name}: multi-label array must be (N, {len(self.class_names)})')
        else:
            self.labels = self.labels.astype(np.int64)
            bad = (self.labels < 0) | (self.labels >= len(self.class_names))
            if bad.any():
                first = int(np.flatnonzero(bad)[0])
                raise UnknownLabelError(
                    f'{self.name}: label {int(self.labels[first])} of {self.source.describe(first)} '
                    f'is outside the class list {self.class_names}')
        for attr in ('groups', 'split'):
            value = getattr(self, attr)
            if value is not None:
                value = np.asarray(value).astype(str)
                if len(value) != count:
                    raise ValueError(f'{self.name}: {attr} has {len(value)} entries for {count} images')
                setattr(self, attr, value)
        if self.split is not None:
            unknown = sorted(set(self.split.tolist()) - set(SPLIT_NAMES))
            if unknown:
                raise UnknownLabelError(f'{self.name}: split value {unknown[0]!r} is not one of {SPLIT_NAMES}')

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def read_csv(path: str, required_columns: Sequence[str]) -> list[dict[str, str]]:
    """Read a CSV file into dict rows, checking that the required columns exist and that it has at least one row.
    Unreadable, undecodable (not UTF-8 text) or header-only files are one-line DatasetErrors naming the file."""
    if not os.path.isfile(path):
        raise MissingFileError(f'CSV file not found: {path}')
    try:
        with open(path, newline='', encoding='utf-8-sig') as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            missing = [c for c in required_columns if c not in columns]
            if missing:
                raise MissingColumnError(
                    f'{path}: missing column(s) {", ".join(missing)} (found: {", ".join(columns) or "none"})')
            rows = [{(k or '').strip(): (v or '').strip() if isinstance(v, str) else '' for k, v in row.items()}
                    for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f'{path}: not a UTF-8 text CSV file ({exc.reason} at byte {exc.start})') from None
    except csv.Error as exc:
        raise DatasetError(f'{path}: not a readable CSV file ({exc})') from None
    except OSError as exc:
        raise DatasetError(f'cannot read {path}: {exc.strerror or exc}') from None
    if not rows:
        raise EmptySplitError(f'{path}: has a header but no data rows')
    return rows


def require_dir(path: str, what: str) -> str:
    """Return ``path`` if it is a folder, else raise :class:`MissingFileError` naming ``what``."""
    if not os.path.isdir(path):
        raise MissingFileError(f'{what} not found: {path}')
    return path


def find_image_file(folder: str, stem: str, extensions: Sequence[str] = ('.jpg', '.jpeg', '.png')) -> str:
    """Path of ``folder/stem.<ext>`` for the first existing extension; MissingFileError naming the stem."""
    for ext in extensions:
        candidate = os.path.join(folder, stem + ext)
        if os.path.exists(candidate):
            return candidate
        upper = os.path.join(folder, stem + ext.upper())
        if os.path.exists(upper):
            return upper
    raise MissingFileError(f'image {stem} not found in {folder} (tried {", ".join(extensions)})')
