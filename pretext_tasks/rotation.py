"""Rotation prediction (Gidaris, Singh & Komodakis, ICLR 2018, "RotNet"), batched.

Each image gets light augmentation (random resized crop with a mild scale and a horizontal flip, the flip applied
BEFORE rotating so the four classes stay exactly the four multiples of 90°), is rotated by 0/90/180/270 degrees —
by default ALL FOUR rotations of every image go into the batch, as in the paper and mmselfsup's reference config
(it gives the head every rotation of the same content, which is what makes the task about orientation and not
about the image); ``rotations: random`` instead draws one rotation per image (a quarter of the compute) — and the
backbone's pooled feature goes through a linear head (or, with ``head_hidden > 0``, a one-hidden-layer MLP) to a
4-way cross-entropy. Label ``k`` means ``torch.rot90(image, k, dims=(-2, -1))`` (k quarter turns counter-clockwise).

Why hand-written: mmpretrain 1.x has no RotationPred algorithm (it lived in mmselfsup, as a per-image numpy
transform); here rotations are a batched tensor op driven by the task's seeded generator. The rotation itself is
the pure function :func:`rotate_with_labels`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .augment import normalize, random_resized_crop, to_float_nchw
from .base import check_crop_scale, check_probabilities, config_number, pool_last
from .classification import ClassificationPretext
from .errors import PretextConfigError
from .registry import register_task

# defaults, kept equal to configs/tasks/rotation.yaml
DEFAULTS = dict(crop_scale=(0.5, 1.0), flip_p=0.5, rotations='all', head_hidden=0, head_dropout=0.0)
ROTATION_MODES = ('all', 'random')


def rotate_with_labels(x: torch.Tensor, mode: str = 'all',
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate square images ``(B, C, H, W)`` by multiples of 90° and return ``(rotated, labels)``.

    ``mode='all'``: ``rotated`` is ``(4B, C, H, W)`` with ``rotated[k·B + i] == torch.rot90(x[i], k, (-2, -1))``
    and ``labels[k·B + i] == k``. ``mode='random'``: ``(B, C, H, W)``, image ``i`` turned by ``labels[i]``
    quarter turns, drawn from ``generator``."""
    if x.shape[-1] != x.shape[-2]:
        raise PretextConfigError(f'rotation: images must be square to batch their rotations, got {tuple(x.shape)}')
    batch = x.shape[0]
    if mode == 'all':
        rotated = torch.cat([torch.rot90(x, k, dims=(-2, -1)) for k in range(4)], dim=0)
        labels = torch.arange(4, device=x.device).repeat_interleave(batch)
        return rotated, labels
    if mode == 'random':
        labels = torch.randint(0, 4, (batch,), generator=generator, device=x.device)
        rotated = x.clone()
        for k in range(1, 4):
            chosen = labels == k
            if bool(chosen.any()):
                rotated[chosen] = torch.rot90(x[chosen], k, dims=(-2, -1))
        return rotated, labels
    raise PretextConfigError(f'rotation: rotations must be one of {ROTATION_MODES}, got {mode!r}')


@register_task
class RotationPrediction(ClassificationPretext):
    """Predict by how many quarter turns an image was rotated."""

    name = 'rotation'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        rotations = task_cfg.get('rotations', DEFAULTS['rotations'])
        if rotations not in ROTATION_MODES:
            raise PretextConfigError(f'rotation: rotations must be one of {ROTATION_MODES}, got {rotations!r}')
        check_crop_scale('rotation', task_cfg, DEFAULTS['crop_scale'])
        check_probabilities('rotation', task_cfg, DEFAULTS, 'flip_p', 'head_dropout')
        config_number('rotation', task_cfg, 'head_hidden', DEFAULTS['head_hidden'], int)

    def __init__(self, backbone, task_cfg, num_images, image_size, seed=0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        d = DEFAULTS
        self.crop_scale = tuple(float(v) for v in self.cfg('crop_scale', d['crop_scale']))
        self.flip_p = float(self.cfg('flip_p', d['flip_p']))
        self.rotations = str(self.cfg('rotations', d['rotations']))
        hidden = int(self.cfg('head_hidden', d['head_hidden']))
        dropout = float(self.cfg('head_dropout', d['head_dropout']))
        if hidden > 0:
            self.head = nn.Sequential(nn.Linear(self.feature_dim, hidden), nn.BatchNorm1d(hidden),
                                      nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 4))
        else:
            self.head = nn.Linear(self.feature_dim, 4)

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, H, W, C)`` → normalised rotated views and their labels (see :func:`rotate_with_labels`)."""
        x = to_float_nchw(images)
        # crop + flip first: the flip is folded into the crop's sampling grid, then the exact rot90
        x = random_resized_crop(x, self.image_size, generator, scale=self.crop_scale, flip_p=self.flip_p)
        x, labels = rotate_with_labels(x, self.rotations, generator)
        return normalize(x).contiguous(memory_format=torch.channels_last), labels

    def logits_and_labels(self, images: torch.Tensor,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        views, labels = self.make_inputs(images, generator)
        return self.head(pool_last(self.backbone(views))), labels
