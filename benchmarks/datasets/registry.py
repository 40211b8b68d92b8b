"""Name → layout-loader registry. The names are a contract used by ``--dataset``.

A loader is ``fn(root: str | None, **options) -> ImageRecords``; ``options`` come from the config's
``dataset_options`` (e.g. the CheXpert uncertainty policy).
"""
from __future__ import annotations

from typing import Callable

from .base import ImageRecords
from .errors import UnknownDatasetError

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
    """Read a dataset's metadata in its published layout (no pixels decoded)."""
    return get_loader(name)(root, **options)
