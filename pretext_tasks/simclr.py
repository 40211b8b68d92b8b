"""SimCLR pretext task: mmpretrain's ``SimCLR`` algorithm (NonLinearNeck projector, ContrastiveHead with the NT-Xent
loss over the batch) around the task's own backbone, fed with two batched SimCLR views of every image.

The algorithm is built around the task's backbone object (``self.backbone is self.algorithm.backbone``; the state
dict holds it under both ``backbone.`` and ``algorithm.backbone.``). mmpretrain's ``SimCLR.loss`` interleaves the
two views of each image, L2-normalises the projections, and scores every one of the 2B projections against the
other 2B - 1: its positive (the other view of the same pair) and 2B - 2 negatives; ``ContrastiveHead`` turns that
into the cross-entropy of the positive at ``temperature`` (NT-Xent). The head used here also records the
contrastive top-1 accuracy (``pretext_acc``: the fraction of the 2B queries whose positive outscores every negative
in the batch; chance is about 1 / (2B - 1)).

A view (:func:`simclr_view`): random resized crop of area ``crop_scale`` + flip, colour jitter (0.8, 0.8, 0.8,
0.2) x ``color_strength`` at p 0.8, grayscale p 0.2, Gaussian blur at p ``blur_prob`` (sigma scaled from 224 px),
normalisation. The code defaults are the ImageNet recipe (crop 0.08-1, strength 1, blur 0.5);
``configs/tasks/simclr.yaml`` holds the small-image recipe.

The pair of each image is made by :meth:`SimCLRTask.positive_images`: here the image itself (two views of one
image). MICLe (:mod:`pretext_tasks.micle`) changes only that method.
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
from .base import PretextTask, check_crop_scale, check_probabilities, config_number, config_positive
from .errors import PretextConfigError
from .moco import _backbone_outputs, _ScoredContrastiveHead
from .registry import register_task

#: the code defaults: SimCLR's ImageNet recipe (configs/tasks/simclr.yaml adapts them to small images)
DEFAULTS = dict(temperature=0.1, feat_dim=128, batch_size=64, crop_scale=(0.08, 1.0), color_strength=1.0,
                blur_prob=0.5)


def simclr_view(x: torch.Tensor, size: int, generator: torch.Generator, scale=(0.08, 1.0),
                color_strength: float = 1.0, blur_prob: float = 0.5) -> torch.Tensor:
    """One SimCLR view per image of ``x`` (float NCHW in [0, 1]): crop + flip, colour distortion of strength
    ``color_strength`` (jitter 0.8s/0.8s/0.8s/0.2s at p 0.8, grayscale p 0.2), blur at p ``blur_prob``."""
    s = float(color_strength)
    view = random_resized_crop(x, size, generator, scale=scale)
    view = colour_distortion(view, generator, (0.8, 0.8, 0.8, 0.2), s)
    if blur_prob > 0:
        view = gaussian_blur(view, generator, p=blur_prob)
    return normalize(view)


@register_task
class SimCLRTask(PretextTask):
    """SimCLR (Chen, Kornblith, Norouzi & Hinton, ICML 2020) on top of mmpretrain's implementation."""

    name = 'simclr'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        config_positive(cls.name, task_cfg, 'temperature', DEFAULTS['temperature'])
        for key in ('feat_dim', 'batch_size'):
            config_positive(cls.name, task_cfg, key, DEFAULTS[key], int)
        if task_cfg.get('neck_hid_channels') is not None:
            config_positive(cls.name, task_cfg, 'neck_hid_channels', None, int)
        check_crop_scale(cls.name, task_cfg, DEFAULTS['crop_scale'])
        strength = config_number(cls.name, task_cfg, 'color_strength', DEFAULTS['color_strength'])
        if not strength >= 0:
            raise PretextConfigError(f'{cls.name}: color_strength must be a number >= 0, got {strength}')
        check_probabilities(cls.name, task_cfg, DEFAULTS, 'blur_prob')

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        import mmpretrain.models  # noqa: F401  (registers SimCLR and its parts)
        from mmpretrain.registry import MODELS

        outputs = _backbone_outputs(self.backbone, self.image_size)
        if len(outputs) != 1:
            raise PretextConfigError(f'{self.name}: the backbone must return one feature map (NonLinearNeck takes '
                                     f'one), got {len(outputs)}; set out_indices to a single stage')
        self.feat_dim = int(self.cfg('feat_dim', DEFAULTS['feat_dim']))
        self.crop_scale = tuple(float(v) for v in self.cfg('crop_scale', DEFAULTS['crop_scale']))
        self.color_strength = float(self.cfg('color_strength', DEFAULTS['color_strength']))
        self.blur_prob = float(self.cfg('blur_prob', DEFAULTS['blur_prob']))
        head = _ScoredContrastiveHead(loss=dict(type='CrossEntropyLoss'),
                                      temperature=float(self.cfg('temperature', DEFAULTS['temperature'])))
        # the original projector: fc-BN-ReLU-fc-BN, hidden width = the backbone's (2048-2048-128 for ResNet-50);
        # plain BN1d instead of SyncBN (one process, or DDP where each rank normalises its own batch)
        neck = dict(type='NonLinearNeck', in_channels=self.feature_dim,
                    hid_channels=int(self.cfg('neck_hid_channels') or self.feature_dim),
                    out_channels=self.feat_dim, num_layers=2, with_avg_pool=outputs[0].dim() == 4,
                    norm_cfg=dict(type='BN1d'))
        self.algorithm = MODELS.build(dict(type='SimCLR', backbone=self.backbone, neck=neck, head=head))
        assert self.algorithm.backbone is self.backbone

    # -- training ---------------------------------------------------------------------------------------------
    def positive_images(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The uint8 ``(B, H, W, C)`` images whose view is the positive of each image of the batch: SimCLR pairs
        every image with itself (the positive is a second view of the same image)."""
        return images

    def view(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return simclr_view(x, self.image_size, generator, self.crop_scale, self.color_strength, self.blur_prob)

    def pair_views(self, images: torch.Tensor, positives: torch.Tensor,
                   generator: torch.Generator) -> list[torch.Tensor]:
        """A view of every image and a view of its positive (drawn in that order from ``generator``)."""
        first = self.view(to_float_nchw(images), generator)
        return [first, self.view(to_float_nchw(positives), generator)]

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The two views of every image (the SimCLR pair)."""
        return self.pair_views(images, images, generator)

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        views = self.pair_views(images, self.positive_images(images, indices), generator)
        loss = self.algorithm.loss(views, None)['loss']
        return {'loss': loss, 'pretext_acc': self.algorithm.head.last_top1}

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """NT-Xent of two views of every image (each image its own positive, whatever the task's pairing), with the
        modules in eval mode (batch-norm running statistics used, not updated)."""
        was_training = self.training
        self.eval()
        try:
            return self.algorithm.loss(self.make_inputs(images, generator), None)['loss']
        finally:
            self.train(was_training)
