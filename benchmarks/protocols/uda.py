"""Unsupervised domain adaptation (UDA): train on the labelled downstream data (the source), adapt to the unlabelled
training images of another dataset (the target), report metrics on the target's test split.

Methods (``method``; networks and losses in :mod:`.adaptation`):

* ``source_only`` — no alignment: the network is fine-tuned on the source alone (the target is never seen in
  training);
* ``dann`` — domain-adversarial training through a gradient reversal layer (Ganin & Lempitsky 2015);
* ``dcan`` — DCAN (Li et al., AAAI 2020): domain conditioned channel attention, feature-correction blocks on the
  target path, the MMD between source and corrected target activations (features and predictions), the entropy of
  the target predictions and the feature regulariser (per class, source activations vs corrected source
  activations); loss ``CE + ramp · (entropy_weight · H + mmd_weight · (MMD + regulariser))``, the authors' release's
  ``CE + β H + α (MMD + (1/C) Σ_k reg_k)``;
* ``dcan_noreg`` — the same without the feature regulariser, the AISEEME deliverable's variant.

Classes are matched by name (ignoring case), or by an explicit ``class_map`` ``{source class: target class}`` (a
source class may also map to a target class of another name, several source classes to one target class); source
images of classes without a counterpart are left out of training and target test images of classes without a
counterpart are left out of the metrics (both counted in the result). The classifier's classes are the matched
target classes. Fewer than two matched classes is a :class:`ClassMatchError`.

**Target labels are read once, for the final test metrics.** Training sees the target's training images as pixels
only (:meth:`PreparedDataset.unlabeled`); model selection cannot use target labels, so it uses either the last step
(``selection: last``, the default, as the DANN and DCAN papers report) or the balanced accuracy on the *source*
validation split (``selection: source_val``). The result's ``val`` holds source-validation metrics.

Recipe (for every method alike, so only the adaptation differs): both domains' batches are augmented as in
fine-tuning (random resized crop, horizontal flip), source and target batches of ``batch_size`` each go through the
backbone together; the optimiser is the fine-tuning protocol's (AdamW, lr 1e-3, weight decay 0.05; ``optimizer:
sgd`` gives the papers' SGD, lr 0.01, Nesterov momentum 0.9, weight decay 5e-4, made for ImageNet ResNet-50s), its
learning rate annealed as in DANN, ``lr / (1 + 10 p)^0.75`` (p: progress 0 → 1), the backbone at
``lr × backbone_lr_mult``; every adaptation loss is
weighted by DANN's ramp ``2 / (1 + exp(-10 p)) - 1`` (also the gradient reversal coefficient), so the source
classifier forms before the alignment pushes. The budget is ``steps`` optimiser steps, or ``epochs`` passes over the
matched source training images (default 20). Every draw comes from generators seeded with ``seed``; the caller's
RNG state is left as found.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import compute_metrics, headline_metric, test_metrics
from .adaptation import METHODS, SOURCE, TARGET, AdaptationNetwork, entropy, feature_regularizer, mmd2
from .features import Splits, feature_dim, image_batches, to_model_input
from .finetune import _step_batches, augment_batch
from .linear import balanced_loss, labels_tensor, scores_from_logits

DEFAULT_EPOCHS = 20
#: DCAN's MMD between source and corrected target *predictions* uses one Gaussian kernel exp(-d²/1.68) (the
#: bandwidth of the DCAN authors' release) rather than the features' adaptive multi-kernel: with the adaptive one,
#: measured on built-in chest X-rays (9600) -> PneumoniaMNIST, 28 px, seeds 0-2, 1060 steps, the source val balanced
#: accuracy of DCAN stayed at 0.47-0.53 (chance) while no alignment reached 0.83-0.86 (see mmd2's docstring)
PREDICTION_MMD_BANDWIDTH = 1.68
SELECTIONS = ('last', 'source_val')
#: options of the protocol (``evaluation.uda.<name>``) and their defaults
OPTIMIZERS = ('adamw', 'sgd')
OPTIONS = {'method': 'dcan', 'class_map': None, 'steps': None, 'optimizer': 'adamw', 'lr': None,
           'backbone_lr_mult': 1.0,
           'selection': 'last', 'eval_every': None, 'mmd_weight': 1.0, 'entropy_weight': 0.1, 'domain_weight': 1.0,
           'bottleneck': 256}


class ClassMatchError(ValueError):
    """Source and target classes that cannot be matched (fewer than two in common, or a bad ``class_map``)."""


def match_classes(source_names: list[str], target_names: list[str], class_map: dict | None = None) \
        -> tuple[dict[int, int], list[int]]:
    """``({source class index: position in the matched target classes}, matched target class indices)``.

    A source class maps to the target class named in ``class_map``, else to the target class of the same name
    (ignoring case), else to nothing. A ``class_map`` naming an unknown class, or fewer than two target classes
    reached, is a one-line :class:`ClassMatchError`."""
    class_map = dict(class_map or {})
    lower_source = {name.lower(): i for i, name in enumerate(source_names)}
    lower_target = {name.lower(): i for i, name in enumerate(target_names)}
    explicit = {}
    for source, target in class_map.items():
        if str(source).lower() not in lower_source:
            raise ClassMatchError(f'class_map: {source!r} is not a source class ({", ".join(source_names)})')
        if str(target).lower() not in lower_target:
            raise ClassMatchError(f'class_map: {target!r} is not a target class ({", ".join(target_names)})')
        explicit[lower_source[str(source).lower()]] = lower_target[str(target).lower()]
    to_target = {}
    for i, name in enumerate(source_names):
        if i in explicit:
            to_target[i] = explicit[i]
        elif name.lower() in lower_target:
            to_target[i] = lower_target[name.lower()]
    reached = sorted(set(to_target.values()))
    if len(reached) < 2:
        shared = ', '.join(target_names[t] for t in reached) or 'none'
        raise ClassMatchError(f'source classes ({", ".join(source_names)}) and target classes '
                              f'({", ".join(target_names)}) share {len(reached)} class(es) by name ({shared}); '
                              f'at least 2 are needed: map the others with evaluation.uda.class_map')
    position = {t: k for k, t in enumerate(reached)}
    return {s: position[t] for s, t in to_target.items()}, reached


def _ramp(progress: float) -> float:
    return 2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0


@torch.no_grad()
def predict(network: AdaptationNetwork, images_uint8, indices, domain: str, device, batch_size: int = 256) \
        -> np.ndarray:
    """Softmax scores of ``images_uint8[indices]`` through ``domain``'s path (eval mode; the mode is restored)."""
    was_training = network.training
    network.eval()
    chunks = []
    for batch in image_batches(images_uint8, indices, batch_size):
        chunks.append(network(to_model_input(batch.to(device)), domain)['logits'].float().cpu())
    network.train(was_training)
    return scores_from_logits(torch.cat(chunks), False)


