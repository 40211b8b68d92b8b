"""Built-in generated datasets, so the engine runs on a fresh machine with no download.

``synthetic_derm``
    Dermoscopy-like RGB images in ISIC-2019's eight diagnostic classes (MEL, NV, BCC, AK, BKL, DF, VASC, SCC).
    The class shows in lesion shape (round / asymmetric), border (sharp / blurred / notched), colour pattern
    (pigment network, dots and globules, blue-grey regions, red lacunae, white scar or keratin centre, vessels) and
    texture (cerebriform ridges, scale). Every image also varies in nuisances: skin tone, lesion size (as large in
    the frame as HAM10000's lesions, see ``_LESION_SCALE``), position and rotation, vignetting and dermatoscope
    frame, hair, ruler ticks, white balance / hue / brightness and JPEG-like block quantisation. Like real dermoscopy the camera frame has an orientation (light from above, rulers mostly at
    the bottom, field of view set a little low), so rotation prediction has something to learn. Class palettes
    overlap and the colour of every image is randomised, so the mean colour of an image says little about its class:
    structure matters. ROI mask: the lesion.

``synthetic_cxr``
    Chest-X-ray-like grayscale images: body outline, two lung fields, mediastinum, heart (bulging to the patient's
    left, the image right, as on a PA film), ribs, clavicles, spine, diaphragm, gastric bubble, quantum noise.
    Classes: normal, opacity (patchy consolidation inside a lung), cardiomegaly (cardiothoracic ratio > 0.55),
    effusion (fluid at a lung base with a meniscus that blunts the costophrenic angle). Patient size, position,
    rotation and exposure vary. ROI mask: the anatomical lung fields.

Both have several images per group id (derm 1-4 in HAM10000's proportions, CXR 1-3; views of one lesion / studies
of one patient: shifted, rotated, recoloured or re-exposed), no published split, and mildly imbalanced (derm, NV most
common) or balanced (CXR) classes.

Options (``dataset_options``): ``num_images`` (default 2400), ``native_size`` (default 96 px), ``seed`` (default 0;
alias ``generator_seed``, usable through ``load_dataset`` whose own ``seed`` is the split seed). ``root``, when
given, is the cache folder; otherwise ``<default_cache_dir()>/synthetic``. Generation is deterministic, vectorised
numpy; the result is cached as one ``.npz`` (images, labels, groups, packed masks) plus one PNG per mask, which is
what :attr:`ImageRecords.masks` points at.
"""
from __future__ import annotations

import os
import shutil
import zipfile

import numpy as np
from PIL import Image

from .base import ArrayImageSource, ImageRecords
from ..files import default_cache_dir
from .errors import DatasetError
from .registry import register_dataset

#: bump whenever generated pixels, labels, groups or masks change (part of the cache key and the fingerprint)
GENERATOR_VERSION = 4
#: random-stream ids of the two generators (kept apart from the version so that a bump alone changes no image)
_DERM_STREAM, _CXR_STREAM = (1, 1), (1, 2)

DERM_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']
#: class frequencies (per lesion), mildly imbalanced like ISIC 2019 but every class >= 8 %
DERM_FREQUENCIES = (0.16, 0.22, 0.13, 0.10, 0.13, 0.08, 0.09, 0.09)
CXR_CLASSES = ['normal', 'opacity', 'cardiomegaly', 'effusion']
CXR_FREQUENCIES = (0.25, 0.25, 0.25, 0.25)

DEFAULT_NUM_IMAGES = 2400
DEFAULT_NATIVE_SIZE = 96
#: images per group (lesion / patient) and their probabilities. derm (generator v4): HAM10000's images per lesion_id
#: (5,514 / 1,423 / 490 / 43 of its 7,470 lesions have 1 / 2 / 3 / 4+ images, so 45 % of its images have a sibling);
#: version 3 drew 45 / 35 / 20 % (75 % of the images had a sibling), and an image's siblings, re-renderings of the
#: same lesion, are as close to it as its own second augmented view (at random initialisation the sibling beats the
#: positive view for 49 % of them): too many false negatives for instance discrimination. CXR: unchanged.
_DERM_VIEWS_PER_GROUP = ((1, 2, 3, 4), (0.74, 0.19, 0.065, 0.005))
_CXR_VIEWS_PER_GROUP = ((1, 2, 3), (0.45, 0.35, 0.20))
_CHUNK = 16  # images rendered together (small enough for the temporaries to stay in cache)
_LATTICE = 16  # side of the per-image random lattices behind the value noise and the dot cells

F32 = np.float32


# ---------------------------------------------------------------------------------------------------------------
# vectorised drawing helpers. Maps are (B, H, W), colour images channel-first (B, 3, H, W); per-image parameters
# broadcast as (B, 1, 1) or, for colours, (B, 3, 1, 1). Smooth fields are computed on a half-resolution grid and
# upsampled with two small matrix products.
# ---------------------------------------------------------------------------------------------------------------
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1]: x as (1, 1, W), y as (1, H, 1)."""
    t = ((np.arange(size, dtype=F32) + 0.5) / size * 2.0 - 1.0).astype(F32)
    return t[None, None, :], t[None, :, None]


def _upsampler(fine: int, coarse: int) -> np.ndarray:
    """``(fine, coarse)`` linear-interpolation matrix between the pixel-centre grids of two sizes."""
    position = np.clip((np.arange(fine) + 0.5) / fine * coarse - 0.5, 0, coarse - 1)
    low = np.minimum(np.floor(position).astype(int), coarse - 2) if coarse > 1 else np.zeros(fine, int)
    weight = position - low
    matrix = np.zeros((fine, coarse), dtype=F32)
    matrix[np.arange(fine), low] += 1.0 - weight
    if coarse > 1:
        matrix[np.arange(fine), low + 1] += weight
    return matrix


class _Grids:
    """The fine pixel grid of one chunk and its half-resolution companion."""

    def __init__(self, size: int):
        self.size = size
        self.coarse_size = max(8, (size + 1) // 2)
        self.x, self.y = _grid(size)
        self.xc, self.yc = _grid(self.coarse_size)
        self.up_matrix = _upsampler(size, self.coarse_size)

    def up(self, field: np.ndarray) -> np.ndarray:
        """A coarse ``(B, h, h)`` field at full resolution (bilinear)."""
        if self.size != 2 * self.coarse_size:
            return (self.up_matrix @ field @ self.up_matrix.T).astype(F32)
        return _double(_double(field.astype(F32, copy=False), 1), 2)


def _double(field: np.ndarray, axis: int) -> np.ndarray:
    """Exact bilinear 2x upsampling along ``axis`` of pixel-centre grids (edges replicated)."""
    n = field.shape[axis]
    before = np.take(field, np.r_[0, np.arange(n - 1)], axis=axis)
    after = np.take(field, np.r_[np.arange(1, n), n - 1], axis=axis)
    shape = list(field.shape)
    shape[axis] = 2 * n
    out = np.empty(shape, dtype=field.dtype)
    even = [slice(None)] * field.ndim
    odd = [slice(None)] * field.ndim
    even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
    out[tuple(even)] = field * 0.75 + before * 0.25
    out[tuple(odd)] = field * 0.75 + after * 0.25
    return out


def _c(values) -> np.ndarray:
    """Per-image values ``(B,)`` as ``(B, 1, 1)`` float32, ready to broadcast over pixels."""
    return np.asarray(values, dtype=F32)[:, None, None]


def _rgb(values) -> np.ndarray:
    """Colours, one ``(3,)`` for all images or ``(B, 3)`` per image, as ``(B|1, 3, 1, 1)``."""
    values = np.asarray(values, dtype=F32)
    return values.reshape(-1, 3)[:, :, None, None]


def _smoothstep(edge0, edge1, x) -> np.ndarray:
    """Hermite step from 0 at ``edge0`` to 1 at ``edge1`` (either order); edges may be arrays."""
    t = x - edge0
    t *= 1.0 / (edge1 - edge0)
    np.clip(t, 0.0, 1.0, out=t)
    out = 3.0 - 2.0 * t
    out *= t
    out *= t
    return out


def _mix(colour: np.ndarray, target: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``colour`` (B, 3, H, W) moved towards ``target`` by ``weight`` (B, H, W), in place."""
    step = target - colour
    step *= weight[:, None]
    colour += step
    return colour


