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
               on_epoch_end=None, groups: np.ndarray | None = None, optimizer: str = 'sgd') -> list[dict[str, float]]:
    """Train ``task`` for ``epochs`` with SGD (momentum 0.9), or AdamW with ``optimizer='adamw'``; returns per-epoch
    means of every logged value. ``groups``: the images' int64 group ids, for a task that ``needs_groups`` (the
    batches then carry group partners).

    The task's own mmengine hooks (``task.hooks()``) are called at the usual points with a minimal stand-in for
    the Runner (``model``, ``epoch``, ``iter``, ``max_epochs``, ``max_iters``, ``work_dir``, ``logger``).
    ``on_epoch_end(epoch, history)``, when given, is called after every epoch (e.g. to probe the backbone)."""
    torch.manual_seed(seed)
    dataset = IndexedImages(images, groups=groups, seed=seed)
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_batch)
    if optimizer == 'adamw':
        wrapper = OptimWrapper(torch.optim.AdamW(task.parameters(), lr=lr, weight_decay=weight_decay))
    else:
        wrapper = OptimWrapper(torch.optim.SGD(task.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay))
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


def knn_accuracy(backbone, images: np.ndarray, labels: np.ndarray, train_idx, val_idx, k: int = 20,
                 recalibrate_bn: bool = False) -> float:
    """Balanced accuracy of a cosine kNN (k=20) on pooled backbone features: train → val.

    ``recalibrate_bn``: first re-estimate the batch-norm statistics on the clean train images
    (:func:`benchmarks.protocols.features.recalibrate_batchnorm`), so that a random init and a trained backbone are
    probed under the same normalisation."""
    from benchmarks.protocols.features import extract_features, recalibrate_batchnorm

    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    if recalibrate_bn:
        backbone = recalibrate_batchnorm(backbone, images, indices=train_idx)
    was_training = backbone.training
    feats = torch.nn.functional.normalize(extract_features(backbone, images), dim=1)
    backbone.train(was_training)
    sims = feats[val_idx] @ feats[train_idx].T
    top = sims.topk(min(k, len(train_idx)), dim=1).indices.numpy()
    votes = labels[train_idx][top]
    classes = np.unique(labels)
    predicted = np.array([np.bincount(row, minlength=classes.max() + 1).argmax() for row in votes])
    truth = labels[val_idx]
    recalls = [np.mean(predicted[truth == c] == c) for c in np.unique(truth)]
    return float(np.mean(recalls))


def knn_probes(backbone, images: np.ndarray, labels: np.ndarray, train_idx, val_idx, k: int = 20) -> dict:
    """Both kNN probes: ``raw`` (the backbone's own running statistics) and ``recalibrated``."""
    return {'raw': knn_accuracy(backbone, images, labels, train_idx, val_idx, k),
            'recalibrated': knn_accuracy(backbone, images, labels, train_idx, val_idx, k, recalibrate_bn=True)}


#: the backbone of the learning tests: a ResNet-18 at a quarter of the width (16 base channels), so that each task's
#: run fits the CPU budget of the acceptance (at most 2 minutes on 2 cores); the task recipes are otherwise used as is
LEARN_BACKBONE = dict(type='ResNet', depth=18, base_channels=16, stem_channels=16)


def derm_sample(train: int = 1200, val: int = 400, size: int = 64, dataset: str = 'synthetic_derm',
                data_root: str | None = None, with_groups: bool = False):
    """A fixed random sample of the train and val splits: ``(images, labels, train_idx, val_idx)`` where the index
    arrays point into the returned arrays. ``data_root``: for a real dataset (e.g. ``../shared/data/ham10000``).
    ``with_groups``: also return the int64 group ids of the returned images (a fifth item); the sample then keeps
    whole groups of the train split (the first ``train`` images of the shuffled groups, the last group cut), so
    that a group's images are in the sample together."""
    import os

    from benchmarks.datasets import load_dataset

    data = load_dataset(dataset, data_root, image_size=size, seed=0,
                        cache_dir=os.environ.get('CURRICULUM_SSL_CACHE'))
    rng = np.random.default_rng(0)
    if with_groups:
        train_all, train_groups = data.indices('train'), data.group_ids('train')
        chosen = rng.permutation(np.unique(train_groups))
        rank = np.empty(train_groups.max() + 1, dtype=np.int64)
        rank[chosen] = np.arange(len(chosen))
        train_idx = train_all[np.argsort(rank[train_groups], kind='stable')][:train]
    else:
        train_idx = rng.permutation(data.indices('train'))[:train]
    val_idx = rng.permutation(data.indices('val'))[:val]
    order = np.concatenate([train_idx, val_idx])
    sample = (np.asarray(data.images)[order], np.asarray(data.labels)[order], np.arange(len(train_idx)),
              np.arange(len(train_idx), len(order)))
    if with_groups:
        codes = np.unique(data.records.groups, return_inverse=True)[1].astype(np.int64).reshape(-1)
        sample += (codes[order],)
    return sample


