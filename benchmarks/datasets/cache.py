"""Decoded-image cache: each dataset is decoded and resized once, stored as one uint8 ``.npy`` file.

The key covers the source fingerprint (a digest of the files' contents, or of the npz archive), the target size
and the resize method, so editing or replacing an image invalidates the entry and a copy of the same files (or the
same files with new timestamps) does not. Later epochs and later runs memory-map the file and decode no image.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..files import default_cache_dir
from .base import ImageSource

CACHE_VERSION = 1


def resize_uint8(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize an ``(H, W, C)`` uint8 image to ``(size, size, C)`` (the full image, aspect ratio squashed as
    MedMNIST does). Masks use nearest-neighbour so they stay binary and align with their images."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resample = Image.NEAREST if nearest else Image.BILINEAR
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil.resize((size, size), resample=resample, reducing_gap=None if nearest else 2.0))
    return resized[..., None] if resized.ndim == 2 else resized


def cache_key(source: ImageSource, size: int, kind: str = 'image') -> str:
    text = f'v{CACHE_VERSION}:{kind}:{size}:{source.fingerprint()}'
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def decoded_images(source: ImageSource, size: int, cache_dir: str | None = None,
                   threads: int | None = None) -> np.ndarray:
    """All images of ``source`` resized to ``size``: ``(N, size, size, C)`` uint8, read from the cache file when
    present (loaded into memory: training indexes it randomly every step)."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f'{cache_key(source, size)}.npy')
    if os.path.exists(path):
        cached = np.load(path, mmap_mode='r', allow_pickle=False)
        if cached.shape == (len(source), size, size, source.channels):
            return np.ascontiguousarray(cached)
    out = np.empty((len(source), size, size, source.channels), dtype=np.uint8)

    def work(index: int) -> None:
        out[index] = resize_uint8(source.decode(index), size)

    threads = threads or min(4, os.cpu_count() or 1)
    chunk = 256  # a corrupt image stops the build within one chunk instead of after decoding everything
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(source), chunk):
            list(pool.map(work, range(start, min(start + chunk, len(source)))))
    tmp = f'{path}.{os.getpid()}.tmp.npy'
    np.save(tmp, out, allow_pickle=False)
    os.replace(tmp, path)
    return out
