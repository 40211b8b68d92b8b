"""SwAV pretext task: mmpretrain's ``SwAV`` (SwAVNeck, SwAVHead, SwAVLoss with Sinkhorn-Knopp) fed with batched
multi-crop views.

The algorithm is built around the task's own backbone object (``self.backbone is self.algorithm.backbone``; the
state dict holds it under both prefixes). Views: ``global_crops`` crops of the input size with area scale
``global_scale`` and ``local_crops`` crops of ``local_size`` px with ``local_scale``, each with SwAV's colour
distortion (jitter 0.8/0.8/0.8/0.2 times ``color_strength`` at p 0.8, grayscale p 0.2, blur p 0.5, sigma scaled to
the crop's share of the 224/96 px originals). ``local_size: null`` → ``image_size * 96 / 224`` rounded to a
multiple of 4 (28 px at 64). The code defaults are the original recipe (strength 1, scales 0.14-1 / 0.05-0.14);
``configs/tasks/swav.yaml`` uses milder views, because at 64 px the original ones drive short runs into the
uniform-assignment collapse (loss pinned at ln K).

Sizing rules (each overridable in the YAML):

* ``num_prototypes: null`` → ``min(3000, max(10, num_images // 10))``;
* ``queue_length: null`` → ``min(3840, num_images // 4)`` rounded down to a multiple of the batch size
  (0 disables the queue; a queue shorter than one batch is disabled);
* ``freeze_prototypes_iters: null`` → one epoch of iterations (``num_images // batch_size``), like the original's
  5005 iterations = one ImageNet epoch at batch 256.

Why no mmpretrain ``SwAVHook``: it keeps the queue outside the checkpoint (``queue.pth`` in the work dir, loaded
in ``before_run`` whatever run wrote it, saved every epoch whatever the checkpoint interval), sets its file path
and rounds the queue only in ``before_run`` and reads ``runner.model.head``, which is not where the algorithm
lives here. Instead the queue is a persistent buffer of the task (saved and resumed with the model's state) and
the queue start epoch and prototype freezing are decided in :meth:`SwAVTask.compute_loss` from the progress the
stage runner sets (:meth:`PretextTask.set_progress`), so resumed runs behave exactly as uninterrupted ones. The
prototypes are frozen by switching off their ``requires_grad`` (their gradient stays ``None``, so SGD/LARS skip
them entirely, as the original code's ``p.grad = None``).
"""
from __future__ import annotations

import torch

from .augment import (
    colour_distortion,
    gaussian_blur,
    normalize,
    random_resized_crop,
    to_float_nchw,
)
from .base import PretextTask, check_crop_scale, config_number, pool_last
from .errors import PretextConfigError
from .moco import _backbone_outputs
from .registry import register_task

MAX_PROTOTYPES = 3000


