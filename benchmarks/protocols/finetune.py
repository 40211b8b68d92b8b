"""Full fine-tuning of a copy of the backbone with a linear head.

Training batches are augmented on the device, on the whole batch tensor: a random resized crop (area and aspect
ratio drawn per sample) plus flips, expressed as one affine matrix per sample and applied with
``affine_grid`` / ``grid_sample``. The loss is the class-balanced cross-entropy (masked BCE for multi-label) of
:mod:`.linear`; the learning rate follows a linear warm-up then a cosine decay per step. After every epoch the
validation headline metric is computed and the best epoch's weights are kept; test metrics are reported for them.

With ``steps`` the budget is a number of optimiser steps instead, the same whatever the size of the labeled subset
(epochs scale it with the label fraction: 1 % of the labels would get 100x fewer steps than 100 %): passes over the
subset are reshuffled and chained, the schedule spans ``steps``, validation runs every ``eval_every`` steps and the
run may stop early after ``patience`` evaluations without improvement.

Every random draw (head initialisation, data order, augmentation) comes from a ``torch.Generator`` seeded with
``seed``; anything inside the backbone that uses the global RNG (drop-path) runs under a forked, seeded RNG, so a
run is reproducible and leaves the caller's RNG state untouched. The returned :class:`FineTunedModel` exposes
``backbone`` and ``head`` (for Grad-CAM, the last backbone stage).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import compute_metrics, headline_metric, test_metrics
from .features import Splits, feature_dim, image_batches, pooled_features, to_model_input
from .linear import balanced_loss, labels_tensor, scores_from_logits, selection_value

DEFAULT_EPOCHS = 20


class FineTunedModel(nn.Module):
    """Backbone + global average pooling + linear head; ``forward`` takes :func:`to_model_input` output."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, multilabel: bool = False):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, num_classes)
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, x))


def augment_batch(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.6, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True, vflip: bool = False) -> torch.Tensor:
    """Per-sample random resized crop (``scale`` = kept area fraction) and flips of an ``(N, C, H, W)`` batch.

    Random numbers are drawn on the CPU from ``generator`` (device-independent, reproducible); the warp runs on
    ``x``'s device. Crops stay inside the image."""
    n = x.shape[0]
    draws = torch.rand(n, 6, generator=generator, dtype=torch.float64)
    area = scale[0] + (scale[1] - scale[0]) * draws[:, 0]
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[:, 1]
    aspect = log_ratio.exp()
    width = (area * aspect).sqrt().clamp(max=1.0)   # fraction of the image width kept
    height = (area / aspect).sqrt().clamp(max=1.0)
    shift_x = (2 * draws[:, 2] - 1) * (1 - width)   # crop centre in normalised coordinates
    shift_y = (2 * draws[:, 3] - 1) * (1 - height)
    no_flip = torch.ones(n, dtype=torch.float64)
    flip_x = torch.where(draws[:, 4] < 0.5, -1.0, 1.0) if hflip else no_flip
    flip_y = torch.where(draws[:, 5] < 0.5, -1.0, 1.0) if vflip else no_flip
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = width * flip_x
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = height * flip_y
    theta[:, 1, 2] = shift_y
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


@torch.no_grad()
def predict_scores(model: FineTunedModel, images_uint8, indices: np.ndarray | None = None,
                   device: torch.device | str = 'cpu', batch_size: int = 256) -> np.ndarray:
    """Probabilities of ``images_uint8[indices]`` (softmax, or sigmoid for a multi-label model); eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks = []
    for batch in image_batches(images_uint8, indices, batch_size):
        logits = model(to_model_input(batch.to(device)))
        chunks.append(logits.float().cpu())
    model.train(was_training)
    return scores_from_logits(torch.cat(chunks), model.multilabel)


def _batches(count: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """A shuffled epoch of index batches; a trailing batch of one image (which BatchNorm rejects) is dropped."""
    order = torch.randperm(count, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()
    return batches


def _step_batches(count: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches of ``max(2, min(batch_size, count))`` images cut from chained shuffled passes over
    ``count`` images (a batch may span two passes). Never a batch of one, which BatchNorm rejects: a one-image
    subset gives that image twice, augmented differently."""
    if count < 1:
        raise ValueError('step-based fine-tuning needs at least one training image')
    size = max(2, min(batch_size, count))
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < size:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:size]
        pending = pending[size:]