def learning_run(name: str, task_cfg: dict, epochs: int, lr: float, weight_decay: float = 1e-4,
                 batch_size: int = 64, backbone: dict | None = None, dataset: str = 'synthetic_derm',
                 data_root: str | None = None, size: int = 64, train: int = 1200, val: int = 400,
                 optimizer: str = 'sgd', probe_every_epoch: bool = False, init_weights: bool = False) -> dict:
    """Train task ``name`` from a random init on a :func:`derm_sample` (``train`` / ``val`` images at ``size`` px)
    and probe it before and after. A task that ``needs_groups`` gets the sample's group ids. ``optimizer``: 'sgd'
    or 'adamw' (:func:`train_task`); ``probe_every_epoch``: also the raw kNN probe after every epoch;
    ``init_weights``: initialise the task as the engine does (mmengine's ``init_cfg``: e.g. a ViT's positional
    embedding drawn, not zero), its momentum copies synced to it, instead of PyTorch's default initialisation.

    Returns ``task``, ``history`` (per-epoch means, with ``knn`` when probed every epoch), ``seconds`` (training,
    and the per-epoch probes when asked for) and ``random`` / ``trained``: the two kNN probes of :func:`knn_probes`
    (k=20, train → val). Prints one summary line (shown with ``pytest -s``)."""
    import time

    from pretext_tasks.registry import build_task, get_task_class

    needs_groups = getattr(get_task_class(name), 'needs_groups', False)
    sample = derm_sample(train, val, size, dataset=dataset, data_root=data_root, with_groups=needs_groups)
    images, labels, train_idx, val_idx = sample[:4]
    groups = sample[4][train_idx] if needs_groups else None
    torch.manual_seed(0)
    task = build_task(name, backbone or LEARN_BACKBONE, dict(task_cfg), len(train_idx), images.shape[1], seed=0)
    if init_weights:
        task.init_weights()
        task.load_backbone(task.backbone_state())
    random_probes = knn_probes(task.backbone, images, labels, train_idx, val_idx)
    start = time.perf_counter()
    def probe(epoch, so_far):
        so_far[-1]['knn'] = knn_accuracy(task.backbone, images, labels, train_idx, val_idx)

    history = train_task(task, images[train_idx], epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, groups=groups, optimizer=optimizer,
                         on_epoch_end=probe if probe_every_epoch else None)
    seconds = time.perf_counter() - start
    trained = knn_probes(task.backbone, images, labels, train_idx, val_idx)
    metric = history[-1].get('pretext_acc')
    print(f'\n{name} on {dataset}: loss {history[0]["loss"]:.3f} -> {history[-1]["loss"]:.3f}'
          + (f', pretext acc {metric:.3f}' if metric is not None else '')
          + f'; kNN raw {random_probes["raw"]:.3f} (random) -> {trained["raw"]:.3f}, recalibrated '
          f'{random_probes["recalibrated"]:.3f} -> {trained["recalibrated"]:.3f}; {epochs} epochs in {seconds:.0f} s')
    return {'task': task, 'history': history, 'seconds': seconds, 'random': random_probes, 'trained': trained,
            'images': images, 'labels': labels, 'train_idx': train_idx, 'val_idx': val_idx, 'groups': groups}


