"""Train one pretext stage from its parent's backbone with the mmengine Runner.

A stage directory holds the Runner's epoch checkpoints (written atomically, resumable after a kill), TensorBoard
scalars, ``history.json`` (per-epoch means of every logged value) and, when the stage is complete,
``backbone.pth`` (the only thing the next stage receives) followed by ``stage.json``. The same code path runs the
short LR-search trials (iteration-based, no checkpoints, with an intermediate-report hook for pruning).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from mmengine.dataset import DefaultSampler
from mmengine.dist import barrier, get_rank, get_world_size, is_distributed
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch.utils.data import DataLoader

from benchmarks import files
from benchmarks.files import temporary_name
from pretext_tasks.base import initial_backbone
from pretext_tasks.data import IndexedImages, collate_batch
from pretext_tasks.registry import build_task, get_task_class

from . import faults
from .compat import SIDECAR_SUFFIX, EngineRunner, atomic_torch_save, install, is_trusted, load_checkpoint_file
from .errors import CheckpointError, PlanError
from .precision import Precision, apply_precision, optim_wrapper_type, resolve_precision

install()

BACKBONE_FILE = 'backbone.pth'
STAGE_FILE = 'stage.json'
HISTORY_FILE = 'history.json'


def unwrap(model):
    return model.module if is_model_wrapper(model) else model


def write_json_atomic(path: str, data) -> None:
    """:func:`benchmarks.files.write_json_atomic` with the engine's ``json_write`` fault point before the rename."""
    files.write_json_atomic(path, data, before_replace=lambda: faults.point('json_write'))


def tidy_stage_dir(stage_dir: str) -> None:
    """Before a stage (re)starts in ``stage_dir``: remove what a killed process may have left half done, so that
    nothing partial is ever read back. Temporary and ``.partial`` files go; an epoch checkpoint counts only with a
    matching hash sidecar (sidecars whose checkpoint is gone, and checkpoints without a valid sidecar, are removed);
    ``last_checkpoint`` is rewritten (atomically) to name the newest valid checkpoint, or removed when none is left
    (mmengine writes it in place, so a kill can leave it empty)."""
    if not os.path.isdir(stage_dir):
        return
    names = os.listdir(stage_dir)
    for name in names:
        path = os.path.join(stage_dir, name)
        if name.endswith(('.tmp', '.partial')) and os.path.isfile(path):
            os.remove(path)
    valid = []
    for name in os.listdir(stage_dir):
        path = os.path.join(stage_dir, name)
        if name.startswith('epoch_') and name.endswith('.pth'):
            if is_trusted(path):
                valid.append(os.path.abspath(path))
            else:
                os.remove(path)
    for name in os.listdir(stage_dir):  # sidecars whose checkpoint is gone (or was just removed)
        path = os.path.join(stage_dir, name)
        if name.startswith('epoch_') and name.endswith('.pth' + SIDECAR_SUFFIX) and not os.path.exists(
                path[:-len(SIDECAR_SUFFIX)]):
            os.remove(path)
    last = os.path.join(stage_dir, 'last_checkpoint')

    def epoch_of(path: str) -> int:
        stem = os.path.basename(path)[len('epoch_'):-len('.pth')]
        return int(stem) if stem.isdigit() else -1

    if valid:
        newest = max(valid, key=epoch_of)
        current = None
        if os.path.isfile(last):
            with open(last) as handle:
                current = handle.read().strip()
        if current is None or os.path.abspath(current) not in valid:
            tmp = temporary_name(last)
            with open(tmp, 'w') as handle:
                handle.write(newest)
            os.replace(tmp, last)
    elif os.path.exists(last):
        os.remove(last)


