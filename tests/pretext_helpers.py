"""Shared helpers for pretext-task tests: a small synthetic_derm sample and a plain training loop.

The loop drives a task exactly as the stage runner does (``set_progress`` then mmengine's ``train_step``), without
the Runner's checkpointing, so task tests stay short.
"""
from __future__ import annotations

import logging
import tempfile
from types import SimpleNamespace

import numpy as np
import torch
from mmengine.optim import OptimWrapper
from torch.utils.data import DataLoader, RandomSampler

from pretext_tasks.data import IndexedImages, collate_batch


def train_task(task, images: np.ndarray, epochs: int, batch_size: int = 64, lr: float = 0.05,
               weight_decay: float = 1e-4, seed: int = 0, work_dir: str | None = None,
               on_epoch_end=None) -> list[dict[str, float]]:
    """Train ``task`` for ``epochs`` with SGD; returns per-epoch means of every logged value.

    The task's own mmengine hooks (``task.hooks()``) are called at the usual points with a minimal stand-in for
    the Runner (``model``, ``epoch``, ``iter``, ``max_epochs``, ``max_iters``, ``work_dir``, ``logger``).
    ``on_epoch_end(epoch, history)``, when given, is called after every epoch (e.g. to probe the backbone)."""
    torch.manual_seed(seed)
    dataset = IndexedImages(images)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_batch)
    optimizer = torch.optim.SGD(task.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    wrapper = OptimWrapper(optimizer)
    hooks = task.hooks()
    runner = SimpleNamespace(model=task, epoch=0, iter=0, max_epochs=epochs, max_iters=epochs * len(loader),
                             work_dir=work_dir or tempfile.mkdtemp(), logger=logging.getLogger('pretext-test'),
                             rank=0, world_size=1, train_dataloader=loader)
    history, iteration = [], 0
    task.train()
    for hook in hooks:
        hook.before_train(runner)
    for epoch in range(epochs):
        runner.epoch = epoch
        for hook in hooks:
            hook.before_train_epoch(runner)
        sums: dict[str, float] = {}
        count = 0
        for batch_idx, batch in enumerate(loader):
            runner.iter = iteration
            task.set_progress(epoch, iteration)
            for hook in hooks:
                hook.before_train_iter(runner, batch_idx, batch)
            log = task.train_step(batch, wrapper)
            for hook in hooks:
                hook.after_train_iter(runner, batch_idx, batch, log)
            for key, value in log.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
            iteration += 1
        for hook in hooks:
            hook.after_train_epoch(runner)
        history.append({k: v / max(count, 1) for k, v in sums.items()})
        if on_epoch_end is not None:
            on_epoch_end(epoch, history)
            task.train()
    return history


def knn_accuracy(backbone, images: np.ndarray, labels: np.ndarray, train_idx, val_idx, k: int = 20) -> float:
    """Balanced accuracy of a cosine kNN (k=20) on pooled backbone features: train → val."""
    from pretext_tasks.augment import normalize, to_float_nchw
    from pretext_tasks.base import pool_last

    backbone.eval()
    with torch.no_grad():
        feats = []
        for start in range(0, len(images), 256):
            x = normalize(to_float_nchw(torch.as_tensor(images[start:start + 256])))
            feats.append(pool_last(backbone(x)))
        feats = torch.nn.functional.normalize(torch.cat(feats), dim=1)
    backbone.train()
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    sims = feats[val_idx] @ feats[train_idx].T
    top = sims.topk(min(k, len(train_idx)), dim=1).indices.numpy()
    votes = labels[train_idx][top]
    classes = np.unique(labels)
    predicted = np.array([np.bincount(row, minlength=classes.max() + 1).argmax() for row in votes])
    truth = labels[val_idx]
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    return float(np.mean(recalls))
