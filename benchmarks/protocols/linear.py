"""Linear probe on frozen features.

Features are standardised with training statistics; one linear layer is fitted full-batch with L-BFGS for each
weight decay of a small grid, the decay with the best validation headline metric (balanced accuracy, or AUC for
multi-label) is kept and its test metrics are reported. The loss is class-balanced by default (inverse class
frequency for softmax heads, ``pos_weight = negatives / positives`` for sigmoid heads, whose NaN targets are
skipped). :func:`balanced_loss` is shared with the fine-tuning protocol.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import compute_metrics, headline_metric, test_metrics
from .features import Splits, split_features

WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
DEFAULT_MAX_ITER = 200
MAX_POS_WEIGHT = 100.0


def labels_tensor(labels: np.ndarray, multilabel: bool) -> torch.Tensor:
    """Labels as a tensor: int64 class ids, or float32 ``(N, C)`` with NaN kept."""
    labels = np.asarray(labels)
    return torch.as_tensor(labels, dtype=torch.float32 if multilabel else torch.int64)


def balanced_loss(train_labels: torch.Tensor, num_classes: int, multilabel: bool, class_balanced: bool = True,
                  device: torch.device | str = 'cpu') -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss(logits, targets)`` closure: (weighted) cross-entropy, or masked BCE for multi-label.

    Single-label weights are ``n / (present_classes * count_c)`` (absent classes weight 0); multi-label positives
    are weighted by ``negatives / positives`` per label (capped at 100). NaN targets contribute nothing.
    """
    train_labels = train_labels.cpu()
    if multilabel:
        pos_weight = None
        if class_balanced:
            known = ~torch.isnan(train_labels)
            positives = ((train_labels > 0.5) & known).sum(0).float()
            negatives = (known.sum(0) - positives).float()
            ratio = torch.where(positives > 0, negatives / positives.clamp_min(1), torch.ones_like(positives))
            pos_weight = ratio.clamp(1.0 / MAX_POS_WEIGHT, MAX_POS_WEIGHT).to(device)

        def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            known = ~torch.isnan(targets)
            per_entry = F.binary_cross_entropy_with_logits(logits.float(), torch.nan_to_num(targets, nan=0.0),
                                                           pos_weight=pos_weight, reduction='none')
            return (per_entry * known).sum() / known.sum().clamp_min(1)

        return masked_bce
    weight = None
    if class_balanced:
        counts = torch.bincount(train_labels, minlength=num_classes).float()
        present = (counts > 0).sum().clamp_min(1)
        weight = torch.where(counts > 0, len(train_labels) / (present * counts.clamp_min(1)),
                             torch.zeros_like(counts)).to(device)

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, weight=weight)

    return cross_entropy


def scores_from_logits(logits: torch.Tensor, multilabel: bool) -> np.ndarray:
    """Probabilities as float64 numpy: sigmoid (multi-label) or softmax."""
    logits = logits.float()
    probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)
    return probs.cpu().double().numpy()


def selection_value(metrics: dict, multilabel: bool) -> float:
    """The headline metric used for model selection, with NaN mapped to -inf."""
    value = metrics[headline_metric(multilabel)]
    return float('-inf') if np.isnan(value) else float(value)


def fit_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, multilabel: bool,
               weight_decay: float, class_balanced: bool = True, max_iter: int = DEFAULT_MAX_ITER,
               device: torch.device | str = 'cpu') -> nn.Linear:
    """Full-batch L-BFGS fit of ``nn.Linear(D, num_classes)`` from zero, with L2 penalty ``weight_decay/2 ||W||²``
    (bias not penalised). ``train_x`` should already be standardised."""
    device = torch.device(device)
    x = train_x.to(device, torch.float32)
    y = train_y.to(device)
    layer = nn.Linear(x.shape[1], num_classes).to(device)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    loss_fn = balanced_loss(train_y, num_classes, multilabel, class_balanced, device)
    optimizer = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn='strong_wolfe')

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return layer.eval()


@torch.no_grad()
def predict_linear(layer: nn.Linear, x: torch.Tensor, multilabel: bool) -> np.ndarray:
    """Class probabilities of standardised features ``x``."""
    device = layer.weight.device
    return scores_from_logits(layer(x.to(device, torch.float32)), multilabel)


def standardise(train_x: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Centre and scale every tensor with the per-dimension mean and std of ``train_x``."""
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True) if len(train_x) > 1 else torch.ones_like(mean)
    std = std.clamp_min(1e-6)
    return [(t - mean) / std for t in (train_x, *others)]


def linear_probe_features(train_x: torch.Tensor, train_y: np.ndarray, val_x: torch.Tensor, val_y: np.ndarray,
                          test_x: torch.Tensor, test_y: np.ndarray, num_classes: int, multilabel: bool = False,
                          weight_decays: tuple[float, ...] = WEIGHT_DECAYS, max_iter: int = DEFAULT_MAX_ITER,
                          class_balanced: bool = True, device: torch.device | str = 'cpu') -> dict:
    """Linear probe on precomputed features; returns test metrics plus ``val`` (metrics of the selected decay),
    ``weight_decay`` (selected) and ``val_grid`` (headline per decay)."""
    train_x, val_x, test_x = standardise(train_x.float(), val_x.float(), test_x.float())
    train_t = labels_tensor(train_y, multilabel)
    best = None
    grid = {}
    for decay in weight_decays:
        layer = fit_linear(train_x, train_t, num_classes, multilabel, decay, class_balanced, max_iter, device)
        val_metrics = compute_metrics(val_y, predict_linear(layer, val_x, multilabel), multilabel)
        grid[float(decay)] = val_metrics[headline_metric(multilabel)]
        if best is None or selection_value(val_metrics, multilabel) > selection_value(best[1], multilabel):
            best = (decay, val_metrics, layer)
    decay, val_metrics, layer = best
    result = test_metrics(test_y, predict_linear(layer, test_x, multilabel), multilabel)
    result.update(val=val_metrics, weight_decay=float(decay), val_grid=grid)
    return result


def run(backbone: nn.Module, dataset, splits: Splits, *, device: torch.device | str = 'cpu', seed: int = 0,
        epochs: int | None = None, batch_size: int = 64, features: dict | None = None,
        class_balanced: bool = True, weight_decays: tuple[float, ...] = WEIGHT_DECAYS) -> dict:
    """Linear protocol on ``dataset``; ``epochs`` is the L-BFGS iteration budget per fit (default 200).

    ``features`` may hold precomputed ``{'train', 'val', 'test'}`` features for ``splits``. ``seed`` and
    ``batch_size`` are unused (the fit is deterministic and full-batch)."""
    del seed, batch_size
    if features is None:
        features = split_features(backbone, dataset, splits, device)
    labels = np.asarray(dataset.labels)
    result = linear_probe_features(
        features['train'], labels[splits.train], features['val'], labels[splits.val], features['test'],
        labels[splits.test], dataset.num_classes, dataset.multilabel, weight_decays,
        DEFAULT_MAX_ITER if epochs is None else int(epochs), class_balanced, device)
    result.update(headline=headline_metric(dataset.multilabel), num_train=len(splits.train))
    return result