class PooledVector(torch.nn.Module):
    """:func:`pretext_tasks.base.pool_last` as a module (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_last(x)

MAX_QUEUE = 3840


def swav_num_prototypes(num_images: int, configured: int | None = None) -> int:
    return int(configured) if configured else min(MAX_PROTOTYPES, max(10, num_images // 10))


def swav_queue_length(num_images: int, batch_size: int, configured: int | None = None) -> int:
    target = int(configured) if configured is not None else min(MAX_QUEUE, num_images // 4)
    target -= target % max(1, batch_size)
    return target if target >= batch_size else 0


def swav_local_size(image_size: int, configured: int | None = None) -> int:
    return int(configured) if configured else max(8, int(round(image_size * 96 / 224 / 4)) * 4)


def swav_view(x: torch.Tensor, size: int, generator: torch.Generator, scale, reference_size: int,
              color_strength: float = 1.0) -> torch.Tensor:
    """One SwAV crop per image: resized crop + flip, colour jitter (0.8, 0.8, 0.8, 0.2) x ``color_strength`` at
    p 0.8, grayscale p 0.2, blur p 0.5, normalisation."""
    view = random_resized_crop(x, size, generator, scale=scale)
    s = float(color_strength)
    view = colour_distortion(view, generator, (0.8, 0.8, 0.8, 0.2), s)
    view = gaussian_blur(view, generator, p=0.5, reference_size=reference_size)
    return normalize(view)


@register_task
class SwAVTask(PretextTask):
    """SwAV (Caron et al. 2020) on top of mmpretrain's implementation."""

    name = 'swav'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        global_crops = config_number('swav', task_cfg, 'global_crops', 2, int)
        local_crops = config_number('swav', task_cfg, 'local_crops', 6, int)
        if global_crops < 2 or local_crops < 0:
            raise PretextConfigError(f'swav: needs global_crops >= 2 and local_crops >= 0, got '
                                     f'{global_crops} and {local_crops}')
        check_crop_scale('swav', task_cfg, (0.14, 1.0), 'global_scale')
        check_crop_scale('swav', task_cfg, (0.05, 0.14), 'local_scale')

    @classmethod
    def backbone_input_sizes(cls, task_cfg: dict, image_size: int) -> list[int]:
        """The global crops at the image size and, with local crops, the local crops' side."""
        local = [swav_local_size(image_size, task_cfg.get('local_size'))] if task_cfg.get('local_crops', 6) else []
        return [int(image_size)] + local

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        import mmpretrain.models  # noqa: F401  (registers SwAV and its parts)
        from mmpretrain.registry import MODELS

        batch_size = int(self.cfg('batch_size', 64))
        self.global_crops = int(self.cfg('global_crops', 2))
        self.local_crops = int(self.cfg('local_crops', 6))
        self.global_scale = tuple(self.cfg('global_scale', (0.14, 1.0)))
        self.local_scale = tuple(self.cfg('local_scale', (0.05, 0.14)))
        self.local_size = swav_local_size(self.image_size, self.cfg('local_size'))
        self.color_strength = float(self.cfg('color_strength', 1.0))
        self.feat_dim = int(self.cfg('feat_dim', 128))
        self.num_prototypes = swav_num_prototypes(self.num_images, self.cfg('num_prototypes'))
        self.queue_length = swav_queue_length(self.num_images, batch_size, self.cfg('queue_length'))
        self.epoch_queue_starts = int(self.cfg('epoch_queue_starts', 15))
        frozen = self.cfg('freeze_prototypes_iters')
        self.freeze_prototypes_iters = int(frozen) if frozen is not None else max(1, self.num_images // batch_size)
        self.crops_for_assign = [0, 1]
        num_crops = [self.global_crops] + ([self.local_crops] if self.local_crops else [])
        loss = dict(type='SwAVLoss', feat_dim=self.feat_dim,
                    sinkhorn_iterations=int(self.cfg('sinkhorn_iterations', 3)),
                    epsilon=float(self.cfg('epsilon', 0.05)), temperature=float(self.cfg('temperature', 0.1)),
                    crops_for_assign=self.crops_for_assign, num_crops=num_crops,
                    num_prototypes=self.num_prototypes)
        neck = dict(type='SwAVNeck', in_channels=self.feature_dim,
                    hid_channels=int(self.cfg('neck_hid_channels') or self.feature_dim),
                    out_channels=self.feat_dim, with_avg_pool=True, norm_cfg=dict(type='BN1d'))
        self.algorithm = MODELS.build(dict(type='SwAV', backbone=self.backbone, neck=neck,
                                           head=dict(type='SwAVHead', loss=loss)))
        assert self.algorithm.backbone is self.backbone
        if len(_backbone_outputs(self.backbone, self.image_size)[-1].shape) != 4:
            # SwAVNeck pools only (N, C, H, W) maps (without its pooling it concatenates nothing): a backbone that
            # returns vectors or tokens (a vision transformer) is pooled by the engine's rule instead
            self.algorithm.neck.avgpool = PooledVector()
        # the feature queue: (crops used for assignment, length, feat_dim); part of the checkpointed state
        self.register_buffer('feature_queue',
                             torch.zeros(len(self.crops_for_assign), self.queue_length, self.feat_dim))

    @property
    def loss_module(self):
        return self.algorithm.head.loss_module

    @property
    def prototypes(self) -> torch.nn.Linear:
        return self.loss_module.prototypes

    def queue_active(self) -> bool:
        return self.queue_length > 0 and self.epoch >= self.epoch_queue_starts

    def prototypes_frozen(self) -> bool:
        return self.iteration < self.freeze_prototypes_iters

    # -- training ---------------------------------------------------------------------------------------------
    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = to_float_nchw(images)
        local_reference = max(8, round(224 * self.local_size / self.image_size))
        crops = [swav_view(x, self.image_size, generator, self.global_scale, 224, self.color_strength)
                 for _ in range(self.global_crops)]
        crops += [swav_view(x, self.local_size, generator, self.local_scale, local_reference, self.color_strength)
                  for _ in range(self.local_crops)]
        return crops

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = images.shape[0]
        if self.queue_active() and batch > self.queue_length:
            raise PretextConfigError(f'swav: batch of {batch} is longer than the queue ({self.queue_length})')
        self.prototypes.weight.requires_grad_(not self.prototypes_frozen())
        self.loss_module.queue = self.feature_queue if self.queue_active() else None
        self.loss_module.use_queue = False  # re-derived by SwAVLoss: used once the queue is full
        loss = self.algorithm.loss(self.make_inputs(images, generator), None)['loss']
        return {'loss': loss}

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The SwAV loss of the batch's own crops: the queue is neither read nor written, and the prototypes'
        in-place normalisation done by SwAVLoss is undone."""
        weight = self.prototypes.weight.detach().clone()
        queue, self.loss_module.queue = self.loss_module.queue, None
        try:
            return self.algorithm.loss(self.make_inputs(images, generator), None)['loss']
        finally:
            self.loss_module.queue = queue
            self.prototypes.weight.copy_(weight)
