"""Split batch normalisation: batch statistics per group of a batch, as if the batch were spread over several devices.

Why a contrastive task on one device needs it (MoCo, He et al. CVPR 2020, section 3.3 "Shuffling BN"): with plain
batch norm the query of an image and its positive key are normalised with statistics of the same batch, while the
queue's negatives come from earlier batches. The network can then tell "this batch" from "the queue" through the
batch statistics instead of learning features of the image, and the pretext task is solved without a useful
representation. MoCo avoids it with one BN per GPU and a shuffle of the key batch across GPUs, so that a query and
its key are normalised with different sets of images. On one device (every CPU run here) this module plays the
several GPUs: :class:`SplitBatchNorm2d` normalises each of ``num_splits`` groups with its own statistics, and the
task's key batch is shuffled before the key encoder (mmpretrain's ``batch_shuffle_ddp`` already permutes it).

Written here because torch and mmpretrain have no such layer, and lightly's ``SplitBatchNorm`` keeps
``num_splits`` copies of the running statistics (a state dict the next stage's plain ResNet cannot load strictly).
This one keeps the state of :class:`torch.nn.BatchNorm2d` (same keys, same shapes): the running statistics are
updated with the mean of the groups' statistics, and in eval mode (monitor, evaluation, the next stage) it is
plain batch norm. Groups are contiguous blocks of the batch; a batch not divisible by ``num_splits`` (or a split
count of 1) falls back to plain batch norm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` whose training-mode statistics are computed per group of the batch."""

    num_splits: int = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = self.num_splits
        if not self.training or splits <= 1 or x.shape[0] % splits or x.shape[0] // splits < 2:
            return super().forward(x)
        momentum = 0.1 if self.momentum is None else self.momentum
        tracked = self.track_running_stats and self.running_mean is not None
        outputs, means, variances = [], [], []
        for group in x.chunk(splits, dim=0):
            mean = self.running_mean.clone() if tracked else None
            var = self.running_var.clone() if tracked else None
            outputs.append(F.batch_norm(group, mean, var, self.weight, self.bias, True, momentum, self.eps))
            means.append(mean)
            variances.append(var)
        if tracked:
            with torch.no_grad():  # every group's EMA step started from the same state: their mean is the update
                self.running_mean.copy_(torch.stack(means).mean(0))
                self.running_var.copy_(torch.stack(variances).mean(0))
                self.num_batches_tracked.add_(1)
        return torch.cat(outputs, dim=0)


def split_batch_norm(module: nn.Module, num_splits: int) -> int:
    """Make every :class:`torch.nn.BatchNorm2d` under ``module`` a :class:`SplitBatchNorm2d` with ``num_splits``
    groups, in place (parameters, buffers and state-dict keys unchanged); nothing for ``num_splits <= 1``. Returns
    how many layers were changed."""
    changed = 0
    if int(num_splits) <= 1:
        return changed
    for layer in module.modules():
        if type(layer) in (nn.BatchNorm2d, SplitBatchNorm2d):  # not SyncBatchNorm nor other subclasses
            layer.__class__ = SplitBatchNorm2d
            layer.num_splits = int(num_splits)
            changed += 1
    return changed
