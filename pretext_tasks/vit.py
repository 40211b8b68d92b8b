"""A vision transformer's patch tokens, with masked patches replaced by a mask token, and iBOT's patch masks.

:func:`vit_tokens` runs an mmpretrain ``VisionTransformer`` through its own ``forward`` (so that the engine's
precision wrapper, positional-embedding resizing, pre-norm and final norm apply as in any other call) and returns
the image embedding (the class token, or the mean patch token for a ViT without one) and the patch tokens
``(B, N, D)`` after the final norm. With a mask, the patch embeddings of the masked positions are replaced by a
mask token before the positional embedding is added and before the first transformer block, as in iBOT (Zhou et
al. 2022, section 3.2: the student sees the masked image, and the mask token is a learnable embedding). Both are
done for the duration of the call: the backbone's ``out_type`` is set to ``'raw'`` and a forward hook on its patch
embedding swaps the masked tokens; neither change outlives the call, and the backbone's weights and state-dict keys
are untouched (the mask token belongs to the task, not to the backbone that is passed on).

Why written here: mmpretrain 1.2 has the ViT but no iBOT (its BEiT/iBOT-style masking lives in its own backbone
subclasses, whose state dicts differ from ``VisionTransformer``'s), lightly's masking helpers draw from Python's
global ``random`` (a resumed stage must replay its masks from the task's seeded generator), and lightly's
``MaskedVisionTransformer`` wraps timm/torchvision ViTs, not mmpretrain's.

:func:`block_masks` draws BEiT's block-wise masks (Bao et al. 2022, Algorithm 1; used by iBOT) for a whole batch
at once from an explicit ``torch.Generator``, see its docstring for the adaptation to small patch grids.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from benchmarks.backbones import vision_transformer_of

from .errors import PretextConfigError

#: BEiT's smallest block, 16 patches, on its 14 x 14 grid: the block size is scaled to the grid's patch count
BEIT_MIN_BLOCK, BEIT_GRID_PATCHES = 16, 196
MASK_SHAPES = ('block', 'random')


def require_vision_transformer(backbone: nn.Module, task: str):
    """The backbone as an mmpretrain VisionTransformer, or a one-line PretextConfigError naming the task."""
    vit = vision_transformer_of(backbone)
    if vit is None:
        raise PretextConfigError(f'{task}: needs the patch tokens of a vision transformer '
                                 f'(backbone.type=VisionTransformer), got {type(backbone).__name__}')
    return vit


def vit_tokens(backbone: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
               mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """``(image embedding (B, D), patch tokens (B, N, D), (grid height, grid width))`` of images ``x`` through the
    VisionTransformer ``backbone``; where ``mask`` (bool ``(B, h, w)`` or ``(B, N)``) is True the patch embedding
    is replaced by ``mask_token`` (``(D,)``, broadcast) before the positional embedding and the blocks."""
    vit = require_vision_transformer(backbone, 'vit_tokens')
    seen: dict = {}

    def swap_masked(module, inputs, output):
        tokens, grid = output
        seen['grid'] = tuple(int(v) for v in grid)
        if mask is None:
            return None
        flat = mask.reshape(mask.shape[0], -1)
        if flat.shape != tokens.shape[:2]:
            raise PretextConfigError(f'mask of shape {tuple(mask.shape)} does not fit the {tuple(seen["grid"])} '
                                     f'patch grid of a batch of {tokens.shape[0]}')
        token = mask_token.reshape(1, 1, -1).to(tokens.dtype)
        return torch.where(flat.unsqueeze(-1), token, tokens), grid

    handle = vit.patch_embed.register_forward_hook(swap_masked)
    out_type, vit.out_type = vit.out_type, 'raw'
    try:
        out = backbone(x)
    finally:
        vit.out_type = out_type
        handle.remove()
    raw = out[-1] if isinstance(out, (tuple, list)) else out
    patches = raw[:, vit.num_extra_tokens:]
    image = raw[:, 0] if vit.cls_token is not None else patches.mean(dim=1)
    return image, patches, seen['grid']


def default_min_block(patches: int) -> int:
    """BEiT's minimal block of 16 of its 196 patches, scaled to a grid of ``patches`` patches (at least 1): 5 on an
    8 x 8 grid, 1 on a 4 x 4 one."""
    return max(1, int(round(BEIT_MIN_BLOCK * patches / BEIT_GRID_PATCHES)))


def block_masks(batch: int, height: int, width: int, generator: torch.Generator, ratio=(0.1, 0.5),
                probability: float = 0.5, min_block: int | None = None, aspect=(0.3, 1 / 0.3),
                shape: str = 'block') -> torch.Tensor:
    """Bool ``(batch, height, width)`` patch masks, True = masked, drawn from ``generator`` on its device.

    Each image is masked with ``probability`` (iBOT masks half of the images: its prediction ratio is drawn from
    {0, 0.3 ± 0.2}); a masked image gets ``round(r · height · width)`` masked patches with r uniform in ``ratio``.
    ``shape='block'`` places rectangles as BEiT does (area uniform between ``min_block`` and the patches still to
    mask, log-uniform aspect ratio in ``aspect``, strictly smaller than the grid, kept when it adds patches without
    exceeding the target; up to 10 draws per block), for all images in parallel. Adapted to small grids:
    ``min_block`` defaults to BEiT's 16 of 196 patches scaled to the grid (:func:`default_min_block`), and a block
    never needs more patches than remain, so a small target can still be reached; an image whose draws all fail
    keeps fewer masked patches than its target (as in BEiT). ``shape='random'`` masks uniformly drawn patches."""
    if shape not in MASK_SHAPES:
        raise PretextConfigError(f'mask shape must be one of {MASK_SHAPES}, got {shape!r}')
    device = generator.device
    patches = height * width
    masked_image = torch.rand(batch, generator=generator, device=device) < probability
    ratios = torch.rand(batch, generator=generator, device=device) * (ratio[1] - ratio[0]) + ratio[0]
    target = torch.where(masked_image, (ratios * patches).round().long(), torch.zeros_like(masked_image, dtype=torch.long))
    if shape == 'random':
        noise = torch.rand(batch, patches, generator=generator, device=device)
        rank = noise.argsort(dim=1).argsort(dim=1)
        return (rank < target.unsqueeze(1)).view(batch, height, width)
    smallest = int(min_block) if min_block else default_min_block(patches)
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=device)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    log_low, log_high = math.log(aspect[0]), math.log(aspect[1])
    largest_target = int(target.max()) if batch else 0
    rounds = 10 * max(1, math.ceil(largest_target / smallest))
    for _ in range(rounds):
        count = mask.flatten(1).sum(1)
        remaining = target - count
        if not bool((remaining > 0).any()):
            break
        low = remaining.clamp(min=1).clamp(max=smallest).float()
        high = torch.maximum(low, remaining.float())
        area = torch.rand(batch, generator=generator, device=device) * (high - low) + low
        aspect_ratio = torch.exp(torch.rand(batch, generator=generator, device=device) * (log_high - log_low)
                                 + log_low)
        block_h = torch.sqrt(area * aspect_ratio).round().long().clamp(min=1)
        block_w = torch.sqrt(area / aspect_ratio).round().long().clamp(min=1)
        fits = (block_h < height) & (block_w < width) if height > 1 and width > 1 else \
            (block_h <= height) & (block_w <= width)
        top = (torch.rand(batch, generator=generator, device=device)
               * (height - block_h + 1).clamp(min=1)).floor().long()
        left = (torch.rand(batch, generator=generator, device=device)
                * (width - block_w + 1).clamp(min=1)).floor().long()
        block = ((rows >= top.view(-1, 1, 1)) & (rows < (top + block_h).view(-1, 1, 1))
                 & (cols >= left.view(-1, 1, 1)) & (cols < (left + block_w).view(-1, 1, 1)))
        grown = mask | block
        added = grown.flatten(1).sum(1) - count
        keep = fits & (remaining > 0) & (added > 0) & (added <= remaining)
        mask = torch.where(keep.view(-1, 1, 1), grown, mask)
    return mask
