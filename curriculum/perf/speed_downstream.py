"""Speed of the downstream protocols (linear probe, kNN, fine-tuning) in the default precision, fp32 and bf16.

The protocols run through :func:`benchmarks.protocols.evaluate` on the built-in ``synthetic_derm`` data with an
mmpretrain ResNet-18 backbone (random initialisation from ``seed``). Every precision gets a fresh deep copy of the
same backbone with :func:`curriculum.precision.apply_precision` applied for ``resolve_precision(amp, device)``:
``auto`` (the default: whatever this machine resolves), ``none`` (fp32) and ``bf16``. The linear probe and kNN
are evaluated in one call per precision, so they share one feature extraction, as a run that asks for both does
(the engine's default protocols); fine-tuning in another. The three precisions run back to back per call, in
``rounds`` rounds, so slow changes in the machine's load hit them alike; one untimed forward batch per precision
comes first (kernel selection).

A protocol's seconds: for linear and kNN the shared feature extraction of every train / val / test image plus
the protocol's own fit (L-BFGS, kNN similarities and metrics: fp32 by design); for fine-tuning the whole protocol.
"Images per second" counts the images the protocol pushes through the backbone: for linear and kNN every split
image once; for fine-tuning the training images x epochs plus the validation images x epochs plus the test
images. The pieces are timed by wrapping ``benchmarks.protocols.split_features``, the protocols' ``run`` functions
in ``benchmarks.protocols.PROTOCOLS`` and ``benchmarks.protocols.finetune.predict_scores`` for the duration of a
call (the backbone-bound part: feature extraction, or fine-tuning's val / test prediction). Balanced accuracy of
every precision is recorded (same seed), so parity is visible.
"""
from __future__ import annotations

import contextlib
import copy
import time

import numpy as np
import torch

PROTOCOL_ORDER = ('linear', 'knn', 'finetune')
#: (name, amp): the default precision, fp32 and bf16
VARIANTS = (('default', 'auto'), ('fp32', 'none'), ('bf16', 'bf16'))


