"""The interface every pretext task implements, and the machinery they share.

A task is an mmengine ``BaseModel`` built from ``(backbone config, task config, number of images, image size,
seed)``. It owns a backbone (the only thing the curriculum passes on to the next stage) plus whatever heads, necks,
queues, memory banks or prototypes it needs (rebuilt for every stage). A training batch is
``{'images': uint8 (B, H, W, C), 'indices': int64 (B,)}`` (plus group partners for a task that
``needs_groups``, :mod:`pretext_tasks.data`): the task makes its own views on the batch's device with
:mod:`pretext_tasks.augment`, from a generator seeded by (seed, rank, iteration) so a resumed run replays exactly.

Following solo-learn's split of responsibilities, the base class holds the shared machinery (backbone building and
strict weight loading, feature pooling, the seeded generator, the finite-loss check, the default validation score)
and a task file only adds its own modules and :meth:`PretextTask.compute_loss`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn as nn
from mmengine.dist import get_rank
from mmengine.model import BaseModel

from benchmarks.backbones import pool_output

from .errors import NonFiniteLossError, PretextConfigError

DEFAULT_BACKBONE = dict(type='ResNet', depth=18, out_indices=(3,))
#: seed of the fixed augmentation draws of validation scores (plus each batch's start index)
VALIDATION_SEED = 12345


def build_backbone(cfg: dict | None) -> nn.Module:
    """Any mmpretrain backbone from its config dict (ResNet-18 by default)."""
    import mmpretrain.models  # noqa: F401  (registers the backbones)
    from mmpretrain.registry import MODELS

    cfg = dict(cfg or DEFAULT_BACKBONE)
    try:
        return MODELS.build(cfg)
    except KeyError as exc:
        raise PretextConfigError(f'unknown backbone type {cfg.get("type")!r}: {exc}') from None
    except (TypeError, ValueError, AssertionError) as exc:  # an option the class does not take, a bad arch name
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PretextConfigError(f'backbone {cfg.get("type")!r} cannot be built from {cfg}: {detail}') from None


def quiet_init_weights(module: nn.Module) -> None:
    """mmengine's ``init_weights()`` (the modules' ``init_cfg``) with its per-parameter report at DEBUG level only:
    MMLogger filters in its handlers and leaves the logger itself at NOTSET, so "does anyone want DEBUG?" is a
    question for the handlers: only a DEBUG handler keeps mmengine's report."""
    from mmengine.logging import MMLogger

    logger = MMLogger.get_current_instance()
    level = logger.level
    if not any(handler.level <= logging.DEBUG for handler in logger.handlers):
        logger.setLevel(logging.WARNING)
    try:
        module.init_weights()
    finally:
        logger.setLevel(level)


def initial_backbone(cfg: dict | None, seed: int) -> nn.Module:
    """The random initialisation of seed ``seed``: the backbone built and initialised (its ``init_cfg``, e.g.
    Kaiming for ResNet convolutions) from a generator seeded with ``seed`` alone. Every first stage starts from it,
    whatever its task builds around the backbone, and ``--order none`` evaluates it, so "better than random
    initialisation" compares against the very weights a stage started from. The caller's RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        backbone = build_backbone(cfg)
        if hasattr(backbone, 'init_weights'):
            quiet_init_weights(backbone)
    return backbone


def pool_last(features: Any) -> torch.Tensor:
    """One feature vector per image from an mmpretrain backbone's output (a tuple: the last is used): a map averaged
    over space, a token sequence over tokens, a vision transformer's class token as it is. The same rule as the
    downstream protocols' (:func:`benchmarks.backbones.pool_output`)."""
    return pool_output(features)


def config_number(task: str, task_cfg: dict, key: str, default, kind=float):
    """``task_cfg[key]`` (or ``default``) as ``kind``; a value of another type is a PretextConfigError."""
    value = task_cfg.get(key, default)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise PretextConfigError(f'{task}: {key} must be {"an integer" if kind is int else "a number"}, '
                                 f'got {value!r}') from None


def config_positive(task: str, task_cfg: dict, key: str, default, kind=float):
    """``task_cfg[key]`` (or ``default``) as a positive ``kind``; a value of another type, zero, a negative value or
    NaN is a one-line PretextConfigError naming the task and the key."""
    value = config_number(task, task_cfg, key, default, kind)
    if not value > 0:
        raise PretextConfigError(f'{task}: {key} must be a positive {"integer" if kind is int else "number"}, '
                                 f'got {task_cfg.get(key, default)!r}')
    return value


