"""Downstream evaluation protocols of a backbone: linear probe, kNN, full fine-tuning, DVME fusion of several frozen
backbones (:mod:`.dvme`) and unsupervised domain adaptation to another dataset (:mod:`.uda`).

:func:`evaluate` is the common entry: it fits on ``dataset.train_indices(label_fraction, seed)``, selects on the
'val' split and reports on the 'test' split, for each requested protocol of :data:`PROTOCOLS`. Frozen features
are extracted once and shared by 'linear', 'knn' and 'dvme'. 'dvme' needs the other backbones
(``options={'dvme': {'sources': [(name, backbone), ...]}}``) and 'uda' the target dataset
(``options={'uda': {'target': PreparedDataset, 'method': ...}}``). The backbone (an mmpretrain backbone whose
forward returns a tuple of feature maps) is never modified: fine-tuning and adaptation work on a deep copy. The
protocols run the backbone as they get it: a backbone whose forward autocasts to bf16 and returns fp32 outputs (the
engine's ``curriculum.precision.apply_precision``) is evaluated in that precision, and its deep copies keep it;
heads, losses, the L-BFGS probe and kNN similarities are fp32.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from . import dvme, finetune, knn, linear, uda
from .features import Splits, extract_features, split_features, to_model_input

PROTOCOLS: dict[str, Callable[..., dict]] = {
    'linear': linear.run,
    'finetune': finetune.run,
    'knn': knn.run,
    'dvme': dvme.run,
    'uda': uda.run,
}
#: protocols that read the frozen features of the evaluated backbone (extracted once per evaluation)
FEATURE_PROTOCOLS = ('linear', 'knn', 'dvme')


def _check_names(names, what: str) -> None:
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown:
        raise ValueError(f'unknown {what} {unknown[0]!r}; known protocols: {", ".join(PROTOCOLS)}')


def evaluate(backbone: nn.Module, dataset, protocols: list[str], label_fraction: float = 1.0, seed: int = 0,
             device: torch.device | str = 'cpu', epochs: dict | None = None, batch_size: int = 64,
             options: dict | None = None) -> dict[str, dict]:
    """Evaluate ``backbone`` on a :class:`~benchmarks.datasets.PreparedDataset` with each of ``protocols``.

    Returns ``{protocol: {<test metrics>, 'headline': metric name, 'val': {<val metrics>}, 'num_train': int,
    'seconds': its wall time, ...protocol extras}}``. Test metrics are balanced_accuracy, accuracy, macro_f1, auc,
    kappa; the headline is balanced_accuracy (single-label) or auc (multi-label). ``epochs`` maps a protocol to
    its budget ('finetune': epochs, 'linear': L-BFGS iterations; 'knn' ignores it). ``options`` maps a protocol to
    extra keyword arguments of its ``run`` (e.g. ``{'finetune': {'lr': 1e-4}}``). The 'finetune' result also holds
    the fine-tuned model under ``'model'``.
    """
    protocols = list(protocols)
    _check_names(protocols, 'protocol')
    epochs = dict(epochs or {})
    options = dict(options or {})
    _check_names(epochs, 'protocol in epochs')
    _check_names(options, 'protocol in options')
    splits = Splits(train=dataset.train_indices(label_fraction, seed), val=dataset.indices('val'),
                    test=dataset.indices('test'))
    features, feature_seconds = None, 0.0
    if any(name in FEATURE_PROTOCOLS for name in protocols):
        started = time.perf_counter()
        features = split_features(backbone, dataset, splits, device)
        feature_seconds = time.perf_counter() - started
    results = {}
    for name in protocols:
        started = time.perf_counter()
        results[name] = PROTOCOLS[name](backbone, dataset, splits, device=device, seed=seed,
                                        epochs=epochs.get(name), batch_size=batch_size, features=features,
                                        **options.get(name, {}))
        # what each protocol cost (the compute plan of a study is made of these); the feature protocols share
        # one extraction, reported beside each of them
        results[name]['seconds'] = time.perf_counter() - started
        if name in FEATURE_PROTOCOLS:
            results[name]['feature_seconds'] = feature_seconds
    return results


__all__ = ['PROTOCOLS', 'Splits', 'evaluate', 'extract_features', 'split_features', 'to_model_input']