def assert_validation_is_deterministic_and_side_effect_free(task, images: np.ndarray) -> None:
    """``validation_score`` twice gives one value in [0, 1]; it and ``evaluation_loss`` leave the train flag, the
    progress counters and every tensor of the state untouched."""
    task.train()
    task.set_progress(2, 17)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    first = task.validation_score(images, batch_size=5)
    second = task.validation_score(images, batch_size=5)
    assert first == second and 0.0 <= first <= 1.0
    assert task.training and task.iteration == 17
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())
    loss = task.evaluation_loss(torch.as_tensor(images), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and task.training
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def assert_yaml_matches_code_defaults(config_path: str, defaults: dict) -> None:
    """A task's YAML has the engine's stage keys (an SGD optimiser, an LR inside its search range) and repeats the
    code's ``DEFAULTS`` exactly (tuples as lists), so the file a user edits is the recipe that runs."""
    import yaml

    with open(config_path) as handle:
        config = yaml.safe_load(handle)
    for key in ('epochs', 'batch_size', 'optimizer', 'lr', 'lr_range'):
        assert key in config, key
    assert config['optimizer']['type'] == 'SGD' and config['lr_range'][0] < config['lr'] < config['lr_range'][1]
    for key, value in defaults.items():
        expected = list(value) if isinstance(value, tuple) else value
        assert config[key] == expected, key


def assert_nan_loss_names_task_epoch_and_iteration(task, task_module, monkeypatch, images: np.ndarray) -> None:
    """NaN pixels from the 6th batch on (epoch 2, iteration 6 with 4 batches an epoch) must stop training with
    NonFiniteLossError naming the task and that epoch / iteration. ``task_module`` is the task's module, whose
    ``to_float_nchw`` is poisoned."""
    import pytest

    from pretext_tasks.base import NonFiniteLossError

    calls = {'n': 0}
    original = task_module.to_float_nchw

    def poisoned(batch):
        calls['n'] += 1
        x = original(batch)
        return x * float('nan') if calls['n'] >= 6 else x

    monkeypatch.setattr(task_module, 'to_float_nchw', poisoned)
    with pytest.raises(NonFiniteLossError) as info:
        train_task(task, images, epochs=3, batch_size=4)
    message = str(info.value)
    assert task.name in message and 'epoch 2' in message and 'iteration 6' in message


# -- kill and resume, and the hand-over: a task's stage through the engine ------------------------------------------
#: the stage of the resume tests: 96 synthetic_derm training images at 32 px (whole lesions, with their group ids),
#: a ResNet-18 with 8 base channels, batches of 16 (6 iterations an epoch), 2 epochs, fp32, deterministic kernels
RESUME_BACKBONE = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8, out_indices=[3])
RESUME_IMAGES, RESUME_BATCH, RESUME_EPOCHS = 96, 16, 2


def assert_bad_config_is_one_line(name: str, task_class, key: str, value, message: str, size: int,
                                  plan_image_size: int | None = None) -> None:
    """``tasks.<name>.<key> = value`` is rejected with exactly ``message``: by the task's own check at ``size`` px
    and, as one line, when a run is planned (at ``plan_image_size`` px, or the default config's size)."""
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config
    import pytest

    from pretext_tasks.errors import PretextConfigError

    with pytest.raises(PretextConfigError) as info:
        task_class.check_config({key: value}, size)
    assert str(info.value) == message
    overrides = {f'tasks.{name}.{key}': value}
    if plan_image_size is not None:
        overrides['image_size'] = plan_image_size
    with pytest.raises(PlanError) as info:
        build_plan(name, load_config(None, overrides))
    assert str(info.value) == message and '\n' not in str(info.value)


def perturbed_backbone_state(task, scale: float = 0.1) -> dict:
    """``task``'s backbone weights moved by Gaussian noise of ``scale`` (drawn from the global torch RNG): weights
    that differ from a fresh task's, for the tests that load a backbone into a task with a momentum copy."""
    with torch.no_grad():
        for p in task.backbone.parameters():
            p.add_(torch.randn_like(p) * scale)
    return task.backbone_state()


def resume_stage_config(task: str, **overrides) -> dict:
    """The task's recipe as the engine resolves it, shortened for the resume tests."""
    from curriculum.plan import build_plan, load_config

    options = {'epochs': RESUME_EPOCHS, f'tasks.{task}.batch_size': RESUME_BATCH}
    options.update({f'tasks.{task}.{key}': value for key, value in overrides.items()})
    return build_plan(task, load_config(None, options)).stages[0].cfg


