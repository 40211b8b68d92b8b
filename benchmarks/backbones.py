"""What a backbone's output looks like, and one feature vector per image from it.

An mmpretrain backbone returns a tuple of outputs (one per ``out_indices`` entry); the last one is used. It is one of:
a convolutional feature map ``(N, C, H, W)`` (ResNet, or a VisionTransformer with ``out_type='featmap'``), a
vector per image ``(N, D)`` (a VisionTransformer's class token, ``out_type='cls_token'``, its default, or its
``'avg_featmap'``), or a token sequence ``(N, L, D)`` (``out_type='raw'``). :func:`pool_output` is the one rule
every consumer uses (the pretext tasks, the kNN monitor, the linear / kNN / fine-tuning protocols): maps are
global-average-pooled, token sequences averaged over tokens, vectors kept.

:func:`vision_transformer_of` recognises mmpretrain's ``VisionTransformer`` family (DeiT and the other subclasses),
the one whose patch tokens the engine reads (iBOT's masked patch tokens, attention rollout): patch embedding, an
optional class token, positional embedding, ``layers`` of encoder blocks.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def pool_output(out: Any) -> torch.Tensor:
    """``(N, D)`` from a backbone's output (a tuple of outputs: the last is used): ``(N, C, H, W)`` maps are
    averaged over space, ``(N, L, D)`` token sequences over tokens, ``(N, D)`` vectors kept."""
    last = out[-1] if isinstance(out, (tuple, list)) else out
    if last.dim() == 4:
        return last.mean(dim=(2, 3))
    if last.dim() == 3:
        return last.mean(dim=1)
    return last


def vision_transformer_of(backbone: nn.Module):
    """``backbone`` when it is an mmpretrain ``VisionTransformer`` (or a subclass such as DeiT), else None."""
    try:
        from mmpretrain.models.backbones import VisionTransformer
    except ImportError:  # mmpretrain is a dependency; without it nothing here is a ViT
        return None
    return backbone if isinstance(backbone, VisionTransformer) else None


def patch_size_of(backbone: nn.Module) -> int | None:
    """The side (px) of a VisionTransformer's square patches, None for any other backbone."""
    vit = vision_transformer_of(backbone)
    if vit is None:
        return None
    projection = vit.patch_embed.projection
    return int(max(projection.stride))


def output_shape(backbone: nn.Module, image_size: int) -> tuple[int, ...]:
    """The shape of the last output for two black ``image_size`` px images (eval mode, no gradient; the backbone's
    mode is restored)."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(2, 3, image_size, image_size))
    finally:
        backbone.train(was_training)
    last = out[-1] if isinstance(out, (tuple, list)) else out
    return tuple(last.shape)
