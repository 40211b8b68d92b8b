"""Batched, per-sample image augmentation on tensors (CPU or GPU).

Why written here: torchvision.transforms.v2 applied to a batch tensor draws ONE set of random parameters for the
whole batch, and mmcv/PIL pipelines augment one image at a time in Python, which is where CPU pretext training
spends its time. These functions draw independent parameters per image from an explicit ``torch.Generator`` (so a
resumed run replays the same augmentations) and apply them with a handful of batched tensor ops.

All functions take and return float tensors ``(B, C, H, W)`` in [0, 1] unless stated otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from benchmarks.pixels import normalize, to_unit_float  # noqa: F401  (normalize: used by the tasks through this module)


def _uniform(shape, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=device) * (high - low) + low


def _bernoulli(batch: int, p: float, generator: torch.Generator, device) -> torch.Tensor:
    return torch.rand(batch, generator=generator, device=device) < p


def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` → float ``(B, 3, H, W)`` in [0, 1]; grayscale (C=1) is repeated to 3 channels."""
    return to_unit_float(images).contiguous(memory_format=torch.channels_last)


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator, scale=(0.2, 1.0),
                        ratio=(3 / 4, 4 / 3), flip_p: float = 0.5) -> torch.Tensor:
    """Per-image random crop of area ``scale`` and aspect ``ratio``, resized to ``size`` (bilinear), with a
    horizontal flip of probability ``flip_p`` folded into the same affine sampling grid."""
    batch, device = x.shape[0], x.device
    area = _uniform(batch, scale[0], scale[1], generator, device)
    log_ratio = _uniform(batch, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    # crop width/height as fractions of the image side (clipped so the crop fits)
    width = torch.sqrt(area * aspect).clamp(max=1.0)
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * (1 - width)
    centre_y = (torch.rand(batch, generator=generator, device=device) * 2 - 1) * (1 - height)
    flip = torch.where(_bernoulli(batch, flip_p, generator, device), -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = height
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, (batch, x.shape[1], size, size), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='reflection', align_corners=False)


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4,
                 hue=0.1, p: float = 0.8) -> torch.Tensor:
    """Per-image brightness, contrast, saturation and hue jitter, applied with probability ``p``.

    Hue is rotated in YIQ space (a linear map), which avoids an RGB↔HSV round trip and its numerical pitfalls.
    The four operations run in a fixed order (torchvision randomises it; the difference is immaterial here).
    """
    batch, device = x.shape[0], x.device
    apply = _bernoulli(batch, p, generator, device).view(-1, 1, 1, 1)
    b = _uniform(batch, 1 - brightness, 1 + brightness, generator, device).view(-1, 1, 1, 1)
    c = _uniform(batch, 1 - contrast, 1 + contrast, generator, device).view(-1, 1, 1, 1)
    s = _uniform(batch, 1 - saturation, 1 + saturation, generator, device).view(-1, 1, 1, 1)
    h = _uniform(batch, -hue, hue, generator, device) * 2 * math.pi
    out = (x * b).clamp(0, 1)
    gray = grayscale(out)
    out = ((out - gray.mean(dim=(2, 3), keepdim=True)) * c + gray.mean(dim=(2, 3), keepdim=True)).clamp(0, 1)
    gray = grayscale(out)
    out = ((out - gray) * s + gray).clamp(0, 1)
    out = rotate_hue(out, h).clamp(0, 1)
    return torch.where(apply, out, x)


_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def rotate_hue(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma plane of each image by ``angle`` radians (per image)."""
    to_yiq = _RGB_TO_YIQ.to(x.device, x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(x.shape[0], 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    matrix = to_rgb @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum('bij,bjhw->bihw', matrix, x)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma, kept as 3 identical channels."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True).expand_as(x)


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    apply = _bernoulli(x.shape[0], p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, grayscale(x), x)


def colour_distortion(x: torch.Tensor, generator: torch.Generator, jitter=(0.4, 0.4, 0.4, 0.1), strength: float = 1.0,
                      p: float = 0.8, grayscale_p: float = 0.2) -> torch.Tensor:
    """The SimCLR family's colour distortion: :func:`color_jitter` with ``jitter`` (brightness, contrast, saturation,
    hue) scaled by ``strength`` at probability ``p``, then :func:`random_grayscale` at ``grayscale_p``."""
    s = float(strength)
    brightness, contrast, saturation, hue = jitter
    x = color_jitter(x, generator, brightness * s, contrast * s, saturation * s, hue * s, p=p)
    return random_grayscale(x, generator, p=grayscale_p)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, sigma=(0.1, 2.0), p: float = 0.5,
                  reference_size: int = 224) -> torch.Tensor:
    """Per-image Gaussian blur with probability ``p``. ``sigma`` is given for ``reference_size`` px images (the
    ImageNet recipes' convention) and scaled to the actual size, so small images are not blurred to nothing."""
    batch, channels, height, width = x.shape
    scale = height / reference_size
    sigmas = _uniform(batch, sigma[0] * scale, sigma[1] * scale, generator, x.device).clamp(min=1e-3)
    radius = max(1, int(math.ceil(3 * sigma[1] * scale)))
    radius = min(radius, (min(height, width) - 1) // 2) or 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigmas.view(-1, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (B, K)
    weight = kernel.repeat_interleave(channels, 0)  # (B*C, K)
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode='reflect')
    flat = F.conv2d(flat, weight.view(-1, 1, 1, 2 * radius + 1), groups=batch * channels)
    flat = F.conv2d(flat, weight.view(-1, 1, 2 * radius + 1, 1), groups=batch * channels)
    blurred = flat.view(batch, channels, height, width)
    apply = _bernoulli(batch, p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(apply, blurred, x)


def solarize(x: torch.Tensor, generator: torch.Generator, p: float = 0.2, threshold: float = 0.5) -> torch.Tensor:
    apply = _bernoulli(x.shape[0], p, generator, x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1.0 - x, x)


def mocov2_view(x: torch.Tensor, size: int, generator: torch.Generator, scale=(0.2, 1.0)) -> torch.Tensor:
    """The MoCo v2 / SimCLR view: crop+flip, colour jitter (p 0.8), grayscale (p 0.2), blur (p 0.5)."""
    view = random_resized_crop(x, size, generator, scale=scale)
    view = color_jitter(view, generator, 0.4, 0.4, 0.4, 0.1, p=0.8)
    view = random_grayscale(view, generator, p=0.2)
    view = gaussian_blur(view, generator, p=0.5)
    return normalize(view)
