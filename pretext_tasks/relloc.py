"""Relative patch location (Doersch, Gupta & Efros, ICCV 2015), batched for small medical images.

Each training image is randomly cropped (mild scale, flip), a 3×3 grid of square patches with gaps between them
and a random per-patch jitter is laid over the crop, and the centre patch is paired with each of its 8 neighbours.
All 9 patches of every image go through the shared backbone in ONE forward pass; the pooled features of the centre
and a neighbour are concatenated (2×D) and an MLP head (fc 2D→hidden, BN, ReLU, dropout, fc hidden→8) predicts
where the neighbour sits (label 0..7, row-major over the 8 non-centre cells, see :data:`NEIGHBOUR_CELLS`).

Why hand-written: mmpretrain 1.x has no RelativeLoc algorithm (it lived in mmselfsup, whose per-image numpy
transform pipeline and 8-view data preprocessor do not fit this engine's batched, generator-driven tensor
augmentation). The geometry lives in the pure function :func:`patch_layout` so it can be tested on its own.

Low-level shortcut guards (Doersch §3 "Avoiding trivial solutions"): gaps between patches and per-patch jitter
(no edge continuation or texture alignment), and per patch independently: colour dropping (keep one channel,
replace the others with near-constant noise), random grayscale, per-channel gain/offset jitter (no chromatic
aberration or colour-gradient cues) and a random down-then-up resize (no reliance on pixel-level detail).

Geometry at 64 px (the defaults are fractions of the image side, so they scale with the resolution): patches of
16 px (0.25), gaps of 6 px (0.09375) and jitter of ±2 px (0.03125) — 3·16 + 2·6 + 2·2 = 64, so the grid fills the
crop and neighbouring patches are always at least 2 px apart. Patches are resized to 32 px (``patch_input_frac``
0.5, never below 32) before the backbone: ResNet downsamples 32×, so 32 px is the smallest input that still leaves
a 1×1 map after the last stage with every stage seeing real spatial extent.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import normalize, random_resized_crop, to_float_nchw
from .base import check_crop_scale, check_probabilities, config_number, pool_last
from .classification import ClassificationPretext
from .errors import PretextConfigError
from .registry import register_task

#: (row, col) of the neighbour with label i — row-major over the 3×3 grid, skipping the centre (1, 1)
NEIGHBOUR_CELLS = ((0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2))
CENTRE_CELL = 4  # index of the centre in the row-major list of the 9 cells

# defaults, kept equal to configs/tasks/relloc.yaml
DEFAULTS = dict(crop_scale=(0.6, 1.0), flip_p=0.5, patch_frac=0.25, gap_frac=0.09375, jitter_frac=0.03125,
                patch_input_frac=0.5, color_drop_p=0.2, grayscale_p=0.3, channel_jitter=0.1, downsample_p=0.2,
                head_hidden=1024, head_dropout=0.5)
MIN_PATCH_INPUT = 32


def grid_geometry(image_size: int, patch_frac: float = DEFAULTS['patch_frac'],
                  gap_frac: float = DEFAULTS['gap_frac'],
                  jitter_frac: float = DEFAULTS['jitter_frac']) -> tuple[int, int, int]:
    """Patch side, gap and maximal jitter in pixels for an ``image_size`` crop; raises if the grid does not fit."""
    patch = max(1, int(round(patch_frac * image_size)))
    gap = max(0, int(round(gap_frac * image_size)))
    jitter = max(0, int(round(jitter_frac * image_size)))
    if 3 * patch + 2 * gap + 2 * jitter > image_size:
        raise PretextConfigError(
            f'relloc: a 3x3 grid of {patch} px patches with {gap} px gaps and ±{jitter} px jitter needs '
            f'{3 * patch + 2 * gap + 2 * jitter} px, the crop has {image_size} px')
    return patch, gap, jitter


def patch_layout(image_size: int, batch: int, generator: torch.Generator, patch: int, gap: int, jitter: int,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 3×3 patch boxes of ``batch`` images (pure: depends only on its arguments and the generator's state).

    The grid (extent ``3·patch + 2·gap``) is placed at a random offset inside the ``image_size`` square (where
    there is slack) and every patch is moved independently by an integer jitter in ``[-jitter, jitter]`` on each
    axis. Returns ``boxes`` int64 ``(batch, 9, 4)`` as ``(top, left, bottom, right)`` with exclusive
    bottom/right, cells in row-major order (index :data:`CENTRE_CELL` is the centre), and ``labels`` int64
    ``(8,)``: the neighbour-position label of the non-centre cells in that same order (0..7, see
    :data:`NEIGHBOUR_CELLS`)."""
    extent = 3 * patch + 2 * gap
    slack = image_size - extent - 2 * jitter
    if slack < 0:
        raise PretextConfigError(f'relloc: the patch grid ({extent} px + ±{jitter} px jitter) does not fit in '
                                 f'{image_size} px')
    step = patch + gap
    cells = torch.arange(3, device=device) * step  # cell origins along one axis, before offsets
    offset = torch.randint(0, slack + 1, (batch, 1, 2), generator=generator, device=device) + jitter
    shake = torch.randint(-jitter, jitter + 1, (batch, 9, 2), generator=generator, device=device)
    rows = cells.repeat_interleave(3)  # row-major: (0,0),(0,1),(0,2),(1,0),...
    cols = cells.repeat(3)
    top = rows.view(1, 9) + offset[..., 0] + shake[..., 0]
    left = cols.view(1, 9) + offset[..., 1] + shake[..., 1]
    boxes = torch.stack([top, left, top + patch, left + patch], dim=-1)
    labels = torch.arange(8, device=device)
    return boxes, labels