def _check_step_budget(steps: int | None, eval_every: int | None, patience: int | None) -> int | None:
    """ValueError for a bad step budget; returns the evaluation interval (default ``max(1, steps // 20)``)."""
    for name, value in (('steps', steps), ('eval_every', eval_every), ('patience', patience)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f'{name} must be None or a positive integer, got {value!r}')
    if steps is None:
        if eval_every is not None or patience is not None:
            raise ValueError('eval_every and patience apply to step-based fine-tuning only: set steps')
        return None
    if eval_every is not None and eval_every > steps:
        raise ValueError(f'eval_every ({eval_every}) must not exceed steps ({steps})')
    return max(1, steps // 20) if eval_every is None else eval_every


class _BestWeights:
    """The best validation metrics so far and a CPU copy of the weights they were measured with."""

    def __init__(self, multilabel: bool):
        self.multilabel = multilabel
        self.val, self.at, self.state = None, 0, None

    def offer(self, model: nn.Module, val_metrics: dict, at: int) -> bool:
        """Keep ``model``'s weights when ``val_metrics`` are at least as good as the best (ties go to the later
        evaluation, further down the cosine schedule); True when they are strictly better (an improvement)."""
        value = selection_value(val_metrics, self.multilabel)
        best = None if self.val is None else selection_value(self.val, self.multilabel)
        if best is None or value >= best:
            self.val, self.at = val_metrics, at
            self.state = {key: tensor.detach().to('cpu', copy=True) for key, tensor in model.state_dict().items()}
        return best is None or value > best


def _make_optimizer(model: nn.Module, optimizer: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)  # no decay on norms and biases
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    if optimizer == 'sgd':
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    if optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f'unknown optimizer {optimizer!r}; known: adamw, sgd')