def make_optimizer(network: AdaptationNetwork, kind: str, lr: float | None, backbone_lr_mult: float):
    """AdamW (lr 1e-3, weight decay 0.05: the fine-tuning protocol's) or SGD (lr 0.01, Nesterov momentum 0.9,
    weight decay 5e-4: the DANN / DCAN papers'); no decay on norms and biases; the backbone's groups at
    ``lr × backbone_lr_mult``."""
    if kind not in OPTIMIZERS:
        raise ValueError(f'optimizer must be one of {", ".join(OPTIMIZERS)}, got {kind!r}')
    lr = (1e-3 if kind == 'adamw' else 1e-2) if lr is None else float(lr)
    decay = 0.05 if kind == 'adamw' else 5e-4
    backbone_ids = {id(p) for p in network.backbone.parameters()}
    groups = {}
    for param in network.parameters():
        part = 'backbone' if id(param) in backbone_ids else 'head'
        key = (part, param.ndim <= 1)
        groups.setdefault(key, []).append(param)
    param_groups = [{'params': params, 'lr': lr * (backbone_lr_mult if part == 'backbone' else 1.0),
                     'weight_decay': 0.0 if no_decay else decay} for (part, no_decay), params in groups.items()]
    if kind == 'adamw':
        return torch.optim.AdamW(param_groups, lr=lr)
    return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)