def _take(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``table[b, index[b, ...]]`` for a per-image table ``(B, T)`` and integer indices ``(B, ...)``."""
    offsets = (np.arange(len(table)) * table.shape[1]).reshape((-1,) + (1,) * (index.ndim - 1))
    return np.take(table.reshape(-1), index + offsets)


def _value_noise(lattice: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth periodic noise in [0, 1]: a per-image random lattice ``(B, G, G)`` interpolated (smoothstep weights)
    at lattice coordinates ``u``, ``v`` (broadcastable to ``(B, H, W)``)."""
    count, g = len(lattice), lattice.shape[-1]
    table = lattice.reshape(-1)
    shape = (count,) + np.broadcast_shapes(u.shape, v.shape)[1:]
    u, v = np.broadcast_to(u, shape), np.broadcast_to(v, shape)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3.0 - 2.0 * fu), fv * fv * (3.0 - 2.0 * fv)
    mask = g - 1  # g is a power of two: & wraps negative indices too
    i0 = iu.astype(np.int32) & mask
    i1 = (i0 + 1) & mask
    r0 = iv.astype(np.int32) & mask
    base = (np.arange(count, dtype=np.int32) * (g * g))[:, None, None]
    j0, j1 = r0 * g + base, ((r0 + 1) & mask) * g + base
    a, b, c, d = table[j0 + i0], table[j0 + i1], table[j1 + i0], table[j1 + i1]
    top = a + (b - a) * fu
    return top + (c + (d - c) * fu - top) * fv


def _fractal(lattices: np.ndarray, u: np.ndarray, v: np.ndarray, frequency) -> np.ndarray:
    """Two octaves of value noise ``(B, 2, G, G)`` at ``frequency`` lattice cells per unit of ``u``, ``v``."""
    low = _value_noise(lattices[:, 0], u * frequency, v * frequency)
    high = _value_noise(lattices[:, 1], u * (2.1 * frequency) + 3.7, v * (2.1 * frequency) + 1.3)
    return (low * 0.68 + high * 0.32).astype(F32)


