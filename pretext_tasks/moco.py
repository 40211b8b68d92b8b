"""MoCo v2 pretext task: mmpretrain's ``MoCo`` algorithm fed with our batched MoCo v2 views.

The task wraps ``mmpretrain.models.MoCo`` (MoCoV2Neck, ContrastiveHead, the momentum key encoder made by
mmengine's ``ExponentialMovingAverage`` and the negative-key queue) built around the task's own backbone object, so
``self.backbone is self.algorithm.backbone``; the state dict therefore holds the backbone under both ``backbone.``
and ``algorithm.backbone.`` (the same tensors). Views come from :func:`pretext_tasks.augment.mocov2_view`; the
algorithm's data preprocessor is not used (our views are already normalised float tensors).

Queue length rule (``queue_len: null``): ``min(65536, queue_fraction * num_images)`` rounded down to a multiple of
the configured batch size (at least one batch); an explicit ``queue_len`` is rounded the same way. The batch size
must divide the queue (mmpretrain's enqueue asserts it), which :meth:`MoCoTask.batch_size_multiple` reports.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from mmengine.dist import get_world_size
from mmpretrain.models.heads import ContrastiveHead

from .augment import (
    colour_distortion,
    gaussian_blur,
    mocov2_view,
    normalize,
    random_resized_crop,
    to_float_nchw,
)
from .base import PretextTask, check_crop_scale, config_number, config_positive
from .errors import PretextConfigError
from .registry import register_task
from .split_batch_norm import split_batch_norm

MAX_QUEUE = 65536


def moco_queue_length(num_images: int, batch_size: int, queue_len: int | None = None,
                      queue_fraction: float = 0.5, cap: int = MAX_QUEUE) -> int:
    """The negative-queue length: a multiple of ``batch_size`` (see the module docstring)."""
    batch_size = max(1, int(batch_size))
    target = int(queue_len) if queue_len else int(min(cap, queue_fraction * num_images))
    return max(batch_size, target - target % batch_size)


class _ScoredContrastiveHead(ContrastiveHead):
    """mmpretrain's ContrastiveHead that also records the contrastive top-1 accuracy of its last call (the
    fraction of queries whose positive key outscores every negative in the queue)."""

    last_top1: torch.Tensor | None = None

    def loss(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.last_top1 = (pos.squeeze(1) > neg.max(dim=1).values).float().mean()
        return super().loss(pos, neg)


def _backbone_outputs(backbone: nn.Module, image_size: int) -> tuple:
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = backbone(torch.zeros(2, 3, image_size, image_size))
    backbone.train(was_training)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@register_task
class MoCoTask(PretextTask):
    """MoCo v2 (He et al. 2020; Chen et al. 2020) on top of mmpretrain's implementation."""

    name = 'moco'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        momentum = config_number('moco', task_cfg, 'momentum', 0.999)
        if not 0.5 <= momentum < 1.0:
            raise PretextConfigError(f'moco: momentum must be in [0.5, 1) (MoCo convention, e.g. 0.999), '
                                     f'got {momentum}')
        for key, default in (('temperature', 0.2), ('queue_fraction', 0.5)):
            config_positive('moco', task_cfg, key, default)
        for key, default in (('feat_dim', 128), ('batch_size', 64)):
            config_positive('moco', task_cfg, key, default, int)
        splits = config_positive('moco', task_cfg, 'bn_splits', 1, int)
        batch_size = int(task_cfg.get('batch_size', 64))
        if splits > 1 and (batch_size % splits or batch_size // splits < 2):
            raise PretextConfigError(f'moco: bn_splits {splits} must divide batch_size {batch_size} into groups of '
                                     f'at least 2 images')
        check_crop_scale('moco', task_cfg, (0.2, 1.0))
        config_number('moco', task_cfg, 'color_strength', 1.0)

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        import mmpretrain.models  # noqa: F401  (registers MoCo and its parts)
        from mmpretrain.registry import MODELS

        outputs = _backbone_outputs(self.backbone, self.image_size)
        if len(outputs) != 1:
            raise PretextConfigError(f'moco: the backbone must return one feature map (MoCoV2Neck takes one), '
                                     f'got {len(outputs)}; set out_indices to a single stage')
        momentum = float(self.cfg('momentum', 0.999))
        self.feat_dim = int(self.cfg('feat_dim', 128))
        # under DDP the keys of every rank are enqueued together: the queue holds whole global batches
        self.queue_len = moco_queue_length(self.num_images, int(self.cfg('batch_size', 64)) * get_world_size(),
                                           self.cfg('queue_len'), float(self.cfg('queue_fraction', 0.5)))
        self.crop_scale = tuple(self.cfg('crop_scale', (0.2, 1.0)))
        self.color_strength = float(self.cfg('color_strength', 1.0))
        # one BN per group of the batch (the several GPUs of MoCo's shuffling BN); before the EMA copies the model
        split_batch_norm(self.backbone, int(self.cfg('bn_splits', 1)))
        head = _ScoredContrastiveHead(loss=dict(type='CrossEntropyLoss'),
                                      temperature=float(self.cfg('temperature', 0.2)))
        neck = dict(type='MoCoV2Neck', in_channels=self.feature_dim,
                    hid_channels=int(self.cfg('neck_hid_channels') or self.feature_dim),
                    out_channels=self.feat_dim, with_avg_pool=outputs[0].dim() == 4)
        # built around the SAME backbone object; the EMA (key encoder) deep-copies backbone + neck
        self.algorithm = MODELS.build(dict(type='MoCo', backbone=self.backbone, neck=neck, head=head,
                                           queue_len=self.queue_len, feat_dim=self.feat_dim,
                                           momentum=1.0 - momentum))
        assert self.algorithm.backbone is self.backbone

    # -- the backbone hand-over ------------------------------------------------------------------------------
    def on_backbone_loaded(self) -> None:
        """Start the key encoder from the incoming weights (backbone and neck copied into the EMA model)."""
        self.sync_key_encoder()

    @torch.no_grad()
    def sync_key_encoder(self) -> None:
        online = nn.Sequential(self.algorithm.backbone, self.algorithm.neck)
        self.algorithm.encoder_k.module.load_state_dict(online.state_dict())
        self.algorithm.encoder_k.steps.zero_()  # mmengine's EMA copies (not averages) on its first update

    def batch_size_multiple(self) -> int:
        return self.queue_len

    # -- training ---------------------------------------------------------------------------------------------
    def _view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.color_strength == 1.0:  # the MoCo v2 recipe
            return mocov2_view(x, self.image_size, generator, scale=self.crop_scale)
        s = self.color_strength  # the same pipeline with the colour jitter scaled
        view = random_resized_crop(x, self.image_size, generator, scale=self.crop_scale)
        view = colour_distortion(view, generator, (0.4, 0.4, 0.4, 0.1), s)
        view = gaussian_blur(view, generator, p=0.5)
        return normalize(view)

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The query and key views of every image."""
        x = to_float_nchw(images)
        return [self._view(x, generator) for _ in range(2)]

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        batch = images.shape[0] * get_world_size()
        if self.queue_len % batch:
            raise PretextConfigError(f'moco: batch of {batch} does not divide the queue length {self.queue_len} '
                                     f'(use drop_last and a batch size dividing it)')
        losses = self.algorithm.loss(self.make_inputs(images, generator), None)
        return {'loss': losses['loss'], 'pretext_acc': self.algorithm.head.last_top1}

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """InfoNCE of q against k and the current queue; no enqueue and no momentum update."""
        view_q, view_k = self.make_inputs(images, generator)
        algorithm = self.algorithm
        q = nn.functional.normalize(algorithm.neck(algorithm.backbone(view_q))[0], dim=1)
        k = nn.functional.normalize(algorithm.encoder_k(view_k)[0], dim=1)
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ algorithm.queue
        return ContrastiveHead.loss(algorithm.head, pos, neg)