@contextlib.contextmanager
def timed_attribute(module, name: str, seconds: list):
    """Replace ``module.name`` (a function) by a wrapper that appends each call's wall seconds to ``seconds``."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


def precision_backbones(base: torch.nn.Module, device: str, variants=VARIANTS) -> dict:
    """``{name: (backbone copy with apply_precision, Precision)}`` for each ``(name, amp)`` variant."""
    from curriculum.precision import apply_precision, resolve_precision

    out = {}
    for name, amp in variants:
        precision = resolve_precision(amp, device)
        backbone = copy.deepcopy(base).to(device)
        apply_precision(backbone, backbone, precision)
        backbone.eval()
        out[name] = (backbone, precision)
    return out


def processed_images(protocol: str, splits: dict, epochs: dict) -> tuple[int, str]:
    """Images the protocol runs through the backbone, and the rule."""
    if protocol == 'finetune':
        e = int(epochs.get('finetune', 1))
        return (splits['train'] * e + splits['val'] * e + splits['test'],
                f'train x {e} epochs + val x {e} + test')
    return splits['train'] + splits['val'] + splits['test'], 'features of train + val + test (then the fit)'


@contextlib.contextmanager
def timed_protocols(names, seconds: dict):
    """Time each protocol's ``run`` in :data:`benchmarks.protocols.PROTOCOLS` (``seconds[name]``) while active."""
    from benchmarks.protocols import PROTOCOLS

    originals = {name: PROTOCOLS[name] for name in names}

    def timed(name):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                return originals[name](*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return run

    for name in names:
        PROTOCOLS[name] = timed(name)
    try:
        yield
    finally:
        PROTOCOLS.update(originals)


def run_protocols(protocols: list[str], backbone, dataset, device: str, seed: int, epochs: dict,
                  batch_size: int) -> dict[str, dict]:
    """One timed :func:`benchmarks.protocols.evaluate` call for ``protocols``. Each protocol's seconds are its own
    ``run`` plus the shared feature extraction where it uses one (linear, kNN: ``evaluate`` extracts the frozen
    features once for both, as a run asking for both does); ``backbone_bound_seconds`` is that extraction, or for
    fine-tuning its val / test prediction."""
    import benchmarks.protocols as protocol_module
    from benchmarks.protocols import FEATURE_PROTOCOLS
    from benchmarks.protocols import finetune as finetune_module

    extraction: list[float] = []
    prediction: list[float] = []
    own: dict[str, float] = {}
    with timed_attribute(protocol_module, 'split_features', extraction), \
            timed_attribute(finetune_module, 'predict_scores', prediction), timed_protocols(protocols, own):
        results = protocol_module.evaluate(backbone, dataset, protocols, seed=seed, device=device,
                                           epochs={k: v for k, v in epochs.items() if k in protocols},
                                           batch_size=batch_size)
    out = {}
    for name in protocols:
        result = results[name]
        result.pop('model', None)
        bound = sum(extraction) if name in FEATURE_PROTOCOLS else sum(prediction)
        seconds = own[name] + (sum(extraction) if name in FEATURE_PROTOCOLS else 0.0)
        out[name] = {'seconds': seconds, 'balanced_accuracy': result.get('balanced_accuracy'),
                     'headline': result.get('headline'), 'headline_value': result.get(result.get('headline', '')),
                     'backbone_bound_seconds': bound, 'other_seconds': seconds - bound,
                     'best_epoch': result.get('best_epoch')}
    return out


def measure_downstream(image_size: int = 64, num_images: int | None = None, device: str = 'cpu', seed: int = 0,
                       protocols=PROTOCOL_ORDER, epochs: dict | None = None, batch_size: int = 64,
                       rounds: int = 1) -> dict:
    """Seconds, images/s and balanced accuracy of each protocol in the default precision, fp32 and bf16 (see the
    module docstring). Returns ``{protocol: {...}, 'setup': {...}}``."""
    from benchmarks.datasets import load_dataset
    from benchmarks.protocols import FEATURE_PROTOCOLS
    from benchmarks.protocols.features import extract_features
    from pretext_tasks.base import DEFAULT_BACKBONE, build_backbone

    epochs = {'finetune': 1, **(epochs or {})}
    options = {'num_images': int(num_images)} if num_images else {}
    started = time.perf_counter()
    dataset = load_dataset('synthetic_derm', None, image_size=image_size, seed=0, **options)
    load_seconds = time.perf_counter() - started
    splits = {'train': len(dataset.train_indices(1.0, seed)), 'val': len(dataset.indices('val')),
              'test': len(dataset.indices('test'))}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = build_backbone(dict(DEFAULT_BACKBONE))
    variants = precision_backbones(base, device)
    for backbone, _ in variants.values():  # untimed warm-up: one forward batch per precision
        extract_features(backbone, dataset.images[:batch_size], device, batch_size)

    # the frozen-feature protocols share one extraction per precision; fine-tuning runs on its own
    groups = [g for g in ([p for p in protocols if p in FEATURE_PROTOCOLS],
                          [p for p in protocols if p not in FEATURE_PROTOCOLS]) if g]
    runs: dict[str, dict[str, list[dict]]] = {p: {name: [] for name in variants} for p in protocols}
    for group in groups:
        for _ in range(max(1, rounds)):
            for name, (backbone, _) in variants.items():
                for protocol, run in run_protocols(group, backbone, dataset, device, seed, epochs,
                                                   batch_size).items():
                    runs[protocol][name].append(run)
    out: dict = {}
    for protocol in protocols:
        images, rule = processed_images(protocol, splits, epochs)
        entry: dict = {'images': images, 'images_rule': rule, 'rounds': max(1, rounds), 'variants': {}}
        for name, (_, precision) in variants.items():
            done = runs[protocol][name]
            seconds = float(np.mean([r['seconds'] for r in done]))
            entry['variants'][name] = {
                'seconds': seconds, 'round_seconds': [r['seconds'] for r in done],
                'images_per_s': images / seconds,
                'backbone_bound_seconds': float(np.mean([r['backbone_bound_seconds'] for r in done])),
                'other_seconds': float(np.mean([r['other_seconds'] for r in done])),
                'balanced_accuracy': done[-1]['balanced_accuracy'],
                'best_epoch': done[-1]['best_epoch'],
                'precision': precision.used, 'precision_requested': precision.requested,
                'precision_reason': precision.reason, 'channels_last_model': bool(precision.channels_last),
            }
        default, fp32, bf16 = (entry['variants'][n] for n in ('default', 'fp32', 'bf16'))
        accuracy_gap = (None if None in (bf16['balanced_accuracy'], fp32['balanced_accuracy'])
                        else bf16['balanced_accuracy'] - fp32['balanced_accuracy'])
        entry.update({
            'images_per_s': default['images_per_s'], 'seconds': default['seconds'],
            'fp32_seconds': fp32['seconds'], 'bf16_seconds': bf16['seconds'],
            'fp32_images_per_s': fp32['images_per_s'], 'bf16_images_per_s': bf16['images_per_s'],
            'speedup_vs_fp32': fp32['seconds'] / default['seconds'],
            'bf16_speedup_vs_fp32': fp32['seconds'] / bf16['seconds'],
            'precision': default['precision'], 'precision_reason': default['precision_reason'],
            'backbone_bound_share': default['backbone_bound_seconds'] / default['seconds'],
            'balanced_accuracy': default['balanced_accuracy'],
            'fp32_balanced_accuracy': fp32['balanced_accuracy'],
            'bf16_balanced_accuracy': bf16['balanced_accuracy'],
            'bf16_minus_fp32_balanced_accuracy': accuracy_gap,
        })
        if protocol in FEATURE_PROTOCOLS:
            entry['shared_feature_extraction'] = [p for p in protocols if p in FEATURE_PROTOCOLS]
        if protocol in epochs:
            entry['epochs'] = epochs[protocol]
        out[protocol] = entry
    out['setup'] = {
        'dataset': 'synthetic_derm', 'image_size': image_size, 'num_images': int(len(dataset.images)),
        'splits': splits, 'num_classes': int(dataset.num_classes), 'load_seconds': load_seconds,
        'backbone': f'mmpretrain ResNet-18 (out_indices=(3,)), random initialisation (seed {seed})',
        'device': device, 'batch_size': batch_size, 'epochs': epochs, 'seed': seed,
        'torch_threads': torch.get_num_threads(),
        'order': (f'{", ".join(variants)} back to back, {max(1, rounds)} round(s), first for '
                  f'{" + ".join(groups[0])}{", then for " + " + ".join(groups[1]) if len(groups) > 1 else ""}'),
        'total_seconds': time.perf_counter() - started,
    }
    return out