class StageProgressHook(Hook):
    """Feeds (epoch, iteration) to the task before each step (seeded augmentation, error messages), keeps the
    per-epoch history across resumes, runs the online kNN monitor (epoch 0 = the backbone the stage starts from,
    then every ``every`` epochs and after the last) and drives an optional progress callback.

    ``history.json`` holds one entry per epoch: the means of every logged value, plus ``knn`` (balanced accuracy
    on val) and ``monitor_seconds`` on monitored epochs; entry ``{'epoch': 0, 'knn': ...}`` is the start."""

    priority = 'VERY_HIGH'

    def __init__(self, history_path: str | None, progress: Callable[[str, int, int, dict], None] | None = None,
                 monitor=None, every: int = 1):
        self.history_path = history_path
        self.progress = progress
        self.monitor = monitor
        self.every = max(1, int(every))
        self.history: list[dict] = []
        self.resumed_at_epoch = 0
        self._sums: dict[str, float] = {}
        self._count = 0

    def _monitor(self, runner, epoch: int) -> dict:
        """``{'knn', 'monitor_seconds'}`` of the current backbone on rank 0 (other ranks: nothing)."""
        if self.monitor is None or get_rank() != 0:
            return {}
        value, seconds = self.monitor.timed_score(unwrap(runner.model).backbone)
        runner.visualizer.add_scalars({'knn': value}, step=epoch)
        return {'knn': value, 'monitor_seconds': seconds}

    def _save(self) -> None:
        if self.history_path and get_rank() == 0:
            write_json_atomic(self.history_path, self.history)

    def before_train(self, runner) -> None:
        self.resumed_at_epoch = int(runner.epoch)
        if self.history_path and os.path.exists(self.history_path):
            with open(self.history_path) as handle:
                self.history = [entry for entry in json.load(handle) if entry.get('epoch', 0) <= runner.epoch]
        if runner.epoch == 0:
            start = self._monitor(runner, 0)
            self.history = [{'epoch': 0, **start}] if start else []
            self._save()
            if self.progress and start:
                self.progress('epoch', 0, runner.max_epochs, dict(start))

    def before_train_epoch(self, runner) -> None:
        self._sums, self._count = {}, 0

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        unwrap(runner.model).set_progress(runner.epoch, runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        for key, value in (outputs or {}).items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
        self._count += 1
        faults.point('train_iter' if self.history_path else 'trial_iter')
        if self.progress:
            self.progress('iter', runner.iter + 1, runner.max_iters, {})

    def after_train_epoch(self, runner) -> None:
        epoch = runner.epoch + 1
        means = {k: v / max(self._count, 1) for k, v in self._sums.items()}
        means['epoch'] = epoch
        if epoch % self.every == 0 or epoch == runner.max_epochs:
            means.update(self._monitor(runner, epoch))
        self.history.append(means)
        self._save()
        if self.progress:
            self.progress('epoch', epoch, runner.max_epochs, means)


class TrialReportHook(Hook):
    """Reports the task's validation score to an Optuna trial at fixed iterations and prunes bad trials."""

    priority = 'LOW'

    def __init__(self, report_at: list[int], score_fn: Callable[[object], float], on_report):
        self.report_at = set(report_at)
        self.score_fn = score_fn
        self.on_report = on_report
        self.last_score: float | None = None

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        step = runner.iter + 1
        if step in self.report_at:
            self.last_score = self.score_fn(unwrap(runner.model))
            self.on_report(self.last_score, step)  # may raise optuna.TrialPruned


@dataclass
class StageInputs:
    """What a stage trains on."""

    train_images: np.ndarray          # uint8 (N, S, S, C), unlabeled
    val_images: np.ndarray            # uint8, for validation scores (LR search); never the test split
    image_size: int
    backbone_cfg: dict
    seed: int
    device: str                       # 'cpu' or 'cuda'
    precision: Precision | None = None  # None: fp32 (curriculum.precision.resolve_precision)
    deterministic: bool = False
    #: int64 group ids (patient / lesion) aligned with ``train_images``, or None when the data have none; handed
    #: only to a task that ``needs_groups`` (pretext_tasks.base.PretextTask)
    train_groups: np.ndarray | None = None

    def resolved_precision(self) -> Precision:
        return self.precision or resolve_precision('none', self.device)


def build_stage_task(task_name: str, cfg: dict, inputs: StageInputs, parent_backbone: str | None):
    """Instantiate the task (weights initialised from the stage seed, whatever ran before in this process) and load
    the parent stage's backbone strictly.

    The task's ``init_weights()`` (mmengine's BaseModule: the backbone's and heads' ``init_cfg``) runs here, before
    the parent's weights are loaded. mmengine's Runner calls ``init_weights()`` again when training starts, which is
    then a no-op (``_is_init``); left to the Runner, it re-initialised the backbone *after* the parent's weights had
    been loaded, so every stage silently started from the same random initialisation. A stage without a parent
    starts from :func:`pretext_tasks.base.initial_backbone` of the seed, whatever its task."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(inputs.seed)
        task = build_task(task_name, inputs.backbone_cfg, cfg, len(inputs.train_images), inputs.image_size,
                          inputs.seed)
        task.init_weights()
    if parent_backbone:
        state = load_checkpoint_file(parent_backbone, map_location='cpu')
        if not isinstance(state, dict):
            raise CheckpointError(f'{parent_backbone}: expected a backbone state dict')
    else:  # the seed's random initialisation, the same for every task (and for --order none)
        state = initial_backbone(inputs.backbone_cfg, inputs.seed).state_dict()
    task.load_backbone(state)
    return apply_precision(task, task.backbone, inputs.resolved_precision())


def stage_groups(task_name: str, inputs: StageInputs) -> np.ndarray | None:
    """The training images' group ids when the task needs them (None otherwise); a PlanError when it needs them
    and the data have none (the run checks this when it is planned: :func:`curriculum.preflight.check_groups`)."""
    if not getattr(get_task_class(task_name), 'needs_groups', False):
        return None
    if inputs.train_groups is None:
        raise PlanError(f'{task_name}: needs group ids (patient or lesion) of the training images; the data have none')
    return inputs.train_groups


def _loader(images: np.ndarray, batch_size: int, seed: int, groups: np.ndarray | None = None) -> DataLoader:
    dataset = IndexedImages(images, groups=groups, seed=seed)
    per_rank = len(dataset) // max(get_world_size(), 1)
    if per_rank < batch_size:
        raise PlanError(f'batch size {batch_size} exceeds the {per_rank} training images per process')
    return DataLoader(dataset, batch_size=batch_size, sampler=DefaultSampler(dataset, shuffle=True, seed=seed),
                      drop_last=True, collate_fn=collate_batch, num_workers=0)


def _optim_wrapper(cfg: dict, lr: float, inputs: StageInputs) -> dict:
    optimizer = dict(cfg['optimizer'])
    optimizer['lr'] = float(lr)
    wrapper = dict(type=optim_wrapper_type(inputs.resolved_precision()), optimizer=optimizer)
    if cfg.get('clip_grad'):
        wrapper['clip_grad'] = dict(cfg['clip_grad'])
    if cfg.get('paramwise_cfg'):  # per-parameter rules (mmengine's DefaultOptimWrapperConstructor), e.g. ODC's head
        wrapper['paramwise_cfg'] = dict(cfg['paramwise_cfg'])
    return wrapper


def _ddp_wrapper(inputs: StageInputs) -> dict:
    """DDP around the task: CPU modules take no device ids (mmengine's default passes LOCAL_RANK, which only works
    on GPUs); unused parameters are allowed (SwAV freezes its prototypes for the first iterations)."""
    device_ids = [int(os.environ.get('LOCAL_RANK', 0))] if inputs.device == 'cuda' else None
    return dict(type='MMDistributedDataParallel', device_ids=device_ids, broadcast_buffers=False,
                find_unused_parameters=True)


def _runner(task, work_dir: str, loader: DataLoader, train_cfg: dict, optim_wrapper: dict, schedulers,
            hooks: list, inputs: StageInputs, checkpoints: bool, tensorboard: bool) -> EngineRunner:
    default_hooks = dict(
        runtime_info=dict(type='RuntimeInfoHook'),
        timer=dict(type='IterTimerHook'),
        sampler_seed=dict(type='DistSamplerSeedHook'),
        logger=dict(type='LoggerHook', interval=max(1, len(loader) // 4), log_metric_by_epoch=True),
        param_scheduler=dict(type='ParamSchedulerHook'),
        checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=2, save_last=True) if checkpoints
        else None,
    )
    visualizer = dict(type='Visualizer', name=f'vis-{uuid.uuid4().hex[:8]}',
                      vis_backends=[dict(type='TensorboardVisBackend')] if tensorboard else [])
    return EngineRunner(
        model=task,
        work_dir=work_dir,
        experiment_name=f'{os.path.basename(work_dir)}-{uuid.uuid4().hex[:8]}',
        train_dataloader=loader,
        train_cfg=train_cfg,
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        default_hooks=default_hooks,
        custom_hooks=hooks + list(unwrap(task).hooks()),
        randomness=dict(seed=inputs.seed, deterministic=inputs.deterministic),
        launcher='pytorch' if is_distributed() else 'none',
        cfg=dict(model_wrapper_cfg=_ddp_wrapper(inputs)) if is_distributed() else None,
        env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl' if inputs.device == 'cuda' else 'gloo')),
        default_scope='mmpretrain',
        visualizer=visualizer,
        log_level='WARNING',
        resume=checkpoints and os.path.exists(os.path.join(work_dir, 'last_checkpoint')),
    )


def train_stage(task_name: str, cfg: dict, lr: float, inputs: StageInputs, parent_backbone: str | None,
                stage_dir: str, progress=None, monitor=None, monitor_every: int = 1) -> dict:
    """Train (or resume) one stage; writes ``backbone.pth`` then ``stage.json`` and returns the stage record.
    ``monitor`` (a :class:`curriculum.monitor.KnnMonitor`) scores the backbone at the start and every
    ``monitor_every`` epochs."""
    os.makedirs(stage_dir, exist_ok=True)
    if get_rank() == 0:
        tidy_stage_dir(stage_dir)
    if is_distributed():
        barrier()  # every rank decides on resuming from the tidied folder
    started = time.time()
    task = build_stage_task(task_name, cfg, inputs, parent_backbone)
    loader = _loader(inputs.train_images, cfg['batch_size'], inputs.seed, stage_groups(task_name, inputs))
    epochs = int(cfg['epochs'])
    schedulers = [dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=epochs, T_max=epochs,
                       eta_min=float(lr) * 1e-3, convert_to_iter_based=True)]
    history_hook = StageProgressHook(os.path.join(stage_dir, HISTORY_FILE), progress, monitor, monitor_every)
    runner = _runner(task, stage_dir, loader, dict(by_epoch=True, max_epochs=epochs, val_interval=epochs + 1),
                     _optim_wrapper(cfg, lr, inputs), schedulers, [history_hook], inputs, checkpoints=True,
                     tensorboard=True)
    runner.train()
    model = unwrap(runner.model)
    history = history_hook.history
    losses = [entry['loss'] for entry in history if 'loss' in entry]
    seconds = time.time() - started
    record = {
        'task': task_name,
        'lr': float(lr),
        'epochs': epochs,
        'final_loss': float(losses[-1]) if losses else None,
        'first_loss': float(losses[0]) if losses else None,
        'history': history,
        'monitor': monitor_summary(history, seconds),
        'resumed_at_epoch': history_hook.resumed_at_epoch,  # 0: trained from the start in this process
        'seconds_this_process': seconds,
        'num_images': int(len(inputs.train_images)),
        'image_size': int(inputs.image_size),  # the pretext side: the run's image_size × the stage's image_scale
        'batch_size': int(cfg['batch_size']),
    }
    if get_rank() == 0:
        atomic_torch_save(model.backbone_state(), os.path.join(stage_dir, BACKBONE_FILE))
    return record


def monitor_summary(history: list[dict], stage_seconds: float) -> dict | None:
    """The kNN curve of a stage's history: ``{'epochs': [...], 'knn': [...], 'start', 'final', 'best',
    'best_epoch', 'first_epoch_above_start', 'seconds', 'share_of_stage'}``; None when nothing was monitored."""
    curve = {int(entry['epoch']): float(entry['knn']) for entry in history if 'knn' in entry}
    if not curve:
        return None
    seconds = sum(float(entry.get('monitor_seconds', 0.0)) for entry in history)
    start = curve.get(0)
    best_epoch = max(curve, key=lambda epoch: (curve[epoch], -epoch))
    above = [epoch for epoch in sorted(curve) if epoch > 0 and start is not None and curve[epoch] > start]
    return {'epochs': sorted(curve), 'knn': [curve[epoch] for epoch in sorted(curve)], 'start': start, 'final': curve[max(curve)], 'best': curve[best_epoch],
            'best_epoch': best_epoch, 'first_epoch_above_start': above[0] if above else None,
            'seconds': seconds, 'share_of_stage': seconds / stage_seconds if stage_seconds > 0 else None}


def run_trial(task_name: str, cfg: dict, lr: float, inputs: StageInputs, parent_backbone: str | None,
              trial_dir: str, iterations: int, report_at: list[int], score: Callable[[object], float],
              on_report) -> float:
    """One LR-search trial: ``iterations`` steps at a constant ``lr`` from the parent backbone; returns the final
    score (higher is better). ``on_report(score, step)`` may raise ``optuna.TrialPruned``."""
    task = build_stage_task(task_name, cfg, inputs, parent_backbone)
    loader = _loader(inputs.train_images, cfg['batch_size'], inputs.seed, stage_groups(task_name, inputs))
    report_hook = TrialReportHook(report_at, score, on_report)
    runner = _runner(task, trial_dir, loader, dict(by_epoch=False, max_iters=iterations, val_interval=iterations + 1),
                     _optim_wrapper(cfg, lr, inputs), [], [StageProgressHook(None), report_hook], inputs,
                     checkpoints=False, tensorboard=False)
    runner.train()
    if report_hook.last_score is None:
        report_hook.last_score = score(unwrap(runner.model))
    return float(report_hook.last_score)