def crop_patches(x: torch.Tensor, boxes: torch.Tensor, patch: int) -> torch.Tensor:
    """Cut the equal-sized boxes ``(B, P, 4)`` out of ``x`` ``(B, C, H, W)`` with one gather: ``(B, P, C, p, p)``."""
    batch, count = boxes.shape[:2]
    span = torch.arange(patch, device=x.device)
    rows = (boxes[..., 0:1] + span).view(batch, count, patch, 1)
    cols = (boxes[..., 1:2] + span).view(batch, count, 1, patch)
    image = torch.arange(batch, device=x.device).view(batch, 1, 1, 1)
    # advanced indices around a slice: the result is (B, P, p, p, C)
    out = x[image, :, rows, cols]
    return out.permute(0, 1, 4, 2, 3)


def _chance(n: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def patch_guards(x: torch.Tensor, generator: torch.Generator, color_drop_p: float, grayscale_p: float,
                 channel_jitter: float, downsample_p: float, downsample_size: int) -> torch.Tensor:
    """Per-patch anti-shortcut augmentation of float patches ``(N, 3, s, s)`` in [0, 1] (see module docstring).

    Colour dropping and grayscale are exclusive (a dropped patch is not also made gray); channel jitter applies to
    every patch; every random draw is made for every patch so the generator advances the same way each call."""
    n, device = x.shape[0], x.device
    # down-then-up resize: removes detail finer than ``downsample_size`` px
    if downsample_p > 0:
        small = F.interpolate(x, size=downsample_size, mode='area')
        coarse = F.interpolate(small, size=x.shape[-2:], mode='bilinear', align_corners=False)
        x = torch.where(_chance(n, downsample_p, generator, device).view(-1, 1, 1, 1), coarse, x)
    # per-channel gain and offset
    if channel_jitter > 0:
        gain = 1 + (torch.rand(n, 3, 1, 1, generator=generator, device=device) * 2 - 1) * channel_jitter
        shift = (torch.rand(n, 3, 1, 1, generator=generator, device=device) * 2 - 1) * channel_jitter * 0.5
        x = (x * gain + shift).clamp(0, 1)
    drop = _chance(n, color_drop_p, generator, device)
    gray = _chance(n, grayscale_p, generator, device) & ~drop
    # colour dropping: keep one random channel, replace the other two by its mean plus faint noise
    keep = torch.randint(0, 3, (n,), generator=generator, device=device)
    noise = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    kept = x.gather(1, keep.view(-1, 1, 1, 1).expand(-1, 1, *x.shape[-2:]))
    filler = kept.mean(dim=(2, 3), keepdim=True) + noise * 0.01 * kept.std(dim=(2, 3), keepdim=True)
    keep_mask = F.one_hot(keep, 3).to(torch.bool).view(n, 3, 1, 1)
    dropped = torch.where(keep_mask, x, filler.clamp(0, 1))
    x = torch.where(drop.view(-1, 1, 1, 1), dropped, x)
    weights = torch.tensor([0.299, 0.587, 0.114], device=device, dtype=x.dtype).view(1, 3, 1, 1)
    luma = (x * weights).sum(1, keepdim=True).expand_as(x)
    return torch.where(gray.view(-1, 1, 1, 1), luma, x)


def patch_input_size(image_size: int, patch_input_frac: float = DEFAULTS['patch_input_frac']) -> int:
    """The side (px) the patches are resized to before the backbone: ``patch_input_frac`` of the image side, never
    below :data:`MIN_PATCH_INPUT`."""
    return max(MIN_PATCH_INPUT, int(round(float(patch_input_frac) * int(image_size))))


@register_task
class RelativeLocation(ClassificationPretext):
    """Relative patch location: predict which of the 8 neighbours a patch is, given the centre patch."""

    name = 'relloc'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        d = DEFAULTS
        grid_geometry(int(image_size), *(config_number('relloc', task_cfg, key, d[key])
                                         for key in ('patch_frac', 'gap_frac', 'jitter_frac')))
        check_probabilities('relloc', task_cfg, d, 'color_drop_p', 'grayscale_p', 'downsample_p', 'head_dropout',
                            'flip_p')
        check_crop_scale('relloc', task_cfg, d['crop_scale'])
        for key in ('patch_input_frac', 'channel_jitter'):
            config_number('relloc', task_cfg, key, d[key])
        config_number('relloc', task_cfg, 'head_hidden', d['head_hidden'], int)

    @classmethod
    def backbone_input_sizes(cls, task_cfg: dict, image_size: int) -> list[int]:
        """The backbone sees the resized patches only."""
        return [patch_input_size(image_size, config_number('relloc', task_cfg, 'patch_input_frac',
                                                           DEFAULTS['patch_input_frac']))]

    def __init__(self, backbone, task_cfg, num_images, image_size, seed=0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        d = DEFAULTS
        self.crop_scale = tuple(float(v) for v in self.cfg('crop_scale', d['crop_scale']))
        self.flip_p = float(self.cfg('flip_p', d['flip_p']))
        self.patch, self.gap, self.jitter = grid_geometry(
            self.image_size, float(self.cfg('patch_frac', d['patch_frac'])),
            float(self.cfg('gap_frac', d['gap_frac'])), float(self.cfg('jitter_frac', d['jitter_frac'])))
        self.patch_input = patch_input_size(self.image_size, float(self.cfg('patch_input_frac',
                                                                            d['patch_input_frac'])))
        self.color_drop_p = float(self.cfg('color_drop_p', d['color_drop_p']))
        self.grayscale_p = float(self.cfg('grayscale_p', d['grayscale_p']))
        self.channel_jitter = float(self.cfg('channel_jitter', d['channel_jitter']))
        self.downsample_p = float(self.cfg('downsample_p', d['downsample_p']))
        # the resize guard keeps half the patch's native resolution
        self.downsample_size = max(4, self.patch // 2)
        hidden = int(self.cfg('head_hidden', d['head_hidden']))
        dropout = float(self.cfg('head_dropout', d['head_dropout']))
        in_dim = 2 * self.feature_dim
        if hidden > 0:
            self.head = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                      nn.Dropout(dropout), nn.Linear(hidden, 8))
        else:
            self.head = nn.Linear(in_dim, 8)

    # -- the pretext problem ---------------------------------------------------------------------------------
    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, H, W, C)`` → normalised patches ``(B·9, 3, s, s)`` (image-major, cells row-major) and the
        neighbour labels ``(B·8,)`` for the (centre, neighbour) pairs in the same image-major order."""
        x = to_float_nchw(images)
        x = random_resized_crop(x, self.image_size, generator, scale=self.crop_scale, flip_p=self.flip_p)
        boxes, labels = patch_layout(self.image_size, x.shape[0], generator, self.patch, self.gap, self.jitter,
                                     device=x.device)
        patches = crop_patches(x, boxes, self.patch).flatten(0, 1)
        if self.patch_input != self.patch:
            patches = F.interpolate(patches, size=self.patch_input, mode='bilinear', align_corners=False,
                                    antialias=self.patch_input < self.patch)
        patches = patch_guards(patches, generator, self.color_drop_p, self.grayscale_p, self.channel_jitter,
                               self.downsample_p, self.downsample_size)
        patches = normalize(patches).contiguous(memory_format=torch.channels_last)
        return patches, labels.repeat(x.shape[0])

    def logits_and_labels(self, images: torch.Tensor,
                          generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        patches, labels = self.make_inputs(images, generator)
        feats = pool_last(self.backbone(patches)).view(images.shape[0], 9, -1)
        centre = feats[:, CENTRE_CELL:CENTRE_CELL + 1].expand(-1, 8, -1)
        neighbours = torch.cat([feats[:, :CENTRE_CELL], feats[:, CENTRE_CELL + 1:]], dim=1)
        pairs = torch.cat([centre, neighbours], dim=-1).flatten(0, 1)  # (B·8, 2D)
        return self.head(pairs), labels