def _angular(table: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Periodic per-image function of the angle ``phi`` sampled in ``table`` ``(B, A)``, linearly interpolated."""
    a = table.shape[1]
    t = (phi * F32(1.0 / (2.0 * np.pi)) % 1.0) * a
    i0 = np.floor(t)
    f = (t - i0).astype(F32)
    i0 = i0.astype(np.int32) & (a - 1)  # a is a power of two
    return _take(table, i0) * (1.0 - f) + _take(table, (i0 + 1) & (a - 1)) * f


def _harmonic_table(rng: np.random.Generator, count: int, amplitudes: np.ndarray, first: int, last: int,
                    samples: int = 128) -> np.ndarray:
    """``(count, samples)`` tables of ``sum_k a_k cos(k phi + p_k)`` over harmonics ``first..last``, normalised to
    a peak of 1 and scaled per row by ``amplitudes``."""
    ks = np.arange(first, last + 1, dtype=np.float64)
    weights = rng.uniform(0.4, 1.0, (count, len(ks))) / np.sqrt(ks)
    phases = rng.uniform(0, 2 * np.pi, (count, len(ks)))
    phi = np.linspace(0, 2 * np.pi, samples, endpoint=False)
    waves = np.cos(ks[None, :, None] * phi[None, None, :] + phases[:, :, None])
    table = (weights[:, :, None] * waves).sum(1)
    table /= np.abs(table).max(1, keepdims=True) + 1e-9
    return (table * np.asarray(amplitudes)[:, None]).astype(F32)


def _cells(rng: np.random.Generator, count: int, on_probability: np.ndarray, radius: tuple[float, float]) \
        -> np.ndarray:
    """Per-image dot tables ``(count, 4, G*G)``: dot centre (x, y) inside its cell, radius (0 = no dot), tone."""
    shape = (count, _LATTICE * _LATTICE)
    on = rng.random(shape) < np.asarray(on_probability)[:, None]
    table = np.stack([rng.uniform(0.3, 0.7, shape), rng.uniform(0.3, 0.7, shape),
                      np.where(on, rng.uniform(radius[0], radius[1], shape), 0.0), rng.random(shape)], axis=1)
    return table.astype(F32)


def _dots(table: np.ndarray, u: np.ndarray, v: np.ndarray, cell: np.ndarray, pixel: np.ndarray) \
        -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased round dots, at most one per cell of side ``cell`` (per image, ``(B, 1, 1)``) in the
    ``u``, ``v`` plane; returns the coverage and the per-dot tone, both ``(B, H, W)``. O(1) per pixel."""
    cu, cv = u / cell, v / cell
    iu, iv = np.floor(cu), np.floor(cv)
    flat = (iv.astype(np.int32) & (_LATTICE - 1)) * _LATTICE + (iu.astype(np.int32) & (_LATTICE - 1))
    dx = cu - iu - _take(table[:, 0], flat)
    dy = cv - iv - _take(table[:, 1], flat)
    radius = _take(table[:, 2], flat)
    coverage = np.clip((radius - np.sqrt(dx * dx + dy * dy)) * (cell / pixel) + 0.5, 0.0, 1.0)
    coverage[radius <= 0] = 0.0
    return coverage.astype(F32), _take(table[:, 3], flat)


def _curves(px, py, angle, curvature, length, width, x, y, pixel) -> np.ndarray:
    """Coverage ``(B, H, W)`` of up to K thin parabolic strokes per image (parameters ``(B, K)``; width 0 = none).
    Each stroke slot is drawn only on the images that use it."""
    cover = np.zeros((px.shape[0], y.shape[1], x.shape[2]), dtype=F32)
    for k in range(px.shape[1]):
        idx = np.flatnonzero(width[:, k] > 0)
        if len(idx) == 0:
            continue
        ca, sa = _c(np.cos(angle[idx, k])), _c(np.sin(angle[idx, k]))
        dx, dy = x - _c(px[idx, k]), y - _c(py[idx, k])
        s = dx * ca + dy * sa
        t = dy * ca - dx * sa - _c(curvature[idx, k]) * s * s
        stroke = np.clip((_c(width[idx, k] * 0.5) - np.abs(t)) * (1.0 / pixel) + 0.5, 0.0, 1.0)
        stroke *= _smoothstep(_c(length[idx, k]), _c(length[idx, k] * 0.8), np.abs(s))
        cover[idx] = np.maximum(cover[idx], stroke)
    return cover


def _blur3(image: np.ndarray) -> np.ndarray:
    """Binomial 3x3 blur of ``(B, H, W)`` maps (edges replicated)."""
    p = np.pad(image, [(0, 0), (1, 1), (1, 1)], mode='edge')
    rows = p[:, :-2] * 0.25 + p[:, 1:-1] * 0.5 + p[:, 2:] * 0.25
    return (rows[:, :, :-2] * 0.25 + rows[:, :, 1:-1] * 0.5 + rows[:, :, 2:] * 0.25).astype(F32)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] (clipped, in place) to rounded uint8."""
    np.clip(image, 0.0, 1.0, out=image)
    image *= 255.0
    image += 0.5
    return image.astype(np.uint8)


def _dct_matrix() -> np.ndarray:
    k = np.arange(8)
    matrix = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / 16.0) * np.sqrt(2.0 / 8.0)
    matrix[0] /= np.sqrt(2.0)
    return matrix.astype(F32)


def _block_quantise(planes: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """JPEG-like 8x8 block-DCT quantisation of ``(B, P, H, W)`` planes; ``steps`` ``(B, P)`` is the base step
    (frequency (i, j) is quantised with ``step * (1 + (i + j) / 2)``)."""
    B, P, H, W = planes.shape
    ph, pw = -H % 8, -W % 8
    x = np.pad(planes, [(0, 0), (0, 0), (0, ph), (0, pw)], mode='edge') if ph or pw else planes
    hb, wb = x.shape[2] // 8, x.shape[3] // 8
    dct = _dct_matrix()
    # (B, P, hb, wb, 8, 8) blocks; numpy multiplies stacks of tiny matrices in its own loop (no BLAS threads,
    # which are slow on a busy machine)
    blocks = x.reshape(B, P, hb, 8, wb, 8).transpose(0, 1, 2, 4, 3, 5)
    freq = np.arange(8, dtype=F32)
    q = steps[:, :, None, None, None, None].astype(F32) * (1.0 + (freq[:, None] + freq[None, :]) * 0.5)
    coef = np.round((dct @ blocks @ dct.T) / q) * q
    out = (dct.T @ coef @ dct).transpose(0, 1, 2, 4, 3, 5).reshape(x.shape)
    return out[:, :, :H, :W].astype(F32)


def _jpeg_like(image: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """JPEG-like artefacts on ``(B, 3, H, W)`` RGB: luma quantised in 8x8 DCT blocks with base step ``steps``
    ``(B,)``; the two opponent (chroma) planes subsampled 2x (even sizes)."""
    r, g, b = image[:, 0], image[:, 1], image[:, 2]
    luma = _block_quantise((0.299 * r + 0.587 * g + 0.114 * b)[:, None], steps[:, None])[:, 0]
    chroma = np.stack([b - 0.5 * r, r - g], axis=1)
    if image.shape[2] % 2 == 0 and image.shape[3] % 2 == 0:
        chroma = (chroma[:, :, 0::2, 0::2] + chroma[:, :, 1::2, 0::2] + chroma[:, :, 0::2, 1::2]
                  + chroma[:, :, 1::2, 1::2]) * 0.25
        chroma = _double(_double(chroma, 2), 3)
    blue, red = chroma[:, 0], chroma[:, 1]
    r = (luma + 0.587 * red - 0.114 * blue) * F32(1.0 / (0.299 + 0.587 + 0.114 * 0.5))  # inverse transform
    return np.stack([r, r - red, blue + 0.5 * r], axis=1)


def _draw_groups(rng: np.random.Generator, num_images: int, views_per_group) -> np.ndarray:
    """Group id of every image: groups of consecutive images, sizes drawn from ``views_per_group`` ((sizes,
    probabilities)); the last group is cut to fit."""
    sizes = rng.choice(views_per_group[0], size=num_images, p=views_per_group[1])
    ends = np.cumsum(sizes)
    count = int(np.searchsorted(ends, num_images) + 1)
    sizes = sizes[:count].copy()
    sizes[-1] -= ends[count - 1] - num_images
    return np.repeat(np.arange(count), sizes)


def _draw_classes(rng: np.random.Generator, count: int, frequencies) -> np.ndarray:
    """Class per group: exact quotas (largest remainders) in random order, so the balance is as specified."""
    frequencies = np.asarray(frequencies, dtype=np.float64)
    quota = np.floor(frequencies * count).astype(int)
    remainder = frequencies * count - quota
    quota[np.argsort(-remainder, kind='stable')[:count - quota.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(frequencies)), quota))


# ---------------------------------------------------------------------------------------------------------------
# synthetic_derm
# ---------------------------------------------------------------------------------------------------------------
#: lesion colour anchors (RGB in [0, 1]): light brown, brown, dark brown, pink, red, purple, black, tan-grey
_DERM_ANCHORS = np.array([[0.72, 0.52, 0.36], [0.52, 0.33, 0.21], [0.31, 0.19, 0.13], [0.86, 0.56, 0.55],
                          [0.74, 0.30, 0.30], [0.44, 0.22, 0.36], [0.13, 0.09, 0.09], [0.55, 0.47, 0.44]])
#: per class, probability of each anchor as the lesion's base colour (overlapping on purpose)
_DERM_PALETTE = np.array([
    [0.15, 0.30, 0.30, 0.05, 0.05, 0.05, 0.05, 0.05],  # MEL
    [0.35, 0.35, 0.15, 0.10, 0.00, 0.00, 0.00, 0.05],  # NV
    [0.15, 0.15, 0.05, 0.35, 0.10, 0.05, 0.00, 0.15],  # BCC (often pigmented)
    [0.25, 0.10, 0.00, 0.35, 0.20, 0.00, 0.00, 0.10],  # AK (pigmented AK exists)
    [0.30, 0.30, 0.20, 0.05, 0.00, 0.00, 0.05, 0.10],  # BKL
    [0.40, 0.30, 0.05, 0.20, 0.00, 0.00, 0.00, 0.05],  # DF
    [0.00, 0.05, 0.10, 0.20, 0.35, 0.25, 0.05, 0.00],  # VASC
    [0.25, 0.10, 0.00, 0.35, 0.20, 0.00, 0.00, 0.10],  # SCC
])
#: per-class strength of each structure (MEL, NV, BCC, AK, BKL, DF, VASC, SCC); 0 = absent but for rare leaks
_DERM_RECIPE = {
    'radius':       (0.60, 0.42, 0.48, 0.50, 0.50, 0.34, 0.40, 0.50),  # lesion radius, fraction of half-width
    'irregular':    (0.20, 0.03, 0.09, 0.10, 0.07, 0.04, 0.05, 0.12),  # low harmonics: asymmetry
    'notch':        (0.06, 0.00, 0.03, 0.03, 0.02, 0.01, 0.07, 0.04),  # high harmonics: notches / lobules
    'soft':         (0.10, 0.05, 0.05, 0.30, 0.03, 0.30, 0.03, 0.14),  # border blur (lesion radii)
    'soft_var':     (0.80, 0.20, 0.30, 0.30, 0.20, 0.20, 0.20, 0.50),  # variation of the blur around the border
    'variegation':  (0.85, 0.15, 0.40, 0.30, 0.45, 0.20, 0.30, 0.40),  # multi-colour patches
    'centre_dark':  (0.30, 0.35, 0.00, 0.00, 0.10, 0.00, 0.00, 0.00),
    'network':      (0.70, 0.60, 0.00, 0.00, 0.10, 0.55, 0.00, 0.00),  # pigment network
    'net_atypical': (0.90, 0.10, 0.00, 0.00, 0.30, 0.10, 0.00, 0.00),
    'dark_dots':    (0.70, 0.50, 0.00, 0.00, 0.45, 0.00, 0.00, 0.00),  # dots / globules / comedo-like openings
    'white_dots':   (0.00, 0.00, 0.00, 0.70, 0.70, 0.00, 0.00, 0.30),  # milia-like cysts, follicular openings
    'red_dots':     (0.15, 0.00, 0.15, 0.35, 0.00, 0.00, 0.00, 0.80),  # dotted / glomerular vessels
    'nests':        (0.25, 0.00, 0.90, 0.00, 0.00, 0.00, 0.00, 0.00),  # blue-grey ovoid nests
    'lacunae':      (0.00, 0.00, 0.00, 0.00, 0.00, 0.00, 1.00, 0.00),  # red-purple lacunae
    'blue_grey':    (0.65, 0.05, 0.30, 0.00, 0.10, 0.00, 0.20, 0.00),  # blue-white veil / grey areas
    'red_region':   (0.30, 0.00, 0.25, 0.60, 0.00, 0.10, 0.00, 0.50),  # erythema, strawberry background
    'white_centre': (0.35, 0.00, 0.10, 0.10, 0.00, 0.90, 0.00, 0.85),  # regression / scar / keratin mass
    'vessels':      (0.10, 0.00, 0.90, 0.20, 0.00, 0.00, 0.00, 0.25),  # arborizing / serpentine vessels
    'ridges':       (0.00, 0.00, 0.00, 0.00, 0.85, 0.00, 0.00, 0.00),  # cerebriform fissures
    'scale':        (0.00, 0.00, 0.10, 0.70, 0.25, 0.00, 0.00, 0.60),  # scaly, keratotic surface
}
#: lesion size: the class radii above times this scale, times a log-normal spread per lesion. Set (generator v3) so
#: that the lesion's share of the image matches HAM10000's segmentation masks (measured on every 10th mask: quartiles
#: 0.12 / 0.23 / 0.37, 90th percentile 0.52; generated, 2400 images: 0.14 / 0.22 / 0.36, 0.54). Version 2's lesions
#: were about 1.6x smaller in area (median 0.14), so background nuisances dominated pooled features: a random
#: ResNet-18's kNN balanced accuracy was 0.265 on whole images vs 0.461 on lesion crops (v3: 0.315 whole images).
_LESION_SCALE, _LESION_SPREAD = 1.25, 0.30
#: dark dermatoscope frame (share of images) and the strongest vignetting. Set (generator v4) so that the corners'
#: luminance relative to the centre matches HAM10000's (every 10th image: ratio < 0.6 in 7.2 % of images, quartile
#: 0.98, median 1.15; generated, 800 images: 6.2 %, 0.97, 1.09). Version 3 framed 35 % of the images and vignetted up
#: to 0.45 (ratio < 0.6 in 32 %, median 0.82): the frame was the most decodable factor of a random ResNet-18's
#: pooled features (ridge R^2 0.97) and the nuisance ODC's first clusters followed.
_FRAME_PROBABILITY, _VIGNETTE_MAX = 0.07, 0.10
_DERM_ALWAYS = {'radius', 'irregular', 'notch', 'soft', 'soft_var', 'variegation', 'centre_dark', 'net_atypical'}
_DERM_NOISES = ('variegation', 'blue_grey', 'red_region', 'vessels', 'ridges', 'warp_u', 'warp_v', 'scale',
                'white', 'cluster')
_DERM_DOTS = {  # layer: (cell size in lesion radii, radius range in cell units)
    'dark_dots': (0.16, (0.12, 0.30)), 'white_dots': (0.17, (0.12, 0.26)), 'red_dots': (0.11, (0.12, 0.25)),
    'nests': (0.30, (0.18, 0.36)), 'lacunae': (0.22, (0.30, 0.44)),
}


def _derm_parameters(rng: np.random.Generator, num_images: int, size: int) -> dict:
    """Every random choice of the derm generator, as per-image arrays (views of one lesion share the lesion's)."""
    group = _draw_groups(rng, num_images, _DERM_VIEWS_PER_GROUP)
    lesions = int(group[-1]) + 1
    cls = _draw_classes(rng, lesions, DERM_FREQUENCIES)
    lp: dict[str, np.ndarray] = {'label': cls}
    # structure strengths: present with probability 0.85 when the class has it, else a rare faint leak
    for name, per_class in _DERM_RECIPE.items():
        base = np.asarray(per_class)[cls]
        if name in _DERM_ALWAYS:
            lp[name] = base * rng.uniform(0.7, 1.3, lesions)
        else:
            present = rng.random(lesions) < 0.85
            leak = (rng.random(lesions) < 0.05) * rng.uniform(0.1, 0.35, lesions)
            lp[name] = np.where(base > 0, base * present * rng.uniform(0.7, 1.25, lesions), leak)
    lp['radius'] = np.asarray(_DERM_RECIPE['radius'])[cls] * _LESION_SCALE * np.exp(rng.normal(0, _LESION_SPREAD, lesions))
    # NV: either reticular (network) or globular (dots) pattern
    nv = cls == DERM_CLASSES.index('NV')
    globular = nv & (rng.random(lesions) < 0.45)
    lp['network'][globular] *= 0.15
    lp['dark_dots'][globular] = rng.uniform(0.7, 1.0, globular.sum())
    lp['dark_dots'][nv & ~globular] *= 0.4
    lp['dot_periphery'] = np.where(cls == 0, rng.uniform(0.5, 1.0, lesions), rng.uniform(0.0, 0.3, lesions))
    lp['dot_cluster'] = np.where(cls == 0, rng.uniform(0.4, 0.8, lesions), rng.uniform(0.0, 0.2, lesions))
    lp['net_hole'] = np.where(cls == DERM_CLASSES.index('DF'), 1.0, 0.0)  # DF: network only around the scar
    lp['aspect'] = rng.uniform(0.65, 1.0, lesions)
    lp['theta'] = rng.uniform(0, 2 * np.pi, lesions)
    lp['cx'] = rng.uniform(-0.25, 0.25, lesions)
    lp['cy'] = rng.uniform(-0.25, 0.25, lesions)
    lp['opacity'] = rng.uniform(0.75, 1.0, lesions)
    lp['white_r'] = rng.uniform(0.2, 0.5, lesions)
    lp['white_x'], lp['white_y'] = rng.normal(0, 0.12, (2, lesions))
    lp['net_freq'] = rng.uniform(3.0, 4.2, lesions)
    lp['net_width'] = rng.uniform(0.08, 0.16, lesions)
    lp['ridge_freq'] = rng.uniform(2.5, 4.0, lesions)
    # colours: base and variegation colour drawn from the class palette, jittered
    base_anchor = (rng.random(lesions)[:, None] > np.cumsum(_DERM_PALETTE[cls], 1)).sum(1).clip(0, 7)
    var_anchor = (rng.random(lesions)[:, None] > np.cumsum(_DERM_PALETTE[cls], 1)).sum(1).clip(0, 7)
    dark_var = rng.random(lesions) < np.where(cls == 0, 0.6, 0.25)  # melanoma: often black / dark brown areas
    var_anchor = np.where(dark_var, rng.choice([2, 6], lesions), var_anchor)
    lp['base'] = _DERM_ANCHORS[base_anchor] * np.exp(rng.normal(0, 0.08, (lesions, 3)))
    lp['var'] = _DERM_ANCHORS[var_anchor] * np.exp(rng.normal(0, 0.08, (lesions, 3)))
    lp['white_col'] = np.array([0.93, 0.91, 0.88]) - rng.uniform(0, 1, (lesions, 1)) * np.array([0.0, 0.04, 0.20])
    lp['dot_col'] = lp['base'] * rng.uniform(0.25, 0.5, (lesions, 1))
    lp['lacuna_a'] = np.array([0.78, 0.14, 0.20]) * np.exp(rng.normal(0, 0.1, (lesions, 3)))
    lp['lacuna_b'] = np.array([0.30, 0.12, 0.38]) * np.exp(rng.normal(0, 0.1, (lesions, 3)))
    lp['skin'] = rng.beta(1.3, 2.2, lesions)  # 0 light .. 1 dark
    # shape and border tables, noise lattices, dot cells (lesion-local, so views share them)
    lp['shape'] = 1.0 + _harmonic_table(rng, lesions, lp['irregular'], 1, 5) \
        + _harmonic_table(rng, lesions, lp['notch'], 7, 15)
    lp['softness'] = np.maximum(lp['soft'][:, None] * np.exp(_harmonic_table(rng, lesions, lp['soft_var'], 1, 4)),
                                0.02)
    lp['noise'] = rng.random((lesions, len(_DERM_NOISES), 2, _LATTICE, _LATTICE)).astype(F32)
    for name, (cell, radius) in _DERM_DOTS.items():
        lp[f'cells_{name}'] = _cells(rng, lesions, np.where(lp[name] > 0, 0.3 + 0.6 * np.minimum(lp[name], 1), 0),
                                     radius)
        lp[f'cell_{name}'] = cell * rng.uniform(0.85, 1.15, lesions)
    params = {k: np.asarray(v)[group] for k, v in lp.items()}
    params['group'] = group
    # per view: small changes of the same lesion, and independent nuisances
    n = num_images
    params['cx'] = params['cx'] + rng.normal(0, 0.06, n)
    params['cy'] = params['cy'] + rng.normal(0, 0.06, n)
    params['theta'] = params['theta'] + rng.normal(0, 0.3, n)
    params['radius'] = params['radius'] * np.exp(rng.normal(0, 0.06, n))
    params['skin'] = np.clip(params['skin'] + rng.normal(0, 0.04, n), 0, 1)
    params['flip'] = rng.random(n) < 0.5
    params['skin_noise'] = rng.random((n, 2, 2, _LATTICE, _LATTICE)).astype(F32)
    params['gain'] = np.exp(rng.normal(0, 0.05, (n, 3)))
    params['bright'] = np.exp(rng.normal(0, 0.15, n))
    params['hue'] = rng.normal(0, 0.08, n)
    params['tone_curve'] = np.clip(rng.normal(0, 0.25, n), -0.5, 0.5)
    params['vignette'] = rng.uniform(0.0, _VIGNETTE_MAX, n)
    params['frame'] = np.where(rng.random(n) < _FRAME_PROBABILITY, rng.uniform(1.0, 1.35, n), 9.0)
    hairs = np.where(rng.random(n) < 0.35, rng.integers(1, 7, n), 0)
    k = np.arange(6)
    params['hair_px'], params['hair_py'] = rng.uniform(-1, 1, (2, n, 6))
    params['hair_angle'] = rng.uniform(0, np.pi, (n, 6))
    params['hair_curv'] = rng.normal(0, 0.5, (n, 6))
    params['hair_len'] = rng.uniform(0.3, 1.2, (n, 6))
    params['hair_width'] = np.where(k[None] < hairs[:, None], rng.uniform(0.7, 1.6, (n, 6)) * 2.0 / size, 0.0)
    params['hair_col'] = np.where(rng.random((n, 1)) < 0.85, rng.uniform(0.03, 0.15, (n, 1)) * [1.0, 0.8, 0.7],
                                  rng.uniform(0.5, 0.8, (n, 1)) * [1.0, 0.85, 0.7])
    params['ruler'] = rng.random(n) < 0.25
    params['ruler_side'] = rng.choice(4, n, p=[0.55, 0.1, 0.1, 0.25])  # mostly bottom, then right
    params['ruler_tilt'] = rng.normal(0, 0.05, n)
    params['ruler_period'] = rng.uniform(0.07, 0.11, n)
    params['jpeg'] = np.where(rng.random(n) < 0.7, rng.uniform(0.01, 0.045, n), 0.0)  # 0: lossless
    params['noise_sd'] = rng.uniform(0.005, 0.025, n)
    params['pixel_noise_seed'] = rng.integers(0, 2**31, n)
    # the camera's own orientation cues (as in real dermoscopy): lit from above, field of view set a little low
    params['light'] = rng.uniform(0.04, 0.18, n)
    params['light_angle'] = rng.normal(0, 0.3, n)
    params['frame_dy'] = rng.uniform(0.0, 0.12, n)
    return params


def _render_derm(p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one chunk of derm images from its parameters: ``(B, S, S, 3)`` uint8 and the lesion masks."""
    B = len(p['label'])
    grids = _Grids(size)
    flip = _c(np.where(p['flip'], -1.0, 1.0))  # mirrored views
    radius, aspect = _c(p['radius']), _c(p['aspect'])
    ct, st = _c(np.cos(p['theta'])), _c(np.sin(p['theta']))

    def local(x, y):
        dx, dy = x * flip - _c(p['cx']), y - _c(p['cy'])
        return (ct * dx + st * dy) / radius, (ct * dy - st * dx) / (radius * aspect)

    u, v = local(grids.x, grids.y)  # lesion coordinates (lesion radii), full resolution
    uc, vc = local(grids.xc, grids.yc)  # the same at half resolution, for smooth fields
    pixel = 2.0 / size / radius  # one pixel in lesion radii
    phi = np.arctan2(vc, uc)
    shape_c = _angular(p['shape'].astype(F32), phi)
    d_c = np.sqrt(uc * uc + vc * vc) / shape_c  # coarse normalised radius
    d = np.sqrt(u * u + v * v) / grids.up(shape_c)  # < 1 inside the lesion
    softness = np.maximum(grids.up(_angular(p['softness'].astype(F32), phi)), pixel)
    alpha = _smoothstep(-1.0, 1.0, (1.0 - d) / softness) * _c(p['opacity'])
    mask = d < 1.0
    noise = p['noise']

    def coarse_field(name, frequency):
        return _fractal(noise[:, _DERM_NOISES.index(name)], uc, vc, frequency)

    def field(name, frequency):
        return grids.up(coarse_field(name, frequency))

    def strength(name, cap=1.0):
        return _c(np.minimum(p[name], cap))

    def used(name):
        return bool(np.any(p[name] > 0))

    # smooth colour layers at half resolution: base variegated with a second palette colour, darker centre,
    # red and blue-grey areas, scale, white scar / keratin centre
    h = grids.coarse_size
    colour = np.repeat(_rgb(p['base']), h, 2).repeat(h, 3)
    _mix(colour, _rgb(p['var']), _smoothstep(0.45, 0.65, coarse_field('variegation', 1.6)) * strength('variegation'))
    colour *= (1.0 - strength('centre_dark') * np.clip(1.0 - d_c, 0, 1) * 0.6)[:, None]
    if used('red_region'):
        _mix(colour, _rgb([0.80, 0.33, 0.34]),
             _smoothstep(0.48, 0.62, coarse_field('red_region', 1.8)) * strength('red_region') * 0.8)
    if used('blue_grey'):
        _mix(colour, _rgb([0.47, 0.52, 0.62]),
             _smoothstep(0.52, 0.64, coarse_field('blue_grey', 1.5)) * strength('blue_grey') * 0.85)
    if used('scale'):
        _mix(colour, _rgb([0.92, 0.90, 0.82]),
             _smoothstep(0.56, 0.78, coarse_field('scale', 5.0)) * strength('scale') * 0.8)
    if used('white_centre'):
        wu, wv = uc - _c(p['white_x']), vc - _c(p['white_y'])
        ragged = np.sqrt(wu * wu + wv * wv) + 0.3 * (coarse_field('white', 2.0) - 0.5)
        r0 = _c(p['white_r'])
        _mix(colour, _rgb(p['white_col']), _smoothstep(r0 + 0.15, r0, ragged) * strength('white_centre'))
    # dots and globules, milia-like cysts, dotted vessels, blue-grey nests, lacunae (soft-edged, half resolution)
    inside = _smoothstep(1.0, 0.85, d_c)
    for name in ('nests', 'lacunae', 'dark_dots', 'white_dots', 'red_dots'):
        if not used(name):
            continue
        cover, tone = _dots(p[f'cells_{name}'], uc, vc, _c(p[f'cell_{name}']), pixel * (size / h))
        cover *= inside * strength(name)
        tone = tone[:, None]
        if name == 'dark_dots':
            periphery, cluster = _c(p['dot_periphery']), _c(p['dot_cluster'])
            cover *= 1.0 - periphery + periphery * _smoothstep(0.35, 0.85, d_c)
            cover *= 1.0 - cluster + cluster * _smoothstep(0.45, 0.6, coarse_field('cluster', 1.3))
            target = _rgb(p['dot_col']) * (0.6 + 0.8 * tone)
        elif name == 'white_dots':
            target = _rgb([0.95, 0.93, 0.84]) * (0.9 + 0.1 * tone)
        elif name == 'red_dots':
            target = _rgb([0.70, 0.10, 0.15]) * (0.8 + 0.3 * tone)
        elif name == 'nests':
            target = _rgb([0.38, 0.42, 0.52]) * (0.7 + 0.4 * tone)
        else:  # lacunae: red to purple / dark blue, on pale septa
            target = _rgb(p['lacuna_a']) + (_rgb(p['lacuna_b']) - _rgb(p['lacuna_a'])) * tone
            _mix(colour, _rgb([0.85, 0.65, 0.66]), inside * 0.5 * strength(name))
        _mix(colour, target, cover)
    colour = grids.up(colour.reshape(B * 3, h, h)).reshape(B, 3, size, size)

    # fine structures at full resolution: pigment network, cerebriform fissures, vessels, dots
    if used('network'):
        # honeycomb-like mesh: three line families 60 degrees apart, warped by noise (strongly when atypical)
        warp = 1.0 + strength('net_atypical') * 2.0
        freq = _c(p['net_freq'])
        uu = u * freq + warp * (field('warp_u', 2.4) - 0.5)
        vv = v * freq + warp * (field('warp_v', 2.4) - 0.5)
        grid = np.abs(np.sin(F32(np.pi) * uu))
        np.minimum(grid, np.abs(np.sin(F32(np.pi) * (0.5 * uu + 0.866 * vv))), out=grid)
        np.minimum(grid, np.abs(np.sin(F32(np.pi) * (0.5 * uu - 0.866 * vv))), out=grid)
        mottle = field('cluster', 2.0)
        width = _c(p['net_width']) * (1.0 + strength('net_atypical') * (mottle - 0.5) * 2.0)
        lines = _smoothstep(width + 0.35, width, grid) * (0.5 + mottle)
        window = (1.0 - 0.7 * _smoothstep(0.55, 1.0, d)) * (1.0 - _c(p['net_hole']) * _smoothstep(0.6, 0.3, d))
        colour *= (1.0 - 0.38 * lines * window * strength('network'))[:, None]
    if used('ridges'):
        folds = np.abs(np.sin(F32(2 * np.pi) * field('ridges', 1.0) * _c(p['ridge_freq'])))
        colour *= (1.0 - 0.45 * _smoothstep(0.35, 0.0, folds) * strength('ridges'))[:, None]
    if used('vessels'):
        level = field('vessels', 2.2)
        line = _smoothstep(0.03, 0.0, np.minimum(np.abs(level - 0.45), np.abs(level - 0.6)))
        _mix(colour, _rgb([0.72, 0.12, 0.16]), line * strength('vessels') * _smoothstep(1.0, 0.7, d))
    # skin: tone from light to dark, fine grain, faint redness; the lesion on top
    tone = _c(p['skin'])[:, None]
    light, dark = _rgb([0.94, 0.80, 0.72]), _rgb([0.36, 0.24, 0.18])
    skin = light + (dark - light) * tone
    grain = _fractal(p['skin_noise'][:, 0], grids.xc, grids.yc, 8.0)
    blotch = _fractal(p['skin_noise'][:, 1], grids.xc, grids.yc, 1.5)
    skin = skin * (1.0 + 0.10 * (grain - 0.5))[:, None]
    _mix(skin, skin * _rgb([1.05, 0.82, 0.82]), _smoothstep(0.4, 0.8, blotch) * 0.6)
    skin = grids.up(skin.reshape(B * 3, h, h)).reshape(B, 3, size, size)
    image = _mix(skin, colour, alpha)
    x, y = grids.x, grids.y

    # hair, ruler, vignetting, dermatoscope frame
    if np.any(p['hair_width'] > 0):
        hair = _curves(p['hair_px'], p['hair_py'], p['hair_angle'], p['hair_curv'], p['hair_len'],
                       p['hair_width'], x, y, 2.0 / size)
        _mix(image, _rgb(p['hair_col']), hair * 0.9)
    ruled = np.flatnonzero(p['ruler'])
    if len(ruled):
        angle = p['ruler_side'][ruled] * (np.pi / 2) + p['ruler_tilt'][ruled]
        ca, sa = _c(np.cos(angle)), _c(np.sin(angle))
        along = ca * x + sa * y
        depth = 1.0 - (ca * y - sa * x)  # distance from one image border
        period = _c(p['ruler_period'][ruled])
        phase = along / period
        nearest = np.round(phase)
        tick = np.abs(phase - nearest) * period < 0.8 / size
        tick_len = np.where(np.abs(nearest) % 5 == 0, 0.16, 0.09)
        marks = (tick & (depth > 0.03) & (depth < 0.03 + tick_len)) | (np.abs(depth - 0.03) < 0.8 / size)
        part = image[ruled]
        _mix(part, part * 0.4 + 0.6, (depth < 0.22) * F32(0.35))
        _mix(part, _rgb([0.0, 0.0, 0.0]), marks * F32(0.85))
        image[ruled] = part
    r2 = x * x + np.square(y - _c(p['frame_dy']))
    lit = 1.0 - _c(p['light']) * (_c(np.cos(p['light_angle'])) * y + _c(np.sin(p['light_angle'])) * x)
    image *= (lit - _c(p['vignette']) * r2 * 0.5)[:, None]
    frame = _c(p['frame'])
    image *= (1.0 - _smoothstep(frame - 0.04, frame + 0.04, np.sqrt(r2)) * 0.95)[:, None]

    # acquisition: white balance, hue rotation about the grey axis, brightness, gamma, JPEG-like blocks, noise
    hue = np.asarray(p['hue'], F32)
    cos_h, sin_h = np.cos(hue)[:, None, None], np.sin(hue)[:, None, None]
    cross = np.array([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], F32) / F32(np.sqrt(3.0))
    rotation = cos_h * np.eye(3, dtype=F32) + sin_h * cross + (1.0 - cos_h) * F32(1.0 / 3.0)  # (B, 3, 3)
    matrix = (rotation * np.asarray(p['gain'], F32)[:, :, None] * np.asarray(p['bright'], F32)[:, None, None])
    image = (matrix.astype(F32) @ image.reshape(B, 3, -1)).reshape(B, 3, size, size)
    image = np.clip(image, 0.0, 1.0)
    image *= 1.0 + _c(p['tone_curve'])[:, None] * (1.0 - image)  # gamma-like tone curve
    lossy = np.flatnonzero(p['jpeg'] > 0)
    if len(lossy):
        image[lossy] = _jpeg_like(image[lossy], np.asarray(p['jpeg'], F32)[lossy])
    noise_rng = np.random.default_rng(p['pixel_noise_seed'][0])
    grain = noise_rng.random((B, size, size), dtype=F32) - 0.5  # sensor noise, mostly in luminance
    image += (grain * (_c(p['noise_sd']) * 3.46))[:, None]
    return _to_uint8(image).transpose(0, 2, 3, 1), mask


def generate_derm(num_images: int = DEFAULT_NUM_IMAGES, native_size: int = DEFAULT_NATIVE_SIZE, seed: int = 0) \
        -> dict[str, np.ndarray]:
    """Generate ``synthetic_derm`` in memory: ``images`` (N, S, S, 3) uint8, ``labels`` (N,), ``groups`` (N,),
    ``masks`` (N, S, S) bool."""
    rng = np.random.default_rng([*_DERM_STREAM, seed])
    params = _derm_parameters(rng, num_images, native_size)
    return _render_all(params, native_size, 3, _render_derm)


# ---------------------------------------------------------------------------------------------------------------
# synthetic_cxr
# ---------------------------------------------------------------------------------------------------------------
def _cxr_parameters(rng: np.random.Generator, num_images: int, size: int) -> dict:
    """Every random choice of the CXR generator, per image (studies of one patient share the anatomy)."""
    group = _draw_groups(rng, num_images, _CXR_VIEWS_PER_GROUP)
    patients = int(group[-1]) + 1
    cls = _draw_classes(rng, patients, CXR_FREQUENCIES)
    pp: dict[str, np.ndarray] = {'label': cls}
    pp['body_w'] = rng.uniform(0.86, 0.98, patients)
    pp['lung_w'] = rng.uniform(0.86, 1.0, patients)  # scales the half-width of the thorax (about 0.7)
    pp['apex'] = rng.uniform(-0.78, -0.66, patients)
    pp['base_r'] = rng.uniform(0.40, 0.56, patients)
    pp['base_l'] = pp['base_r'] + rng.uniform(0.0, 0.07, patients)  # left hemidiaphragm usually lower
    pp['dome'] = rng.uniform(0.12, 0.20, patients)  # dome height as a fraction of the lung height
    ctr = np.where(cls == 2, rng.uniform(0.58, 0.70, patients), rng.uniform(0.38, 0.49, patients))
    pp['ctr'] = ctr
    pp['heart_h'] = rng.uniform(0.24, 0.30, patients) * np.where(cls == 2, 1.12, 1.0)  # semi-height
    pp['heart_tilt'] = rng.uniform(0.35, 0.6, patients)
    pp['rib_spacing'] = rng.uniform(0.13, 0.16, patients)
    pp['rib_phase'] = rng.uniform(0, 1, patients)
    pp['rib_curve'] = rng.uniform(0.25, 0.45, patients)
    pp['bubble'] = rng.random(patients) < 0.55
    pp['air'] = rng.uniform(0.20, 0.27, patients)
    pp['noise'] = rng.random((patients, 3, 2, _LATTICE, _LATTICE)).astype(F32)
    # pathology
    side = rng.choice([-1.0, 1.0], patients)
    both = rng.random(patients) < 0.3
    pp['op_on'] = cls == 1
    pp['op_side'] = side
    pp['op_both'] = both
    pp['op_x'] = rng.uniform(-0.5, 0.6, patients)  # lateral coordinate inside the lung (-1 medial .. 1 lateral)
    pp['op_y'] = rng.uniform(0.3, 0.85, patients)  # height inside the lung (0 apex .. 1 base)
    pp['op_r'] = rng.uniform(0.17, 0.30, patients)
    pp['op_strength'] = rng.uniform(0.6, 0.95, patients)
    pp['ef_on'] = cls == 3
    pp['ef_side'] = side
    pp['ef_both'] = both
    pp['ef_level'] = rng.uniform(0.12, 0.35, patients)  # fluid height above the costophrenic angle (of the lung)
    params = {k: np.asarray(v)[group] for k, v in pp.items()}
    params['group'] = group
    n = num_images
    params['zoom'] = rng.uniform(0.9, 1.08, n)
    params['sx'], params['sy'] = rng.normal(0, 0.04, (2, n))
    params['rot'] = rng.normal(0, 0.04, n)
    params['contrast'] = rng.uniform(0.85, 1.25, n)
    params['offset'] = rng.uniform(-0.06, 0.08, n)
    params['tone_curve'] = np.clip(rng.normal(0, 0.3, n), -0.6, 0.6)
    params['noise_sd'] = rng.uniform(0.008, 0.025, n)
    params['marker'] = np.where(rng.random(n) < 0.4, rng.choice([-1.0, 1.0], n), 0.0)
    params['pixel_noise_seed'] = rng.integers(0, 2**31, n)
    return params


def _render_cxr(p: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one chunk of CXR images: ``(B, S, S, 1)`` uint8 and the lung-field masks."""
    grids = _Grids(size)
    x, y = grids.x, grids.y
    zoom, rot = _c(p['zoom']), _c(p['rot'])
    cr, sr = np.cos(rot), np.sin(rot)
    X = (cr * (x - _c(p['sx'])) + sr * (y - _c(p['sy']))) / zoom  # body coordinates, patient's right on the left
    Y = (cr * (y - _c(p['sy'])) - sr * (x - _c(p['sx']))) / zoom
    e = F32(2.0 / size) / zoom  # one pixel
    ax = np.abs(X)
    body_w, lung_w, apex = _c(p['body_w']), _c(p['lung_w']), _c(p['apex'])
    noise = p['noise']

    # body: soft tissue, thicker in the middle, shoulders at the top, arms at the sides
    across = np.square(ax / (body_w * (1.0 - 0.08 * _smoothstep(-0.2, 1.0, Y))))
    along = np.square((Y - 0.15) / 1.3)
    body = _smoothstep(1.05, 0.95, across * across + along * along * along)  # a superellipse
    arms = _smoothstep(body_w + 0.02, body_w + 0.06, ax) * _smoothstep(0.3, -0.1, Y)
    body = np.maximum(body, arms * 0.8)
    density = body * (0.36 + 0.14 * np.sqrt(np.clip(1.0 - (X / body_w) ** 2, 0, 1)))

    # heart: a tilted ellipse, one third right of the midline, sitting on the diaphragm
    half_thorax = 0.70 * lung_w
    heart_w = _c(p['ctr']) * half_thorax  # semi-width: ctr = heart width / thorax width
    heart_h = _c(p['heart_h'])
    base_r, base_l = _c(p['base_r']), _c(p['base_l'])
    dome_top = base_l - _c(p['dome']) * (base_l - apex)
    hy = dome_top + 0.06 - heart_h * 0.6
    hx = heart_w * 0.3
    tilt = _c(p['heart_tilt'])
    ct, st = np.cos(tilt), np.sin(tilt)
    hu, hv = X - hx, Y - hy
    hu, hv = ct * hu + st * hv, ct * hv - st * hu
    scale = (heart_w * 0.92 + heart_h * 0.25, heart_h)
    heart = _smoothstep(1.0 + 4 * e, 1.0 - 4 * e, (hu / scale[0]) ** 2 + (hv / scale[1]) ** 2)

    # lungs (image left = patient right, s = -1), their diaphragm domes and effusions
    lungs = np.zeros_like(density)
    fluid = np.zeros_like(density)
    below = np.zeros_like(density)  # under the diaphragm
    opacity = np.zeros_like(density)
    patch = None
    if p['op_on'].any():
        patch = grids.up(_fractal(noise[:, 1], grids.xc * 5.0, grids.yc * 5.0, 1.0))
    for s, base in ((-1.0, base_r), (1.0, base_l)):
        half = 0.31 * lung_w * (0.95 if s > 0 else 1.0)
        centre = s * (0.70 * lung_w - half)
        xl = s * (X - centre) / half  # -1 medial .. +1 lateral
        yn = (Y - apex) / (base - apex)  # 0 apex .. 1 costophrenic angle
        lateral_edge = -0.25 + 1.25 * np.sqrt(np.clip(yn / 0.55, 0, 1))
        medial_edge = -0.25 - 0.7 * np.sqrt(np.clip(yn / 0.3, 0, 1))
        dome = 1.0 - _c(p['dome']) * np.clip(1.0 - ((xl + 0.05) / 1.05) ** 2, 0, 1)
        ex, ey = e / half, e / (base - apex)
        lung = _smoothstep(-2 * ex, 2 * ex, lateral_edge - xl) * _smoothstep(-2 * ex, 2 * ex, xl - medial_edge) \
            * _smoothstep(-ey, ey, yn) * _smoothstep(-ey, ey, dome - yn)
        lungs = np.maximum(lungs, lung)
        below = np.maximum(below, _smoothstep(-ey, ey, yn - dome) * _smoothstep(1.3, 1.0, np.abs(xl)))
        on = _c(p['ef_on'] & ((p['ef_side'] == s) | p['ef_both']))
        meniscus = 1.0 - _c(p['ef_level']) - 0.25 * np.clip((xl + 1.0) / 2.0, 0, 1) ** 2
        fluid = np.maximum(fluid, on * lung * _smoothstep(meniscus - 2 * ey, meniscus + 2 * ey, yn))
        if patch is not None:
            on = _c(p['op_on'] & ((p['op_side'] == s) | p['op_both']))
            dist = np.sqrt((xl - _c(p['op_x'])) ** 2 * 0.25 + (yn - _c(p['op_y'])) ** 2) / _c(p['op_r'])
            region = _smoothstep(1.0, 0.4, dist) * (0.35 + 0.65 * patch) * _c(p['op_strength'])
            opacity = np.maximum(opacity, on * lung * region)
    lungs *= 1.0 - heart
    mask = lungs > 0.5

    # air in the lungs (less at the bases and over the hila), vascular markings fanning out from the hila
    air = _c(p['air']) * (1.0 - 0.25 * _smoothstep(-0.1, 0.5, Y))
    hilum = np.minimum((X + 0.16) ** 2 + (Y + 0.05) ** 2, (X - 0.17) ** 2 + (Y + 0.02) ** 2)
    markings = grids.up(_fractal(noise[:, 0], grids.xc * 3.5 + 4.0, grids.yc * 3.5 + 4.0, 1.0))
    vessels = _smoothstep(0.05, 0.0, np.abs(markings - 0.5)) * _smoothstep(0.5, 0.02, hilum)
    density -= lungs * air * (1.0 - np.maximum(fluid, opacity))
    density += lungs * (vessels * 0.06 + _smoothstep(0.03, 0.0, hilum) * 0.08)
    density += below * 0.04

    # mediastinum with the aortic knob, trachea, spine, heart
    medi = _smoothstep(0.12, 0.09, ax - 0.04 * (Y + 1.0)) * _smoothstep(hy, hy - 0.1, Y)
    knob = _smoothstep(0.08, 0.05, np.sqrt((X - 0.12) ** 2 + (Y + 0.3) ** 2))
    heart *= 1.0 - below * 0.7
    density += np.maximum(medi, knob) * 0.09 * body + heart * 0.10
    density -= _smoothstep(0.035, 0.02, np.abs(X + 0.01 * (Y + 0.5))) * _smoothstep(-0.2, -0.35, Y) * 0.1
    vertebrae = 0.5 + 0.5 * np.cos(F32(2 * np.pi) * Y / 0.13)
    density += _smoothstep(0.085, 0.065, ax) * body * (0.03 + 0.03 * vertebrae)

    # ribs: posterior (sloping down laterally), anterior (fainter, the other way); clavicles
    thorax = _smoothstep(half_thorax * 1.02, half_thorax * 0.9, ax) * _smoothstep(apex - 0.2, apex - 0.05, Y) \
        * _smoothstep(base_l + 0.05, base_l - 0.1, Y)
    spacing = _c(p['rib_spacing'])
    t = (Y - apex + 0.12 - _c(p['rib_curve']) * ax * ax - 0.15 * ax) / spacing + _c(p['rib_phase'])
    frac = t - np.floor(t)
    ribs = _smoothstep(0.0, 0.06, frac) * _smoothstep(0.36, 0.28, frac) * _smoothstep(0.06, 0.12, ax)
    ribs *= 1.0 + 0.6 * _smoothstep(0.2, 0.3, frac)  # brighter lower cortex
    t2 = (Y - apex + 0.4 * ax - 0.25) / (spacing * 1.15)
    frac2 = t2 - np.floor(t2)
    anterior = _smoothstep(0.0, 0.08, frac2) * _smoothstep(0.3, 0.22, frac2) * _smoothstep(0.2, 0.4, ax)
    density += thorax * (ribs * 0.045 + anterior * 0.02)
    clav_y = apex - 0.02 - 0.16 * (ax - 0.08) + 0.35 * (ax - 0.3) ** 2
    clavicle = _smoothstep(0.035, 0.018, np.abs(Y - clav_y)) * _smoothstep(0.06, 0.1, ax) \
        * _smoothstep(0.66, 0.58, ax)
    density += clavicle * 0.1 * body

    # gastric bubble under the left hemidiaphragm
    bubble = _smoothstep(1.0, 0.7, ((X - 0.35 * lung_w) / 0.10) ** 2 + ((Y - base_l + 0.02) / 0.055) ** 2)
    density -= bubble * _c(p['bubble']) * below * 0.12

    # acquisition: exposure, tone curve, blur, marker, quantum noise
    image = np.clip(density, 0, None) * (_c(p['contrast']) * 1.2) + _c(p['offset'])
    image = np.clip(image, 0.0, 1.0)
    image *= 1.0 + _c(p['tone_curve']) * (1.0 - image)  # gamma-like tone curve
    image = _blur3(image)
    marker = _c(p['marker'])
    mark = (np.abs(x - marker * 0.82) < 0.05) & (np.abs(y + 0.85) < 0.06) & (marker != 0)
    image = np.where(mark, F32(0.95), image)
    noise_rng = np.random.default_rng(p['pixel_noise_seed'][0])
    grain = (noise_rng.random(image.shape, dtype=F32) - 0.5) * 3.46
    image += grain * _c(p['noise_sd'])
    return _to_uint8(image)[..., None], mask


def generate_cxr(num_images: int = DEFAULT_NUM_IMAGES, native_size: int = DEFAULT_NATIVE_SIZE, seed: int = 0) \
        -> dict[str, np.ndarray]:
    """Generate ``synthetic_cxr`` in memory: ``images`` (N, S, S, 1) uint8, ``labels``, ``groups``, ``masks``."""
    rng = np.random.default_rng([*_CXR_STREAM, seed])
    params = _cxr_parameters(rng, num_images, native_size)
    return _render_all(params, native_size, 1, _render_cxr)


# ---------------------------------------------------------------------------------------------------------------
# shared driver, cache and registration
# ---------------------------------------------------------------------------------------------------------------
def _render_all(params: dict, size: int, channels: int, render) -> dict[str, np.ndarray]:
    """Render every image in chunks of one class (so structures absent from a class cost nothing)."""
    labels = np.asarray(params['label'], dtype=np.int64)
    count = len(labels)
    images = np.empty((count, size, size, channels), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        for start in range(0, len(members), _CHUNK):
            idx = members[start:start + _CHUNK]
            chunk = {k: np.asarray(v)[idx] for k, v in params.items()}
            images[idx], masks[idx] = render(chunk, size)
    return {'images': images, 'labels': labels, 'groups': np.asarray(params['group'], dtype=np.int64),
            'masks': masks}


_GENERATORS = {'synthetic_derm': (generate_derm, DERM_CLASSES, 'lesion'),
               'synthetic_cxr': (generate_cxr, CXR_CLASSES, 'lung field')}


def _options(name: str, options: dict) -> tuple[int, int, int]:
    known = {'num_images', 'native_size', 'seed', 'generator_seed'}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DatasetError(f'{name}: unknown option(s) {", ".join(unknown)} (known: {", ".join(sorted(known))})')
    if 'seed' in options and 'generator_seed' in options and options['seed'] != options['generator_seed']:
        raise DatasetError(f'{name}: options seed and generator_seed disagree')
    try:
        num_images = int(options.get('num_images', DEFAULT_NUM_IMAGES))
        size = int(options.get('native_size', DEFAULT_NATIVE_SIZE))
        seed = int(options.get('generator_seed', options.get('seed', 0)))
    except (TypeError, ValueError) as exc:
        raise DatasetError(f'{name}: options must be integers ({exc})') from None
    if num_images < 1 or size < 16 or seed < 0:
        raise DatasetError(f'{name}: need num_images >= 1, native_size >= 16 and seed >= 0, '
                           f'got {num_images}, {size}, {seed}')
    return num_images, size, seed


def _read_cache(path: str, num_images: int, size: int, channels: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is missing, unreadable or of another shape (then regenerated)."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ('images', 'labels', 'groups', 'masks')}
        shapes_ok = (arrays['images'].shape == (num_images, size, size, channels)
                     and arrays['images'].dtype == np.uint8 and arrays['labels'].shape == (num_images,)
                     and arrays['groups'].shape == (num_images,)
                     and arrays['masks'].shape == (num_images, size, (size + 7) // 8))
        if not shapes_ok:
            return None
        arrays['masks'] = np.unpackbits(arrays['masks'], axis=-1, count=size).astype(bool)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return arrays


def _write_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` without pickling (any numpy version), atomically (temporary file, then
    ``os.replace``)."""
    tmp = f'{path}.{os.getpid()}.tmp'
    stored = dict(arrays, masks=np.packbits(arrays['masks'], axis=-1))
    with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as archive:
        for key in ('images', 'labels', 'groups', 'masks'):
            with archive.open(f'{key}.npy', 'w', force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(stored[key]), allow_pickle=False)
    os.replace(tmp, path)


def _write_masks(folder: str, masks: np.ndarray) -> list[str]:
    """One 0/255 PNG per mask under ``folder`` (written to a temporary folder, then renamed); returns the paths."""
    names = [f'{i:05d}.png' for i in range(len(masks))]
    done = os.path.join(folder, 'complete')
    if not os.path.exists(done):
        tmp = f'{folder}.{os.getpid()}.tmp'
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        pixels = masks.astype(np.uint8) * 255
        for name, mask in zip(names, pixels):
            Image.fromarray(mask).save(os.path.join(tmp, name), compress_level=1)
        open(os.path.join(tmp, 'complete'), 'w').close()
        if not os.path.exists(done):  # else another process finished first
            shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt
            try:
                os.replace(tmp, folder)
            except OSError:  # another process renamed its copy in between
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(folder, name) for name in names]


def generated_arrays(name: str, root: str | None = None, **options) -> tuple[dict[str, np.ndarray], str, str]:
    """The arrays of a synthetic dataset (generated on first use, then read from the cache), the cache file stem
    and the source fingerprint."""
    generate, classes, _ = _GENERATORS[name]
    num_images, size, seed = _options(name, options)
    channels = 3 if name == 'synthetic_derm' else 1
    folder = os.fspath(root) if root else os.path.join(default_cache_dir(), 'synthetic')
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f'{name}-v{GENERATOR_VERSION}-n{num_images}-s{size}-seed{seed}')
    arrays = _read_cache(stem + '.npz', num_images, size, channels)
    if arrays is None:
        arrays = generate(num_images, size, seed)
        _write_cache(stem + '.npz', arrays)
    fingerprint = f'{name}:generator-v{GENERATOR_VERSION}:num_images={num_images}:native_size={size}:seed={seed}'
    return arrays, stem, fingerprint


def _load(name: str, root: str | None, options: dict) -> ImageRecords:
    arrays, stem, fingerprint = generated_arrays(name, root, **options)
    _, classes, roi = _GENERATORS[name]
    masks = _write_masks(stem + '_masks', arrays['masks'])
    names = [f'{name}/{i:05d}' for i in range(len(arrays['labels']))]
    prefix = 'lesion' if name == 'synthetic_derm' else 'patient'
    groups = np.char.add(prefix, arrays['groups'].astype(str))
    return ImageRecords(
        name=name, root=os.path.dirname(stem), class_names=list(classes), labels=arrays['labels'],
        source=ArrayImageSource(arrays['images'], fingerprint=fingerprint, names=names), groups=groups,
        masks=masks, notes=[f'{name}: generated images ({fingerprint}); ROI masks = {roi}; '
                            'built-in smoke-test data, not a clinical benchmark'])


@register_dataset('synthetic_derm')
def load_synthetic_derm(root: str | None = None, **options) -> ImageRecords:
    """Dermoscopy-like images in ISIC 2019's eight classes (see the module docstring)."""
    return _load('synthetic_derm', root, options)


@register_dataset('synthetic_cxr')
def load_synthetic_cxr(root: str | None = None, **options) -> ImageRecords:
    """Chest-X-ray-like grayscale images: normal, opacity, cardiomegaly, effusion (see the module docstring)."""
    return _load('synthetic_cxr', root, options)
