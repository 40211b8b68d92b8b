"""The pixel contract between pretraining and evaluation: one definition of how uint8 images become model input.

Pretext tasks (``pretext_tasks.augment``) and the downstream protocols (``benchmarks.protocols.features``) both use
it, so a backbone is always evaluated on inputs scaled and normalised exactly as it was trained on: ``(N, H, W, C)``
uint8 with C = 1 or 3 → ``(N, 3, H, W)`` float in [0, 1] (grayscale repeated to three channels) → ImageNet mean/std.
"""
from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, C)`` uint8 (C = 1 or 3) → ``(N, 3, H, W)`` float32 in [0, 1]; grayscale repeated to 3 channels
    (an expanded view: call ``.contiguous()`` before writing into it)."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'expected (N, H, W, 1|3) images, got {tuple(images.shape)}')
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] → ImageNet-normalised (per-channel ``(x - mean) / std``)."""
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean_t) / std_t