def adapt(backbone: nn.Module, source_images, source_labels: np.ndarray, source_val: np.ndarray,
          source_val_labels: np.ndarray, target_images, num_classes: int, *, method: str = 'dcan',
          steps: int, batch_size: int = 64, optimizer: str = 'adamw', lr: float | None = None,
          backbone_lr_mult: float = 1.0,
          selection: str = 'last', eval_every: int | None = None, mmd_weight: float = 1.0,
          entropy_weight: float = 0.1, domain_weight: float = 1.0, bottleneck: int = 256, seed: int = 0,
          device: torch.device | str = 'cpu') -> tuple[AdaptationNetwork, dict]:
    """Train an :class:`AdaptationNetwork` on a copy of ``backbone``; returns ``(network in eval mode, record)``.

    ``source_images`` are the source training images (uint8 ``(n, H, W, C)``) with ``source_labels`` (int, in
    ``[0, num_classes)``); ``source_val`` / ``source_val_labels`` are the source validation images and labels
    (selection and the result's ``val``); ``target_images`` are the target training images: pixels only, no label is
    passed in. ``record``: ``val`` (source val metrics of the kept weights), ``best_step``, ``steps_run``,
    ``history`` (``[step, source val headline, mean loss since the last evaluation]``)."""
    if method not in METHODS:
        raise ValueError(f'unknown UDA method {method!r}; known: {", ".join(METHODS)}')
    if selection not in SELECTIONS:
        raise ValueError(f'selection must be one of {", ".join(SELECTIONS)}, got {selection!r}')
    device = torch.device(device)
    generator = torch.Generator().manual_seed(int(seed))
    eval_every = max(1, steps // 10) if eval_every is None else int(eval_every)
    image_size, channels = int(source_images.shape[1]), int(source_images.shape[-1])
    fork_devices = [device.index or 0] if device.type == 'cuda' else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        network_backbone = copy.deepcopy(backbone).to(device)
        network_backbone.requires_grad_(True)
        network = AdaptationNetwork(network_backbone, feature_dim(network_backbone, channels, image_size),
                                    num_classes, method, bottleneck).to(device)
        optimizer = make_optimizer(network, optimizer, lr, backbone_lr_mult)
        base_lrs = [group['lr'] for group in optimizer.param_groups]
        labels = labels_tensor(source_labels, False)
        loss_fn = balanced_loss(labels, num_classes, False, True, device)
        source_batches = _step_batches(len(source_images), batch_size, generator)
        target_batches = _step_batches(len(target_images), batch_size, generator)
        best_state, best_val, best_step, history, losses = None, None, 0, [], []
        network.train()
        for step in range(steps):
            progress = step / max(1, steps)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group['lr'] = base / (1.0 + 10.0 * progress) ** 0.75
            ramp = _ramp(progress)
            pick = next(source_batches).numpy()
            xs = augment_batch(to_model_input(torch.as_tensor(np.asarray(source_images[pick])).to(device)),
                               generator)
            ys = labels[pick].to(device)
            if method == 'source_only':
                out_s = network(xs, SOURCE)
                loss = loss_fn(out_s['logits'], ys)
            else:
                take = next(target_batches).numpy()
                xt = augment_batch(to_model_input(torch.as_tensor(np.asarray(target_images[take])).to(device)),
                                   generator)
                out_s, out_t = network.forward_pair(xs, xt)
                loss = loss_fn(out_s['logits'], ys)
                if method == 'dann':
                    domain_logits = network.domain_classifier(torch.cat([out_s['features'], out_t['features']]),
                                                              ramp)
                    domains = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).to(device)
                    loss = loss + domain_weight * F.binary_cross_entropy_with_logits(domain_logits, domains)
                else:  # dcan / dcan_noreg: entropy of the corrected target predictions, MMD of source and corrected
                    # target activations, and (dcan only) the feature regulariser, weighted as in the authors' release
                    probs_s = torch.softmax(out_s['logits'], 1)
                    discrepancy = mmd2(out_s['features'], out_t['features']) + mmd2(
                        probs_s, torch.softmax(out_t['logits'], 1), bandwidth=PREDICTION_MMD_BANDWIDTH)
                    if method == 'dcan':
                        corrected_s = network.corrected(out_s['features'])
                        discrepancy = discrepancy + feature_regularizer(
                            out_s['features'], probs_s, corrected_s['features'],
                            torch.softmax(corrected_s['logits'], 1), ys, num_classes, generator,
                            prediction_bandwidth=PREDICTION_MMD_BANDWIDTH)
                    loss = loss + ramp * (entropy_weight * entropy(out_t['logits']) + mmd_weight * discrepancy)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                scores = predict(network, source_val, None, SOURCE, device)
                val_metrics = compute_metrics(source_val_labels, scores, False)
                history.append([step + 1, float(val_metrics[headline_metric(False)]), float(np.mean(losses))])
                losses = []
                better = best_val is None or val_metrics[headline_metric(False)] >= best_val[headline_metric(False)]
                if selection == 'last' or better:
                    best_val, best_step = val_metrics, step + 1
                    if selection == 'source_val':
                        best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
        if best_state is not None:
            network.load_state_dict(best_state)
    network.eval()
    return network, {'val': best_val, 'best_step': best_step, 'steps_run': steps, 'history': history}