def check_probabilities(task: str, task_cfg: dict, defaults: dict, *keys: str) -> None:
    """Each of ``keys`` (default from ``defaults``) is a number in [0, 1]."""
    for key in keys:
        value = config_number(task, task_cfg, key, defaults.get(key))
        if not 0.0 <= value <= 1.0:
            raise PretextConfigError(f'{task}: {key} must be in [0, 1], got {value}')


def check_crop_scale(task: str, task_cfg: dict, default, key: str = 'crop_scale') -> tuple[float, float]:
    """``task_cfg[key]`` as a (low, high) area range with 0 < low <= high <= 1."""
    value = task_cfg.get(key, default)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise PretextConfigError(f'{task}: {key} must be two numbers [low, high], got {value!r}') from None
    if not 0 < low <= high <= 1:
        raise PretextConfigError(f'{task}: {key} must satisfy 0 < low <= high <= 1, got {(low, high)}')
    return low, high


class PretextTask(BaseModel):
    """Base class of every pretext task (see the module docstring)."""

    #: registered name (a contract used by ``--order``)
    name: ClassVar[str] = ''
    #: True: the task draws on the training images' group ids (lesion / patient, never a label). The engine then
    #: feeds it batches of :class:`pretext_tasks.data.IndexedImages` built with the training split's int64 group
    #: array (each batch also holds ``groups``, ``partners`` and ``partner_indices``), and a dataset without group
    #: ids stops the run when it is planned.
    needs_groups: ClassVar[bool] = False
    #: True: the task learns from the images' colour (it predicts colour from luminance), so data whose images
    #: are grayscale (one channel, or three equal ones) stop the run when it is planned
    needs_colour: ClassVar[bool] = False
    #: True: the task reads the patch tokens of a vision transformer (mmpretrain's ``VisionTransformer`` family),
    #: so any other backbone stops the run when it is planned (curriculum.preflight.check_backbone)
    needs_patch_tokens: ClassVar[bool] = False
    #: True: the task needs convolutional feature maps ``(N, C, H, W)`` from the backbone (e.g. a decoder on them),
    #: so a backbone that returns vectors or tokens stops the run when it is planned
    needs_feature_map: ClassVar[bool] = False

    @classmethod
    def backbone_input_sizes(cls, task_cfg: dict, image_size: int) -> list[int]:
        """The sides (px) of the square inputs the task feeds its backbone for ``image_size`` px images: the image
        size itself, unless the task cuts patches or smaller crops (relloc's patches, multi-crop's local crops).
        The plan checks them against a vision transformer's patch size (an input smaller than one patch cannot
        be cut into tokens)."""
        return [int(image_size)]

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        """Checks of the task config that need no data (only the image size); raise PretextConfigError. The one
        copy of these rules: called when a curriculum is planned, before anything is written, and again by the
        constructor. Tasks extend it (``super().check_config(...)`` first)."""

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(data_preprocessor=dict(type='BaseDataPreprocessor'))
        if num_images < 2:
            raise PretextConfigError(f'{self.name}: needs at least 2 training images, got {num_images}')
        type(self).check_config(dict(task_cfg or {}), int(image_size))
        self.task_cfg = dict(task_cfg or {})
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.epoch = 0
        self.iteration = 0
        self.backbone = build_backbone(backbone)
        self.feature_dim = self._probe_feature_dim()

    # -- building -------------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """mmengine's initialisation (the backbone's and heads' ``init_cfg``), once: the engine initialises a task
        before loading its parent's backbone, and the Runner's later call must neither re-initialise nor warn;
        the per-parameter report mmengine logs at INFO level goes to the logger only at DEBUG level."""
        if self.is_init:
            return
        quiet_init_weights(super())

    def _probe_feature_dim(self) -> int:
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            probe = torch.zeros(2, 3, self.image_size, self.image_size)
            dim = pool_last(self.backbone(probe)).shape[1]
        self.backbone.train(was_training)
        return int(dim)

    def cfg(self, key: str, default: Any = None) -> Any:
        """A task hyper-parameter from the task config."""
        return self.task_cfg.get(key, default)

    # -- the backbone hand-over ------------------------------------------------------------------------------
    def backbone_state(self) -> dict[str, torch.Tensor]:
        """The backbone weights to pass to the next stage (CPU tensors)."""
        return {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}

    def load_backbone(self, state: dict[str, torch.Tensor]) -> None:
        """Load a previous stage's backbone strictly: any missing or unexpected key is an error."""
        result = self.backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise PretextConfigError(
                f'{self.name}: backbone weights do not match the configured backbone '
                f'(missing: {result.missing_keys[:3]}{"..." if len(result.missing_keys) > 3 else ""}, '
                f'unexpected: {result.unexpected_keys[:3]}{"..." if len(result.unexpected_keys) > 3 else ""})')
        self.on_backbone_loaded()

    def on_backbone_loaded(self) -> None:
        """Called after :meth:`load_backbone`; tasks with a momentum copy of the backbone re-sync it here."""

    # -- training ---------------------------------------------------------------------------------------------
    def set_progress(self, epoch: int, iteration: int) -> None:
        """Called by the stage runner before every training iteration (0-based epoch, global iteration)."""
        self.epoch, self.iteration = int(epoch), int(iteration)

    def step_seed(self, salt: int = 0) -> int:
        """The seed of this iteration's randomness, from (seed, rank, iteration, salt)."""
        return (self.seed * 1_000_003 + get_rank() * 7_919 + self.iteration * 104_729 + salt) % (2 ** 63 - 1)

    def generator(self, device: torch.device, salt: int = 0) -> torch.Generator:
        """A generator seeded by (seed, rank, iteration, salt): augmentations replay identically after a resume."""
        generator = torch.Generator(device=device)
        generator.manual_seed(self.step_seed(salt))
        return generator

    def forward(self, inputs: dict, data_samples=None, mode: str = 'loss'):
        if mode != 'loss':
            raise PretextConfigError(f'{self.name}: only mode="loss" is supported, got {mode!r}')
        images, indices = inputs['images'], inputs['indices']
        # Layers that draw from torch's global stream (dropout) get it seeded per iteration as well, inside a fork
        # so that nothing outside the step is disturbed: a resumed stage then replays the uninterrupted one exactly.
        cuda_devices = [images.device.index or 0] if images.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(self.step_seed(salt=1))
            losses = self.compute_loss(images, indices, self.generator(images.device))
        self._check_finite(losses)
        return losses

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        for key, value in losses.items():
            if 'loss' in key and not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteLossError(
                    f'task {self.name}: non-finite {key} ({float(value.detach().float().mean())}) at epoch '
                    f'{self.epoch + 1}, iteration {self.iteration + 1}')

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One training step's losses (keys containing 'loss' are summed and optimised) and metrics (other keys,
        e.g. ``pretext_acc``, are only logged). ``images`` is uint8 ``(B, H, W, C)`` on the model's device."""
        raise NotImplementedError

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator):
        """The augmented network inputs of one training batch of uint8 ``(B, H, W, C)`` images (views, crops or
        patches, with their labels where the task makes labels), drawn from ``generator``. Public so that tools can
        time or show a task's augmentation without knowing the task."""
        raise NotImplementedError

    def hooks(self) -> list:
        """Extra mmengine hooks this task needs during its stage (e.g. ODC's memory, SwAV's queue)."""
        return []

    def batch_size_multiple(self) -> int:
        """Batch sizes must divide into this (e.g. a queue length); 1 when there is no constraint."""
        return 1

    # -- validation (the LR-search objective) ------------------------------------------------------------------
    def seeded_batches(self, images: np.ndarray | torch.Tensor, batch_size: int):
        """``(batch, generator)`` over ``images`` (uint8 NHWC) in order, each batch on the task's device with a
        generator seeded by the batch's start index: the fixed draws every validation score of a task uses."""
        device = next(self.parameters()).device
        images = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
        for start in range(0, len(images), batch_size):
            generator = torch.Generator(device=device)
            generator.manual_seed(VALIDATION_SEED + start)
            yield images[start:start + batch_size].to(device), generator

    @torch.no_grad()
    def validation_score(self, images: np.ndarray | torch.Tensor, batch_size: int = 128) -> float:
        """Higher is better. Default: minus the mean :meth:`evaluation_loss` over ``images`` (uint8 NHWC) with
        augmentations fixed by a seed, in eval mode and without touching any training state."""
        was_training = self.training
        self.eval()
        total, count = 0.0, 0
        try:
            for batch, generator in self.seeded_batches(images, batch_size):
                if len(batch) < 2:
                    continue
                value = float(self.evaluation_loss(batch, generator))
                total += value * len(batch)
                count += len(batch)
        finally:
            self.train(was_training)
        if count == 0:
            raise PretextConfigError(f'{self.name}: validation needs at least 2 images')
        score = -total / count
        return score if math.isfinite(score) else float('-inf')

    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The pretext loss on one batch WITHOUT side effects (no queue / memory / momentum update)."""
        raise NotImplementedError
