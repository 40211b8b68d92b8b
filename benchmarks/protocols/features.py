"""Frozen-backbone features and the shared pixel preprocessing of every protocol.

:func:`to_model_input` turns a batch of ``(N, H, W, C)`` uint8 images into normalised ``(N, 3, H, W)`` floats
(ImageNet mean/std, grayscale repeated to three channels). :func:`extract_features` runs an mmpretrain-style
backbone (forward returns a tuple of outputs) and pools the last one (:mod:`benchmarks.backbones`: a ResNet's map
averaged over space, a vision transformer's class token as it is). The backbone is left as
found: its training flag and device are restored afterwards.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..backbones import pool_output
from ..pixels import normalize, to_unit_float


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 (C = 1 or 3) → ``(N, 3, H, W)`` float32, scaled to [0, 1] and ImageNet-normalised
    (:mod:`benchmarks.pixels`, the same contract the pretext tasks train with)."""
    return normalize(to_unit_float(images))


def pooled_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``backbone`` on model input ``x`` and pool its last output to ``(N, D)`` (:func:`..backbones.pool_output`:
    maps averaged over space, token sequences over tokens, a ViT's class token kept)."""
    return pool_output(backbone(x)).flatten(1)


@contextlib.contextmanager
def borrowed(module: nn.Module, device: torch.device | str, train: bool = False):
    """Temporarily move ``module`` to ``device`` in eval (or train) mode; device and mode are restored on exit."""
    was_training = module.training
    first = next(iter(module.parameters()), None)
    home = first.device if first is not None else torch.device('cpu')
    module.to(device)
    module.train(train)
    try:
        yield module
    finally:
        module.to(home)
        module.train(was_training)


def as_uint8_tensor(images) -> torch.Tensor:
    """A numpy array or tensor of uint8 images as a CPU tensor (no copy when possible)."""
    if isinstance(images, torch.Tensor):
        return images
    return torch.from_numpy(np.ascontiguousarray(images))


def image_batches(images_uint8, indices: np.ndarray | None, batch_size: int):
    """Yield ``(B, H, W, C)`` uint8 CPU tensors of ``images_uint8[indices]`` (all images when ``indices`` is None),
    indexing one batch at a time so that no full copy of a large split is made."""
    count = len(images_uint8) if indices is None else len(indices)
    for start in range(0, count, batch_size):
        if indices is None:
            batch = images_uint8[start:start + batch_size]
        else:
            pick = np.asarray(indices[start:start + batch_size])
            batch = images_uint8[torch.as_tensor(pick) if isinstance(images_uint8, torch.Tensor) else pick]
        yield as_uint8_tensor(batch)


@torch.no_grad()
def extract_features(backbone: nn.Module, images_uint8, device: torch.device | str = 'cpu',
                     batch_size: int = 256, indices: np.ndarray | None = None) -> torch.Tensor:
    """``(N, D)`` float32 CPU tensor of pooled last-stage features of ``images_uint8`` (``(N, H, W, C)`` uint8,
    numpy or tensor), restricted to ``indices`` when given."""
    device = torch.device(device)
    chunks = []
    with borrowed(backbone, device):
        for batch in image_batches(images_uint8, indices, batch_size):
            batch = batch.to(device)
            feats = pooled_features(backbone, to_model_input(batch))
            chunks.append(feats.float().cpu())
    if not chunks:
        raise ValueError('extract_features: no images')
    return torch.cat(chunks)


@torch.no_grad()
def recalibrate_batchnorm(backbone: nn.Module, images_uint8, device: torch.device | str = 'cpu',
                          batch_size: int = 256, indices: np.ndarray | None = None) -> nn.Module:
    """A copy of ``backbone`` whose batch-norm running statistics are re-estimated (cumulative average) on the
    given clean images; the original is untouched.

    A frozen-feature probe then sees the same normalisation whatever the backbone's history: an untrained network
    otherwise runs with its initial statistics (mean 0, variance 1, i.e. no normalisation) and a trained one with
    statistics of its augmented training views, and that difference alone moves a kNN probe by several points."""
    import copy

    device = torch.device(device)
    copied = copy.deepcopy(backbone)
    norms = [m for m in copied.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for module in norms:
        module.reset_running_stats()
        module.momentum = None
    with borrowed(copied, device, train=True):
        for batch in image_batches(images_uint8, indices, batch_size):
            copied(to_model_input(batch.to(device)))
    copied.eval()  # not chained: mmpretrain's ResNet.train() returns None
    return copied


@torch.no_grad()
def feature_dim(backbone: nn.Module, channels: int, image_size: int) -> int:
    """Width of :func:`pooled_features` for images of this size (one dummy forward on the backbone's own device;
    the backbone is left as found)."""
    first = next(iter(backbone.parameters()), None)
    device = first.device if first is not None else torch.device('cpu')
    dummy = torch.zeros(2, image_size, image_size, channels, dtype=torch.uint8)
    return int(extract_features(backbone, dummy, device).shape[1])


@dataclass(frozen=True)
class Splits:
    """Image indices of the three roles of an evaluation: fit on ``train``, select on ``val``, report ``test``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def items(self):
        return (('train', self.train), ('val', self.val), ('test', self.test))


def split_features(backbone: nn.Module, dataset, splits: Splits, device: torch.device | str = 'cpu',
                   batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Frozen features of each split of ``dataset`` (anything with ``.images``): ``{'train'|'val'|'test': (n, D)}``."""
    return {name: extract_features(backbone, dataset.images, device, batch_size, indices=idx)
            for name, idx in splits.items()}
