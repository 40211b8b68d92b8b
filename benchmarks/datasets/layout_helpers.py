"""Helpers shared by the layout loaders: root/option checks, one-pass folder indexing, image lookup, one-hot
parsing. Each raises the dataset layer's one-line errors."""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Sequence

from .base import find_image_file
from .errors import DatasetError, MissingFileError, UnknownLabelError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')
SPLIT_DIR_NAMES = {'train': 'train', 'val': 'val', 'valid': 'val', 'validation': 'val', 'test': 'test'}


# -- helpers shared by the layout modules -------------------------------------------------------------------
def require_root(root: str | os.PathLike | None, name: str, what: str) -> str:
    """``root`` as an absolute path; MissingFileError when it is None (no ``--data-root`` given)."""
    if root is None:
        raise MissingFileError(f'dataset {name!r} needs --data-root (the {what})')
    return os.path.abspath(os.fspath(root))


def reject_options(name: str, options: Mapping[str, object], known: Sequence[str] = ()) -> None:
    """One-line DatasetError for dataset options the layout does not understand (typos in dataset_options)."""
    if options:
        accepted = ', '.join(known) if known else 'none'
        raise DatasetError(f'dataset {name!r}: unknown option(s) {", ".join(sorted(options))} (accepted: {accepted})')


def index_images(folders: Iterable[str], extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 recursive: bool = False) -> dict[str, str]:
    """Map file stem → path for every image file in ``folders`` (one directory scan each).

    When a stem exists with several extensions, the one earliest in ``extensions`` wins; across folders the first
    folder wins.
    """
    rank = {ext.lower(): i for i, ext in enumerate(extensions)}
    found: dict[str, tuple[int, int, str]] = {}
    for folder_rank, folder in enumerate(folders):
        for directory, files in _walk(folder, recursive):
            for file_name in files:
                stem, dot, ext = file_name.rpartition('.')
                ext_rank = rank.get('.' + ext.lower())
                if ext_rank is None or not stem or file_name.startswith('.'):
                    continue
                key = (folder_rank, ext_rank)
                previous = found.get(stem)
                if previous is None or key < previous[:2]:
                    found[stem] = (folder_rank, ext_rank, os.path.join(directory, file_name))
    return {stem: entry[2] for stem, entry in found.items()}


def _walk(folder: str, recursive: bool):
    if recursive:
        for directory, dirs, files in os.walk(folder):
            dirs.sort()
            yield directory, sorted(files)
        return
    with os.scandir(folder) as entries:
        yield folder, sorted(entry.name for entry in entries if entry.is_file())


def lookup_images(index: Mapping[str, str], stems: Sequence[str], folders: Sequence[str],
                  extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """Paths of ``stems`` from ``index``; MissingFileError naming the first missing image and the folders."""
    paths = []
    for stem in stems:
        path = index.get(stem)
        if path is None:
            if len(folders) == 1:
                find_image_file(folders[0], stem, extensions)  # raises MissingFileError naming stem and folder
            raise MissingFileError(f'image {stem} not found in {" or ".join(folders)} '
                                   f'(tried {", ".join(extensions)})')
        paths.append(path)
    return paths


def parse_one_hot(values: Sequence[str], what: str, file: str) -> int:
    """Index of the single 1 in a one-hot row of strings like '1.0'/'0'; UnknownLabelError otherwise."""
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise UnknownLabelError(f'{file}: {what} has a non-numeric label value in {list(values)}') from None
    hot = [i for i, v in enumerate(numbers) if v == 1.0]
    if len(hot) != 1 or any(v not in (0.0, 1.0) for v in numbers):
        raise UnknownLabelError(f'{file}: {what} is not one-hot ({", ".join(values)})')
    return hot[0]


# -- the layout -----------------------------------------------------------------------------------------------
