"""Name → layout-loader registry. The names are a contract used by ``--dataset``.

A loader is ``fn(root: str | None, **options) -> ImageRecords``; ``options`` come from the config's
``dataset_options`` (e.g. the CheXpert uncertainty policy).
"""
from __future__ import annotations

import csv
import zipfile
import zlib
from typing import Callable

from .base import ImageRecords
from .errors import DatasetError, EmptySplitError, UnknownDatasetError

LayoutLoader = Callable[..., ImageRecords]
DATASETS: dict[str, LayoutLoader] = {}


def register_dataset(name: str) -> Callable[[LayoutLoader], LayoutLoader]:
    def decorator(fn: LayoutLoader) -> LayoutLoader:
        if name in DATASETS:
            raise KeyError(f'dataset {name!r} registered twice')
        DATASETS[name] = fn
        return fn
    return decorator


def get_loader(name: str) -> LayoutLoader:
    if name not in DATASETS:
        raise UnknownDatasetError(f'unknown dataset {name!r}; known: {", ".join(sorted(DATASETS))}')
    return DATASETS[name]


def load_records(name: str, root: str | None = None, **options) -> ImageRecords:
    """Read a dataset's metadata in its published layout (no pixels decoded). A file the layout cannot read
    (unreadable, truncated, not the format it should be) is a one-line DatasetError naming the data root; a layout
    that lists no image is an EmptySplitError."""
    loader = get_loader(name)
    try:
        records = loader(root, **options)
    except (DatasetError, KeyboardInterrupt):
        raise
    except (OSError, ValueError, EOFError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile, zlib.error) as exc:
        where = getattr(exc, 'filename', None) or root
        detail = (getattr(exc, 'strerror', None) or str(exc) or type(exc).__name__).strip().splitlines()[0]
        raise DatasetError(f'dataset {name!r}: cannot read {where}: {detail}') from None
    if len(records) == 0:
        raise EmptySplitError(f'dataset {name!r} at {records.root}: no images')
    return records
