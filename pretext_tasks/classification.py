"""Shared training and validation of the pretext tasks that are classifications written here (relloc: 8-way
patch position, rotation: 4-way angle).

A subclass provides ``logits_and_labels(images, generator)``; this base adds the cross-entropy loss with its
accuracy as the pretext metric, the seeded evaluation loss, and the validation score (pretext accuracy with fixed
draws, in eval mode, without side effects).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import PretextTask
from .errors import PretextConfigError


class ClassificationPretext(PretextTask):
    """A pretext task whose labels come from the views it draws (no mmpretrain algorithm does these)."""

    def logits_and_labels(self, images: torch.Tensor,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def compute_loss(self, images, indices, generator):
        logits, labels = self.logits_and_labels(images, generator)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.detach().argmax(1) == labels).float().mean()
        return {'loss': loss, 'pretext_acc': acc}

    def evaluation_loss(self, images, generator):
        with eval_mode(self):
            logits, labels = self.logits_and_labels(images, generator)
            return F.cross_entropy(logits, labels)

    @torch.no_grad()
    def validation_score(self, images, batch_size: int = 128) -> float:
        """Pretext accuracy on ``images`` (uint8 NHWC) with fixed draws, in eval mode, no side effects."""
        return pretext_accuracy(self, images, batch_size)


class eval_mode:
    """Context manager: eval mode inside, the previous train/eval mode restored after."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)
        return False


def pretext_accuracy(task, images, batch_size: int) -> float:
    """Accuracy of ``task.logits_and_labels`` over ``images`` in eval mode, each
    batch with a generator seeded by its start index (the base class's convention); -inf if logits are not
    finite."""
    if len(images) == 0:
        raise PretextConfigError(f'{task.name}: validation needs at least 1 image')
    correct, count = 0, 0
    with eval_mode(task):
        for batch, generator in task.seeded_batches(images, batch_size):
            logits, labels = task.logits_and_labels(batch, generator)
            if not bool(torch.isfinite(logits).all()):
                return float('-inf')
            correct += int((logits.argmax(1) == labels).sum())
            count += len(labels)
    score = correct / count
    return score if math.isfinite(score) else float('-inf')