def run(backbone: nn.Module, dataset, splits: Splits, *, device: torch.device | str = 'cpu', seed: int = 0,
        epochs: int | None = None, batch_size: int = 64, features: dict | None = None, target=None,
        **options) -> dict:
    """UDA protocol: ``dataset`` (its ``splits.train`` / ``splits.val``) is the labelled source, ``target`` (a
    :class:`~benchmarks.datasets.PreparedDataset`, single-label) the target; ``options`` are those of
    :data:`OPTIONS`. Returns the target-test metrics (with the bootstrap interval of the headline), ``val`` (source
    validation metrics), ``method``, ``classes`` (the matched target classes), ``class_map`` (source → target),
    ``left_out`` (source training and target test images of unmatched classes), ``num_target_train``, ``steps``,
    ``best_step``, ``selection`` and ``history``."""
    del features
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f'unknown UDA option(s) {", ".join(unknown)}; known: {", ".join(OPTIONS)}')
    settings = {**OPTIONS, **{key: value for key, value in options.items() if value is not None}}
    if target is None:
        raise ValueError('the uda protocol needs a target dataset')
    if dataset.multilabel or target.multilabel:
        raise ValueError('the uda protocol handles single-label source and target data only')
    mapping, reached = match_classes(list(dataset.class_names), list(target.class_names), settings['class_map'])
    source_labels = np.asarray(dataset.labels)

    def matched(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices)
        keep = np.isin(source_labels[indices], list(mapping))
        kept = indices[keep]
        return kept, np.asarray([mapping[int(c)] for c in source_labels[kept]], dtype=np.int64)

    train_idx, train_y = matched(splits.train)
    val_idx, val_y = matched(splits.val)
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise ValueError('no source training or validation image of a matched class')
    target_train = target.unlabeled('train').images          # pixels only: no label of the target is passed on
    steps = settings['steps']
    if steps is None:
        passes = DEFAULT_EPOCHS if epochs is None else int(epochs)
        steps = passes * max(1, math.ceil(len(train_idx) / batch_size))
    network, record = adapt(
        backbone, dataset.images[train_idx], train_y, dataset.images[val_idx], val_y, target_train, len(reached),
        method=settings['method'], steps=int(steps), batch_size=batch_size, optimizer=settings['optimizer'],
        lr=None if settings['lr'] is None else float(settings['lr']),
        backbone_lr_mult=float(settings['backbone_lr_mult']), selection=settings['selection'],
        eval_every=settings['eval_every'], mmd_weight=float(settings['mmd_weight']),
        entropy_weight=float(settings['entropy_weight']), domain_weight=float(settings['domain_weight']),
        bottleneck=int(settings['bottleneck']), seed=seed, device=device)
    # the final test evaluation: the only place target labels are read
    test_idx = target.indices('test')
    test_labels = np.asarray(target.labels[test_idx])
    keep = np.isin(test_labels, reached)
    if not keep.any():
        raise ValueError(f'{target.name}: no test image of a matched class')
    scores = predict(network, target.images, test_idx[keep], TARGET, device)
    y_true = np.searchsorted(reached, test_labels[keep])
    result = test_metrics(y_true, scores, False, seed=seed)
    source_counts = np.bincount(source_labels[np.asarray(splits.train)], minlength=dataset.num_classes)
    test_counts = np.bincount(test_labels, minlength=target.num_classes)
    result.update(
        val=record['val'], method=settings['method'], selection=settings['selection'],
        classes=[target.class_names[t] for t in reached],
        class_map={dataset.class_names[s]: target.class_names[reached[k]] for s, k in sorted(mapping.items())},
        left_out={'source_train': {dataset.class_names[c]: int(source_counts[c]) for c in range(dataset.num_classes)
                                   if c not in mapping and source_counts[c]},
                  'target_test': {target.class_names[c]: int(test_counts[c]) for c in range(target.num_classes)
                                  if c not in reached and test_counts[c]}},
        num_target_train=int(len(target_train)), num_target_test=int(keep.sum()), steps=int(steps),
        best_step=record['best_step'], history=record['history'], headline=headline_metric(False),
        num_train=int(len(train_idx)), target=target.name)
    return result