def _resume_stage_main(task: str, cfg: dict, lr: float, stage_dir: str, backbone: dict | None = None) -> None:
    """Run (or resume) the resume tests' stage in ``stage_dir`` (on ``backbone``, default :data:`RESUME_BACKBONE`);
    the stage record goes to ``record.json`` there."""
    import json
    import os

    from curriculum.precision import resolve_precision
    from curriculum.stage import StageInputs, train_stage

    images, _, train_idx, val_idx, groups = derm_sample(RESUME_IMAGES, 16, 32, with_groups=True)
    inputs = StageInputs(train_images=images[train_idx], val_images=images[val_idx], image_size=32,
                         backbone_cfg=dict(backbone or RESUME_BACKBONE), seed=0, device='cpu',
                         precision=resolve_precision('none', 'cpu'), deterministic=True,
                         train_groups=groups[train_idx])
    record = train_stage(task, cfg, lr, inputs, None, stage_dir)
    with open(os.path.join(stage_dir, 'record.json'), 'w') as handle:
        json.dump(record, handle)


def _stage_process(task: str, cfg: dict, lr: float, stage_dir, fault: str | None = None,
                   backbone: dict | None = None):
    """:func:`_resume_stage_main` in a fresh Python process (one thread; ``CURRICULUM_FAULT=fault`` kills it)."""
    import json
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.abspath(__file__))
    code = (f'import json, sys; sys.path[:0] = [{os.path.dirname(tests)!r}, {tests!r}]; '
            f'from pretext_helpers import _resume_stage_main; _resume_stage_main(*json.loads(sys.argv[1]))')
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('CURRICULUM_FAULT', None)
    if fault:
        env['CURRICULUM_FAULT'] = fault
    return subprocess.run([sys.executable, '-c', code, json.dumps([task, cfg, lr, str(stage_dir), backbone])],
                          capture_output=True, text=True, env=env, timeout=600)


def assert_stage_resumes_exactly_and_passes_only_its_backbone(task: str, cfg: dict, lr: float, tmp_path,
                                                              backbone: dict | None = None) -> dict:
    """The task's stage killed (SIGKILL) in its second epoch, after the first epoch's checkpoint, then run again,
    ends exactly as the uninterrupted stage: same per-epoch history (every logged value) and the same backbone,
    tensor for tensor. The backbone file it hands on holds exactly the backbone's weights (none of the task's
    heads, necks, target networks or queues) and loads strictly into the initial backbone. ``backbone``: the
    stage's backbone config (default :data:`RESUME_BACKBONE`). Returns the record."""
    import json
    import signal

    from curriculum.compat import load_checkpoint_file
    from curriculum.stage import BACKBONE_FILE
    from pretext_tasks.base import initial_backbone

    def finished(stage_dir, proc) -> tuple[dict, dict]:
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((stage_dir / 'record.json').read_text())
        return record, load_checkpoint_file(str(stage_dir / BACKBONE_FILE), map_location='cpu')

    reference, reference_backbone = finished(tmp_path / 'reference',
                                             _stage_process(task, cfg, lr, tmp_path / 'reference', backbone=backbone))
    killed = tmp_path / 'killed'
    per_epoch = reference['num_images'] // RESUME_BATCH   # iterations of an epoch (drop_last)
    proc = _stage_process(task, cfg, lr, killed, fault=f'train_iter:{per_epoch + 2}', backbone=backbone)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert (killed / 'epoch_1.pth').exists() and not (killed / BACKBONE_FILE).exists()
    resumed, resumed_backbone = finished(killed, _stage_process(task, cfg, lr, killed, backbone=backbone))
    assert resumed['resumed_at_epoch'] == 1 and reference['resumed_at_epoch'] == 0
    assert [entry['epoch'] for entry in resumed['history']] == list(range(1, RESUME_EPOCHS + 1))
    assert resumed['history'] == reference['history']
    assert set(resumed_backbone) == set(reference_backbone)
    for name, value in reference_backbone.items():
        assert torch.equal(resumed_backbone[name], value), name

    # the hand-over: the backbone's weights and nothing else
    fresh = initial_backbone(backbone or RESUME_BACKBONE, 0)
    assert set(reference_backbone) == set(fresh.state_dict())
    result = fresh.load_state_dict(reference_backbone, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return reference