def finetune(backbone: nn.Module, images_uint8, labels: np.ndarray, splits: Splits, num_classes: int,
             multilabel: bool = False, *, epochs: int = DEFAULT_EPOCHS, batch_size: int = 64, seed: int = 0,
             device: torch.device | str = 'cpu', optimizer: str = 'adamw', lr: float | None = None,
             weight_decay: float = 0.05, class_balanced: bool = True, warmup_fraction: float = 0.05,
             aug_scale: tuple[float, float] = (0.6, 1.0), hflip: bool = True, vflip: bool = False,
             eval_batch_size: int = 256, steps: int | None = None, eval_every: int | None = None,
             patience: int | None = None) -> tuple[dict, FineTunedModel]:
    """Fine-tune a deep copy of ``backbone`` on ``splits.train``; returns ``(result, model)``.

    ``result`` holds the test metrics of the best-validation epoch, ``val`` (its validation metrics),
    ``best_epoch`` (1-based) and ``val_history`` (headline per epoch). ``model`` carries those weights, in eval
    mode on ``device``. ``lr`` defaults to 1e-3 for AdamW and 1e-2 for SGD.

    With ``steps`` (``epochs`` is then ignored): at most ``steps`` optimiser steps on batches of
    ``max(2, min(batch_size, subset size))``, validation every ``eval_every`` steps (default ``max(1, steps // 20)``)
    and at the last step, early stop once ``patience`` evaluations in a row bring no strict improvement (None:
    never). ``result`` then holds the best evaluation's test and ``val`` metrics, ``best_epoch=None``, ``best_step``,
    ``steps_run``, ``stopped_early`` and ``val_history`` as ``[step, headline]`` pairs."""
    eval_every = _check_step_budget(steps, eval_every, patience)
    device = torch.device(device)
    labels = np.asarray(labels)
    lr = (1e-3 if optimizer == 'adamw' else 1e-2) if lr is None else float(lr)
    generator = torch.Generator().manual_seed(int(seed))
    image_size, channels = int(images_uint8.shape[1]), int(images_uint8.shape[-1])

    network = copy.deepcopy(backbone).to(device)
    network.requires_grad_(True)  # full fine-tuning, even of a backbone handed over frozen
    model = FineTunedModel(network, feature_dim(network, channels, image_size), num_classes, multilabel)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.01)
        model.head.bias.zero_()
    model.to(device)

    train_idx = np.asarray(splits.train)
    train_labels = labels_tensor(labels[train_idx], multilabel)
    loss_fn = balanced_loss(train_labels, num_classes, multilabel, class_balanced, device)
    opt = _make_optimizer(model, optimizer, lr, weight_decay)
    if steps is None:
        steps_per_epoch = len(_batches(len(train_idx), batch_size, torch.Generator().manual_seed(0)))
        total_steps = max(1, steps_per_epoch * epochs)
    else:
        total_steps = steps
    warmup = round(warmup_fraction * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)

    def train_step(batch: torch.Tensor) -> None:
        pick = train_idx[batch.numpy()]
        images = torch.as_tensor(np.asarray(images_uint8[pick])).to(device)
        targets = train_labels[batch].to(device)
        x = augment_batch(to_model_input(images), generator, aug_scale, hflip=hflip, vflip=vflip)
        logits = model(x)
        loss = loss_fn(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()

    def validation_metrics() -> dict:
        val_scores = predict_scores(model, images_uint8, splits.val, device, eval_batch_size)
        return compute_metrics(labels[splits.val], val_scores, multilabel)

    best, history = _BestWeights(multilabel), []
    steps_run, stopped_early = 0, False
    fork_devices = [device.index or 0] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        if steps is None:
            for epoch in range(1, epochs + 1):
                model.train()
                for batch in _batches(len(train_idx), batch_size, generator):
                    train_step(batch)
                val_metrics = validation_metrics()
                history.append(val_metrics[headline_metric(multilabel)])
                best.offer(model, val_metrics, epoch)
        else:
            batches = _step_batches(len(train_idx), batch_size, generator)
            evaluations_without_improvement = 0
            model.train()
            while steps_run < steps:
                train_step(next(batches))
                steps_run += 1
                if steps_run % eval_every == 0 or steps_run == steps:
                    val_metrics = validation_metrics()   # predict_scores puts the model back in training mode
                    history.append([steps_run, float(val_metrics[headline_metric(multilabel)])])
                    improved = best.offer(model, val_metrics, steps_run)
                    evaluations_without_improvement = 0 if improved else evaluations_without_improvement + 1
                    if patience is not None and evaluations_without_improvement >= patience and steps_run < steps:
                        stopped_early = True
                        break
    if best.state is not None:
        model.load_state_dict(best.state)
    model.eval()
    test_scores = predict_scores(model, images_uint8, splits.test, device, eval_batch_size)
    result = test_metrics(labels[splits.test], test_scores, multilabel, seed=seed)
    best_val = best.val if best.val is not None else {}
    if steps is None:
        result.update(val=best_val, best_epoch=best.at, val_history=history)
    else:
        result.update(val=best_val, best_epoch=None, val_history=history, best_step=best.at, steps_run=steps_run,
                      stopped_early=stopped_early)
    return result, model


def run(backbone: nn.Module, dataset, splits: Splits, *, device: torch.device | str = 'cpu', seed: int = 0,
        epochs: int | None = None, batch_size: int = 64, features: dict | None = None, steps: int | None = None,
        eval_every: int | None = None, patience: int | None = None, **options) -> dict:
    """Fine-tuning protocol on ``dataset`` (``epochs`` defaults to 20; ``features`` is unused). ``steps``,
    ``eval_every`` and ``patience`` select the step budget of :func:`finetune`.

    The result also carries the fine-tuned model under ``'model'`` (drop it before serialising)."""
    del features
    result, model = finetune(backbone, dataset.images, dataset.labels, splits, dataset.num_classes,
                             dataset.multilabel, epochs=DEFAULT_EPOCHS if epochs is None else int(epochs),
                             batch_size=batch_size, seed=seed, device=device, steps=steps, eval_every=eval_every,
                             patience=patience, **options)
    result.update(headline=headline_metric(dataset.multilabel), num_train=len(splits.train), model=model)
    return result
