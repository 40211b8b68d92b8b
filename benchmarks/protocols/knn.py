"""Weighted k-nearest-neighbour classification on frozen features (the InstDisc protocol).

Features are L2-normalised; each query takes its ``k`` most cosine-similar training images and sums their votes
weighted by ``exp(similarity / T)``. Class scores are the normalised votes; for multi-label data each label's score
is the weighted mean of the neighbours' known (non-NaN) targets, falling back to the training prevalence when no
neighbour knows the label. :func:`knn_score` is a cheap validation proxy (e.g. for learning-rate searches).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import compute_metrics, headline_metric, test_metrics
from .features import Splits, split_features

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_predict(train_feats: torch.Tensor, train_labels: np.ndarray, query_feats: torch.Tensor, num_classes: int,
                multilabel: bool = False, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                device: torch.device | str = 'cpu', chunk: int = 256) -> np.ndarray:
    """``(Q, num_classes)`` float64 scores of ``query_feats`` against the memory ``train_feats``."""
    device = torch.device(device)
    memory = F.normalize(train_feats.to(device, torch.float32), dim=1)
    k = max(1, min(int(k), len(memory)))
    if multilabel:
        targets = torch.as_tensor(np.asarray(train_labels), dtype=torch.float32, device=device)
        known = (~torch.isnan(targets)).float()
        targets = torch.nan_to_num(targets, nan=0.0)
        prevalence = (targets * known).sum(0) / known.sum(0).clamp_min(1)
    else:
        targets = F.one_hot(torch.as_tensor(np.asarray(train_labels), dtype=torch.int64, device=device),
                            num_classes).float()
    out = []
    for start in range(0, len(query_feats), chunk):
        query = F.normalize(query_feats[start:start + chunk].to(device, torch.float32), dim=1)
        sims, idx = (query @ memory.T).topk(k, dim=1)
        weights = ((sims - 1.0) / temperature).exp()  # exp(s/T) up to a per-query constant: no overflow
        if multilabel:
            w_known = (weights.unsqueeze(2) * known[idx]).sum(1)
            votes = (weights.unsqueeze(2) * targets[idx] * known[idx]).sum(1)
            scores = torch.where(w_known > 0, votes / w_known.clamp_min(1e-30), prevalence.expand_as(votes))
        else:
            votes = (weights.unsqueeze(2) * targets[idx]).sum(1)
            scores = votes / votes.sum(1, keepdim=True).clamp_min(1e-30)
        out.append(scores.double().cpu())
    return torch.cat(out).numpy()


def _is_multilabel(labels: np.ndarray) -> bool:
    return np.asarray(labels).ndim == 2


def knn_score(train_feats: torch.Tensor, train_labels: np.ndarray, val_feats: torch.Tensor,
              val_labels: np.ndarray, k: int = DEFAULT_K, num_classes: int | None = None,
              temperature: float = DEFAULT_TEMPERATURE, device: torch.device | str = 'cpu') -> float:
    """Balanced accuracy of kNN on a validation split (multi-label: mean per-label balanced accuracy at 0.5).

    Multi-label is recognised from 2-D labels; ``num_classes`` defaults to the largest label seen + 1."""
    train_labels, val_labels = np.asarray(train_labels), np.asarray(val_labels)
    multilabel = _is_multilabel(train_labels)
    if num_classes is None:
        num_classes = train_labels.shape[1] if multilabel else int(max(train_labels.max(), val_labels.max())) + 1
    scores = knn_predict(train_feats, train_labels, val_feats, num_classes, multilabel, k, temperature, device)
    return compute_metrics(val_labels, scores, multilabel)['balanced_accuracy']


def run(backbone: nn.Module, dataset, splits: Splits, *, device: torch.device | str = 'cpu', seed: int = 0,
        epochs: int | None = None, batch_size: int = 64, features: dict | None = None, k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """kNN protocol: training features are the memory; returns test metrics, ``val`` metrics and ``k``.

    Nothing is trained, so ``epochs`` and ``batch_size`` are unused; ``seed`` seeds the bootstrap interval."""
    del epochs, batch_size
    if features is None:
        features = split_features(backbone, dataset, splits, device)
    labels = np.asarray(dataset.labels)
    multilabel = dataset.multilabel

    def metrics_of(split: str, idx: np.ndarray) -> dict:
        scores = knn_predict(features['train'], labels[splits.train], features[split], dataset.num_classes,
                             multilabel, k, temperature, device)
        if split == 'test':
            return test_metrics(labels[idx], scores, multilabel, seed=seed)
        return compute_metrics(labels[idx], scores, multilabel)

    result = metrics_of('test', splits.test)
    result.update(val=metrics_of('val', splits.val), k=int(min(k, len(splits.train))),
                  headline=headline_metric(multilabel), num_train=len(splits.train))
    return result
