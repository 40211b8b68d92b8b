"""ColorMe: predict an image's colour from its luminance (Li et al., "ColorMe: Colour-guided self-supervised
learning for skin lesion images", ISBI 2020; used on HAM10000 and other dermatology data by Gröger et al., "Towards
Reducing the Need for Annotations in Digital Dermatology with Self-supervised Learning", 2022).

The network sees one channel of the image, replicated to the backbone's three input channels (so the backbone
passed on keeps its 3-channel stem and sees a gray image exactly as the pixel contract presents one: replicated,
then ImageNet-normalised), and predicts the two other channels with a light decoder on the backbone's feature maps,
plus the image's colour distribution with a linear head on the pooled last feature. Decoder and distribution head
belong to the stage; only the backbone passes on.

Two colour spaces (``colour_space``):

* ``lab`` (default; the issue contract): input L* / 100 of CIE L*a*b*, targets a* and b*. The conversion
  (:func:`rgb_to_lab`: sRGB gamma, D65 white, CIE 1976) is written here in torch, batched on the batch's device.
* ``rgb``: input the green channel, targets red and blue, values in [0, 1]. This is what Gröger et al.'s reference
  implementation does (github.com/Digital-Dermatology/self-supervised-dermatology with its ssl_library:
  ``ColorMeDatasetWrapper`` feeds ``img[1]``; the trainer rebuilds R, G, B from the predicted R, B and the input G
  "according to the paper").

The loss, as read from that reference implementation (the paper text itself was not available here; see
"Unsure" below): ``mse_weight · MSE(predicted, true colour channels) + kl_weight · KL(true ‖ predicted colour
distribution)``, weights 10 and 1 in its ``colorme.yaml`` (10 and 10 here: the KL weight is the one measured
lever that made the pooled features learn, configs/tasks/colorme.yaml). The colour distribution of an image is the
histogram of each target channel over ``hist_bins`` (5) equal bins of the channel's range, the two histograms
concatenated and normalised to sum 1 (each half then sums to 1/2); the prediction is ONE softmax over the
``2 · hist_bins`` outputs of a linear layer on the pooled last backbone feature (reference: ``MLPHead`` = Linear +
Softmax).
Differences to the reference, all deliberate:

* MSE over the two predicted channels only (the reference averages over R, G, B with G copied from the input, i.e.
  2/3 of this value; the constant factor is absorbed by the learning rate);
* KL averaged over the images of the batch (the reference's ``KLDivLoss(reduction='sum')`` sums over the batch, so
  its weight grows with the batch size);
* ``lab`` targets are scaled by 1/100 inside the MSE (a*, b* in [-108, 98] → about [-1, 1], the scale of the
  reference's [0, 1] RGB targets, so the same weights apply); ``rgb`` targets are used as they are;
* histogram bins span the channel's sRGB gamut (a* in [-86.2, 98.3], b* in [-107.9, 94.5]; R, B in [0, 1]);
* decoder: not a full U-Net (segmentation_models_pytorch, ImageNet-initialised, 5 decoder stages to full
  resolution) but an FPN-like top-down path of ``decoder_width`` channels over the backbone's stage outputs
  (``decoder_skips: true``; mmpretrain ResNets) or from the last map alone (``decoder_skips: false``, any
  convolutional backbone), predicting at the shallowest map's resolution (stride 4 for a ResNet) and upsampled
  bilinearly to the input resolution, where the loss is taken. Without skips every bit of colour has to pass
  through the deepest features (the ones probed and passed on), at the price of a coarser prediction (a ResNet's
  last map is 2x2 at 64 px and 1x1 at 32 px);
* no ImageNet initialisation (the engine starts every first stage from the seed's random backbone).

Augmentation: a random resized crop and a horizontal flip, drawn per image from the task's seeded generator
(:mod:`pretext_tasks.augment`), applied to the RGB image before it is split into input and target, so input and
target stay aligned pixel for pixel. No colour jitter, grayscale or blur: the target IS the colour, and a random
hue / saturation change cannot be recovered from the luminance, so it would only add irreducible noise to the
regression target (and brightness/contrast jitter would change L* and a*, b* together through the non-linear
conversion). The reference's ColorMe dataset wrapper only resizes (its base wrapper's ``preprocess`` was not
checked here).

Pretext metric: ``color_mae``, the mean absolute error of the predicted colour channels per pixel at the input
resolution, in CIE a*/b* units for ``lab`` and in 8-bit levels (0-255) for ``rgb``; LOWER is better (it is logged
and averaged per epoch in the stage history; it is not ``pretext_acc``, which is an accuracy). The validation
score (the LR search's ``pretext`` objective, higher is better) is ``-color_mae`` on the validation images with
fixed draws, in eval mode, without side effects.

Unsure: the original paper could not be read here; the choice of the green channel, the histogram term and its
weights come from Gröger et al.'s implementation, whose comment says it follows the paper. Whether the paper also
works in CIE Lab (as the issue asks) is not known; the ``lab`` default follows the issue, ``rgb`` the reference.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .augment import normalize, random_resized_crop, to_float_nchw
from .base import PretextTask, check_crop_scale, check_probabilities, config_number, config_positive, pool_last
from .classification import eval_mode
from .errors import PretextConfigError
from .registry import register_task

# defaults, kept equal to configs/tasks/colorme.yaml
DEFAULTS = dict(colour_space='lab', crop_scale=(0.5, 1.0), flip_p=0.5, mse_weight=10.0, kl_weight=10.0,
                hist_bins=5, decoder_width=64, decoder_skips=True)
COLOUR_SPACES = ('lab', 'rgb')

#: the sRGB → CIE XYZ matrix (linear RGB, D65; IEC 61966-2-1) and the D65 reference white (the matrix's row sums)
RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
              (0.2126729, 0.7151522, 0.0721750),
              (0.0193339, 0.1191920, 0.9503041))
D65_WHITE = (0.95047, 1.0, 1.08883)
#: the range of a* and b* over the sRGB gamut (a*: green (0,1,0) to magenta (1,0,1); b*: blue (0,0,1) to yellow
#: (1,1,0)), rounded outwards; the colour histograms' bins span these
LAB_AB_RANGE = ((-86.2, 98.3), (-107.9, 94.5))
RGB_RANGE = ((0.0, 1.0), (0.0, 1.0))
#: scale of the lab targets inside the MSE (a*, b* / 100 → about [-1, 1])
LAB_TARGET_SCALE = 0.01
_EPSILON = (6 / 29) ** 3
_KAPPA = 1 / (3 * (6 / 29) ** 2)


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """Undo the sRGB transfer curve of values in [0, 1]."""
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB ``(B, 3, H, W)`` in [0, 1] → CIE L*a*b* ``(B, 3, H, W)`` (D65 white, CIE 1976): L* in [0, 100], a* and
    b* in about [-108, 98]. Computed in float32 whatever the input dtype (bf16 would cost about 0.5 L* units)."""
    x = x.float()
    linear = srgb_to_linear(x.clamp(0.0, 1.0))   # clamp keeps NaN (the non-finite-loss check reports it)
    matrix = torch.tensor(RGB_TO_XYZ, device=x.device, dtype=torch.float32)
    xyz = torch.einsum('ij,bjhw->bihw', matrix, linear)
    white = torch.tensor(D65_WHITE, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > _EPSILON, t.clamp(min=_EPSILON) ** (1 / 3), t * _KAPPA + 4 / 29)
    fx, fy, fz = f[:, 0:1], f[:, 1:2], f[:, 2:3]
    return torch.cat([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=1)


def split_colour(x: torch.Tensor, colour_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB ``(B, 3, H, W)`` in [0, 1] → ``(gray, colour)``: the network's input channel in [0, 1] ``(B, 1, H, W)``
    and the two target channels ``(B, 2, H, W)`` in natural units (lab: L*/100 and a*, b*; rgb: G and R, B)."""
    if colour_space == 'lab':
        lab = rgb_to_lab(x)
        return lab[:, :1] / 100.0, lab[:, 1:]
    if colour_space == 'rgb':
        return x[:, 1:2], torch.cat([x[:, :1], x[:, 2:]], dim=1)
    raise PretextConfigError(f'colorme: colour_space must be one of {COLOUR_SPACES}, got {colour_space!r}')


def colour_histogram(colour: torch.Tensor, bins: int, ranges) -> torch.Tensor:
    """Per-image histogram of each of the two channels of ``colour`` ``(B, 2, H, W)`` over ``bins`` equal bins of
    its range in ``ranges``, concatenated ``(B, 2·bins)`` and normalised to sum 1 (values outside a range go to its
    end bins). Batched: one ``scatter_add`` for the whole batch."""
    batch, channels = colour.shape[:2]
    low = torch.tensor([r[0] for r in ranges], device=colour.device, dtype=torch.float32).view(1, -1, 1, 1)
    high = torch.tensor([r[1] for r in ranges], device=colour.device, dtype=torch.float32).view(1, -1, 1, 1)
    position = ((colour.float() - low) / (high - low) * bins).floor()
    index = position.nan_to_num(0.0).clamp(0, bins - 1).long()          # NaN pixels: caught by the loss check
    index = index + torch.arange(channels, device=colour.device).view(1, -1, 1, 1) * bins
    counts = torch.zeros(batch, channels * bins, device=colour.device, dtype=torch.float32)
    counts.scatter_add_(1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=torch.float32))
    return counts / counts.sum(dim=1, keepdim=True)


def kl_divergence(target: torch.Tensor, log_predicted: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``KL(target ‖ predicted) = Σ t (log t − log p)`` (``0 · log 0 = 0``)."""
    terms = torch.where(target > 0, target * (target.clamp(min=1e-12).log() - log_predicted),
                        torch.zeros_like(target))
    return terms.sum(dim=1).mean()


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ColourDecoder(nn.Module):
    """A light top-down decoder: the deepest map is projected to ``width`` channels, upsampled ×2 (bilinear) and
    refined by a 3×3 conv block per step; with skips (``in_channels`` lists every map, shallow to deep) each step
    adds a 1×1 projection of the map at that resolution (FPN-like); without skips (one map) ``up_steps`` plain
    steps. A 1×1 conv gives the two colour channels at the last step's resolution."""

    def __init__(self, in_channels: list[int], width: int, up_steps: int = 0):
        super().__init__()
        self.lateral = nn.ModuleList([ConvBNReLU(c, width, 1) for c in in_channels])
        steps = len(in_channels) - 1 if len(in_channels) > 1 else up_steps
        self.refine = nn.ModuleList([ConvBNReLU(width, width) for _ in range(steps)])
        self.out = nn.Conv2d(width, 2, 1)
        # zero-initialised: the first prediction is a*, b* = 0 (gray; rgb: 0) instead of random values up to ±100
        # units, which made SGD at the recipes' learning rates diverge in the first iterations
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        top = self.lateral[-1](maps[-1])
        if len(maps) > 1:
            for lateral, refine, skip in zip(reversed(self.lateral[:-1]), self.refine, reversed(maps[:-1])):
                top = F.interpolate(top, size=skip.shape[-2:], mode='bilinear', align_corners=False)
                top = refine(top + lateral(skip))
        else:
            for refine in self.refine:
                top = refine(F.interpolate(top, scale_factor=2, mode='bilinear', align_corners=False))
        return self.out(top)


@register_task
class ColorMe(PretextTask):
    """Predict the colour channels of an image from its luminance (see the module docstring)."""

    name = 'colorme'
    needs_colour = True
    needs_feature_map = True   # its decoder upsamples the backbone's (N, C, H, W) maps

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        d = DEFAULTS
        space = task_cfg.get('colour_space', d['colour_space'])
        if space not in COLOUR_SPACES:
            raise PretextConfigError(f'colorme: colour_space must be one of {COLOUR_SPACES}, got {space!r}')
        check_crop_scale('colorme', task_cfg, d['crop_scale'])
        check_probabilities('colorme', task_cfg, d, 'flip_p')
        weights = {}
        for key in ('mse_weight', 'kl_weight'):
            weights[key] = config_number('colorme', task_cfg, key, d[key])
            if not (math.isfinite(weights[key]) and weights[key] >= 0):
                raise PretextConfigError(f'colorme: {key} must be a non-negative number, got {task_cfg.get(key)!r}')
        if weights['mse_weight'] == 0 and weights['kl_weight'] == 0:
            raise PretextConfigError('colorme: mse_weight and kl_weight are both 0: nothing to learn')
        bins = config_positive('colorme', task_cfg, 'hist_bins', d['hist_bins'], int)
        if bins < 2:
            raise PretextConfigError(f'colorme: hist_bins must be at least 2, got {bins}')
        config_positive('colorme', task_cfg, 'decoder_width', d['decoder_width'], int)
        skips = task_cfg.get('decoder_skips', d['decoder_skips'])
        if not isinstance(skips, bool):
            raise PretextConfigError(f'colorme: decoder_skips must be true or false, got {skips!r}')

    def __init__(self, backbone, task_cfg, num_images, image_size, seed=0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        d = DEFAULTS
        self.colour_space = str(self.cfg('colour_space', d['colour_space']))
        self.crop_scale = tuple(float(v) for v in self.cfg('crop_scale', d['crop_scale']))
        self.flip_p = float(self.cfg('flip_p', d['flip_p']))
        self.mse_weight = float(self.cfg('mse_weight', d['mse_weight']))
        self.kl_weight = float(self.cfg('kl_weight', d['kl_weight']))
        self.hist_bins = int(self.cfg('hist_bins', d['hist_bins']))
        width = int(self.cfg('decoder_width', d['decoder_width']))
        self.ranges = LAB_AB_RANGE if self.colour_space == 'lab' else RGB_RANGE
        self.target_scale = LAB_TARGET_SCALE if self.colour_space == 'lab' else 1.0
        # skips: every stage of an mmpretrain ResNet (the state dict is the same whatever out_indices says, and
        # every consumer of the backbone reads its last output, so passing it on is unchanged)
        self.decoder_skips = bool(self.cfg('decoder_skips', d['decoder_skips']))
        if self.decoder_skips and hasattr(self.backbone, 'res_layers') and hasattr(self.backbone, 'out_indices'):
            self.backbone.out_indices = tuple(range(len(self.backbone.res_layers)))
        shapes = self._probe_shapes()
        if self.decoder_skips and len(shapes) > 1:
            self.decoder = ColourDecoder([s[0] for s in shapes], width)
        else:
            last = shapes[-1][1]
            steps = max(0, math.ceil(math.log2(max(1.0, self.image_size / 4 / last))))
            self.decoder = ColourDecoder([shapes[-1][0]], width, up_steps=steps)
        self.hist_head = nn.Linear(self.feature_dim, 2 * self.hist_bins)

    def _probe_shapes(self) -> list[tuple[int, int]]:
        """(channels, side) of each feature map the backbone returns for an input of the task's size."""
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            out = self.backbone(torch.zeros(2, 3, self.image_size, self.image_size))
        self.backbone.train(was_training)
        maps = list(out) if isinstance(out, (tuple, list)) else [out]
        if any(m.dim() != 4 for m in maps):
            raise PretextConfigError('colorme: needs a convolutional backbone (feature maps of shape (N, C, H, W))')
        return [(int(m.shape[1]), int(m.shape[-1])) for m in maps]

    # -- the pretext problem ---------------------------------------------------------------------------------
    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``(B, H, W, C)`` → ``(inputs, colour)``: the normalised 3-channel gray view ``(B, 3, S, S)`` and
        its two target colour channels ``(B, 2, S, S)`` in natural units (see :func:`split_colour`). Grayscale
        images (C = 1) have no colour to predict (a*, b* = 0; R = B = G)."""
        x = to_float_nchw(images)
        x = random_resized_crop(x, self.image_size, generator, scale=self.crop_scale, flip_p=self.flip_p)
        gray, colour = split_colour(x, self.colour_space)
        inputs = normalize(gray.expand(-1, 3, -1, -1)).contiguous(memory_format=torch.channels_last)
        return inputs, colour

    def predict(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(colour, log_distribution)``: the predicted colour channels at the input resolution, in natural units,
        and the log of the predicted colour distribution ``(B, 2·hist_bins)``; fp32 whatever the backbone ran in."""
        out = self.backbone(inputs)
        maps = [m.float() for m in (out if isinstance(out, (tuple, list)) else [out])]
        colour = self.decoder(maps if self.decoder_skips else maps[-1:])
        colour = F.interpolate(colour, size=inputs.shape[-2:], mode='bilinear', align_corners=False)
        log_distribution = F.log_softmax(self.hist_head(pool_last(maps)), dim=1)
        return colour / self.target_scale, log_distribution

    def _losses(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        inputs, colour = self.make_inputs(images, generator)
        predicted, log_distribution = self.predict(inputs)
        scale = self.target_scale
        mse = F.mse_loss(predicted * scale, colour * scale)
        kl = kl_divergence(colour_histogram(colour, self.hist_bins, self.ranges), log_distribution)
        error = (predicted.detach() - colour).abs().mean() * (255.0 if self.colour_space == 'rgb' else 1.0)
        return {'loss': self.mse_weight * mse + self.kl_weight * kl, 'mse': mse.detach(), 'kl': kl.detach(),
                'color_mae': error}

    def compute_loss(self, images, indices, generator):
        """``loss`` (optimised) plus ``mse``, ``kl`` and ``color_mae`` (logged only: their keys hold no 'loss')."""
        return self._losses(images, generator)

    def evaluation_loss(self, images, generator):
        with eval_mode(self), torch.no_grad():
            return self._losses(images, generator)['loss']

    @torch.no_grad()
    def validation_score(self, images, batch_size: int = 128) -> float:
        """``-color_mae`` over ``images`` (uint8 NHWC; higher is better) with fixed draws (each batch's generator
        seeded by its start index, the base class's convention), in eval mode, without side effects."""
        if len(images) == 0:
            raise PretextConfigError('colorme: validation needs at least 1 image')
        total, count = 0.0, 0
        with eval_mode(self):
            for batch, generator in self.seeded_batches(images, batch_size):
                total += float(self._losses(batch, generator)['color_mae']) * len(batch)
                count += len(batch)
        score = -total / count
        return score if math.isfinite(score) else float('-inf')
