"""Where does a fine-tuned model look? Grad-CAM heat maps (attention rollout for a vision transformer) and an
"attention inside the ROI" score.

Grad-CAM (Selvaraju et al., 2017) is written here rather than taken from a package: pytorch-grad-cam is not a
dependency of this project, and the method needs only a forward hook on the backbone's last feature map and one
gradient. For a target class *k* (the predicted class, or the true label) the channel weights are the spatial mean
of d logit_k / d A, the map is ReLU(sum_c w_c A_c), upsampled bilinearly to the input size. It works with any
backbone whose forward returns a tuple of ``(N, C, h, w)`` maps (mmpretrain style) followed by global average pooling
and a linear head, as in :class:`benchmarks.protocols.finetune.FineTunedModel`.

A vision transformer's last output is a class token, not a map: for it the map is attention rollout (Abnar &
Zuidema 2020, :class:`AttentionRollout`), chosen by :func:`attention_maps` from the backbone's type; the report
names the method used.

The ROI-attention score of an image is the share of its positive CAM mass inside the ROI mask
(``sum(cam[mask]) / sum(cam)``, in [0, 1]). An image whose CAM is all zero (no positive evidence) or whose mask is
empty is skipped and listed with its reason; an image without a mask is listed under ``missing_masks``. The mean over
images comes with a 95 % Student-t confidence interval over images (clipped to [0, 1]; n < 2 gives no interval).

Masks come from a :class:`~benchmarks.datasets.prepared.PreparedDataset` (``masks()``, resized exactly as the
images, nearest neighbour) or from a folder matched to the images by file-name stem (``--masks DIR``; the suffixes
``_mask``, ``_segmentation``, ``_seg`` and ``_roi`` are ignored when matching), resized the same way.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .datasets.base import FileImageSource
from .datasets.cache import resize_uint8
from .datasets.errors import DatasetError
from .datasets.layout_helpers import IMAGE_EXTENSIONS
from .metrics import mean_t_interval
from .protocols.features import borrowed, to_model_input

MASK_SUFFIXES = ('_mask', '_segmentation', '_seg', '_roi')
METHOD_NAMES = {'grad_cam': 'Grad-CAM', 'attention_rollout': 'attention rollout'}
CI_METHOD = 'Student-t over images, 95 %, clipped to [0, 1]'


class AttentionError(DatasetError):
    """Inputs the attention analysis cannot use (no masks, unreadable mask folder, bad options)."""


# -- Grad-CAM ---------------------------------------------------------------------------------------------------
class GradCAM:
    """Grad-CAM on ``backbone`` (forward → tuple of feature maps) + ``head`` (linear on the pooled last map).

    ``layer`` is the module whose output (its last element when a tuple) is explained; by default the backbone
    itself, i.e. its last feature map. Call with model input ``x`` (``(N, 3, H, W)`` floats) and optionally the
    target class per image; returns ``(cams (N, H, W) float32 CPU, logits (N, K) float32 CPU, targets (N,))``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, layer: nn.Module | None = None):
        self.backbone = backbone
        self.head = head
        self.layer = layer if layer is not None else backbone
        self._activation: torch.Tensor | None = None

    def _hook(self, module, inputs, output) -> None:
        self._activation = output[-1] if isinstance(output, (tuple, list)) else output

    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        handle = self.layer.register_forward_hook(self._hook)
        try:
            with torch.enable_grad():
                # the input requires grad so that a graph exists even when the weights are frozen
                x = x.detach().requires_grad_(True)
                features = self.backbone(x)
                last = features[-1] if isinstance(features, (tuple, list)) else features
                if last.ndim != 4:
                    raise AttentionError(f'Grad-CAM needs (N, C, H, W) feature maps, the backbone returns '
                                         f'{tuple(last.shape)}')
                logits = self.head(last.mean(dim=(2, 3)))
                activation = self._activation
                if activation is None or activation.ndim != 4:
                    raise AttentionError('Grad-CAM: the hooked layer produced no (N, C, H, W) feature map')
                if targets is None:
                    targets = logits.argmax(dim=1)
                targets = targets.to(device=logits.device, dtype=torch.long)
                chosen = logits.gather(1, targets[:, None]).sum()  # images are independent (eval mode)
                grads, = torch.autograd.grad(chosen, activation)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach().float()
            cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode='bilinear', align_corners=False)[:, 0]
            return cam.clamp_min(0).cpu(), logits.detach().float().cpu(), targets.cpu()
        finally:
            handle.remove()
            self._activation = None


def grad_cam(backbone: nn.Module, head: nn.Module, images_uint8: np.ndarray, targets=None,
             device: torch.device | str = 'cpu', batch_size: int = 32):
    """Grad-CAM of ``(N, H, W, C)`` uint8 images (preprocessed with :func:`to_model_input`), in eval mode.

    Returns ``(cams (N, H, W) float32, logits (N, K) float32, targets (N,) int64)`` as numpy arrays; ``targets``
    (one class per image) defaults to the predicted class. The modules are left on their device and mode."""
    return _explain(GradCAM(backbone, head), backbone, head, images_uint8, targets, device, batch_size)


# -- attention rollout (vision transformers) ------------------------------------------------------------------
def _attention_probabilities(attention: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(B, heads, N, N)`` softmax attention of an mmpretrain ``MultiheadAttention`` on its input ``x`` (recomputed
    from its query/key projection: the module itself calls a fused kernel that returns no weights). Its scale is
    always ``head_dims ** -0.5`` (mmpretrain 1.2 uses that value whether or not ``qk_scale`` is set)."""
    batch, tokens, _ = x.shape
    qkv = attention.qkv(x.float()).reshape(batch, tokens, 3, attention.num_heads, attention.head_dims)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    return torch.softmax(q @ k.transpose(-2, -1) * attention.head_dims ** -0.5, dim=-1)


class AttentionRollout:
    """Attention rollout (Abnar & Zuidema, ACL 2020) of an mmpretrain ``VisionTransformer``: per block, the
    head-averaged attention plus the identity (the residual path), rows renormalised, multiplied through the blocks;
    the map is the class token's row over the patch tokens (the mean row for a ViT without class token), as a patch
    grid upsampled bilinearly to the input. It explains what the image embedding attends to, whatever class the head
    then predicts (it is class-agnostic; the logits are still returned). Written here for the same reason as Grad-CAM
    (no package dependency): it needs only a forward hook per block and a product of matrices."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        from .backbones import vision_transformer_of

        self.vit = vision_transformer_of(backbone)
        if self.vit is None:
            raise AttentionError(f'attention rollout needs a VisionTransformer backbone, got {type(backbone).__name__}')
        self.backbone = backbone
        self.head = head

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        from .backbones import pool_output

        captured: list[torch.Tensor] = []
        grid: dict = {}

        def keep_attention(module, inputs, output) -> None:   # (a hook that returned a value would replace output)
            captured.append(_attention_probabilities(module, inputs[0]))

        def keep_grid(module, inputs, output) -> None:
            grid['hw'] = tuple(int(v) for v in output[1])

        handles = [layer.attn.register_forward_hook(keep_attention) for layer in self.vit.layers]
        handles.append(self.vit.patch_embed.register_forward_hook(keep_grid))
        try:
            logits = self.head(pool_output(self.backbone(x)).float())
        finally:
            for handle in handles:
                handle.remove()
        if targets is None:
            targets = logits.argmax(dim=1)
        tokens = captured[0].shape[-1]
        rollout = torch.eye(tokens, device=x.device).expand(x.shape[0], tokens, tokens)
        for probabilities in captured:
            step = 0.5 * probabilities.mean(dim=1) + 0.5 * torch.eye(tokens, device=x.device)
            rollout = (step / step.sum(dim=-1, keepdim=True)) @ rollout
        extra = int(self.vit.num_extra_tokens)
        rows = rollout[:, 0] if extra else rollout.mean(dim=1)
        height, width = grid['hw']
        cam = rows[:, extra:].reshape(-1, 1, height, width)
        cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode='bilinear', align_corners=False)[:, 0]
        return cam.clamp_min(0).float().cpu(), logits.float().cpu(), targets.cpu()


def attention_method(backbone: nn.Module) -> str:
    """``'attention_rollout'`` for a vision transformer, ``'grad_cam'`` for a convolutional backbone."""
    from .backbones import vision_transformer_of

    return 'attention_rollout' if vision_transformer_of(backbone) is not None else 'grad_cam'


def attention_maps(backbone: nn.Module, head: nn.Module, images_uint8: np.ndarray, targets=None,
                   device: torch.device | str = 'cpu', batch_size: int = 32):
    """:func:`grad_cam` for a convolutional backbone, attention rollout (:class:`AttentionRollout`) for a vision
    transformer; the same ``(maps, logits, targets)`` either way."""
    if attention_method(backbone) == 'grad_cam':
        return grad_cam(backbone, head, images_uint8, targets, device, batch_size)
    return _explain(AttentionRollout(backbone, head), backbone, head, images_uint8, targets, device, batch_size)


def _explain(operator, backbone: nn.Module, head: nn.Module, images_uint8: np.ndarray, targets, device,
             batch_size: int):
    """Run a map ``operator(x, targets) -> (maps, logits, targets)`` over batches of uint8 images in eval mode."""
    device = torch.device(device)
    pair = nn.ModuleDict({'backbone': backbone, 'head': head})
    cams, logits, chosen = [], [], []
    with borrowed(pair, device):
        for start in range(0, len(images_uint8), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images_uint8[start:start + batch_size])).to(device)
            wanted = None if targets is None else torch.as_tensor(np.asarray(targets[start:start + batch_size]))
            cam, logit, target = operator(to_model_input(batch), wanted)
            cams.append(cam.numpy())
            logits.append(logit.numpy())
            chosen.append(target.numpy())
    if not cams:
        raise AttentionError('attention maps: no images')
    return np.concatenate(cams), np.concatenate(logits), np.concatenate(chosen)


# -- scores -----------------------------------------------------------------------------------------------------
def roi_score(cam: np.ndarray, mask: np.ndarray) -> tuple[float | None, str | None]:
    """``(share of positive CAM mass inside mask, None)`` or ``(None, reason)`` when it is undefined."""
    if cam.shape != mask.shape:
        raise AttentionError(f'CAM {cam.shape} and mask {mask.shape} differ in size')
    if not mask.any():
        return None, 'empty mask'
    positive = np.clip(cam.astype(np.float64), 0.0, None)
    if not np.isfinite(positive).all():
        return None, 'non-finite CAM'
    total = float(positive.sum())
    if total <= 0.0:
        return None, 'all-zero CAM (no positive evidence for the target class)'
    return float(positive[mask].sum() / total), None


def mean_ci(scores, confidence: float = 0.95) -> tuple[float | None, list[float | None]]:
    """Mean and Student-t confidence interval over images, clipped to [0, 1]; None where undefined."""
    mean, low, high = mean_t_interval(scores, confidence)
    if math.isnan(mean):
        return None, [None, None]
    if math.isnan(low):
        return mean, [None, None]
    return mean, [max(0.0, low), min(1.0, high)]


# -- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class AttentionInputs:
    """Images to explain at the model's input size, with their masks (None = no mask) and names."""

    images: np.ndarray                       # (N, S, S, C) uint8
    masks: list[np.ndarray | None]           # bool (S, S) or None per image
    names: list[str]
    indices: list[int]                       # index in the dataset (or in the sorted folder listing)
    dataset: str
    split: str
    labels: np.ndarray | None = None         # (N,) class index when known
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def mask_key(stem: str) -> str:
    """The image stem a mask file belongs to (``x_mask`` / ``x_segmentation`` / ... → ``x``)."""
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def index_masks(masks_dir: str) -> dict[str, str]:
    """Map image stem → mask file for every image file in ``masks_dir``."""
    if not os.path.isdir(masks_dir):
        raise AttentionError(f'mask folder not found: {masks_dir}')
    found: dict[str, str] = {}
    for name in sorted(os.listdir(masks_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(masks_dir, name)):
            found.setdefault(mask_key(stem), os.path.join(masks_dir, name))
    if not found:
        raise AttentionError(f'no masks found in {masks_dir} (expected image files named like <image>_mask.png)')
    return found


def read_mask(path: str, size: int) -> np.ndarray:
    """A mask file as bool ``(size, size)``: nonzero of a 0/1 mask or > 127 of a 0/255 one, resized (nearest)
    exactly as images are (:func:`benchmarks.datasets.cache.resize_uint8`)."""
    raw = FileImageSource([path], channels=1).decode(0)
    binary = (raw > 127) if raw.max() > 1 else (raw > 0)
    return resize_uint8(binary.astype(np.uint8) * 255, size, nearest=True)[..., 0] > 127


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def inputs_from_dataset(dataset, split: str = 'test', max_images: int = 64,
                        masks_dir: str | None = None) -> AttentionInputs:
    """The first ``max_images`` images of ``split`` ('all' = every image) of a PreparedDataset, with the dataset's
    own masks or, when ``masks_dir`` is given, masks from that folder matched by image-name stem."""
    if split == 'all':
        indices = np.arange(len(dataset))
    else:
        indices = dataset.indices(split)
    indices = indices[:max_images]
    source = dataset.records.source
    names = [os.path.basename(str(source.describe(int(i)))) for i in indices]
    if masks_dir is None:
        masks = dataset.masks(indices)
    else:
        index = index_masks(masks_dir)
        masks = [read_mask(index[_stem(n)], dataset.image_size) if _stem(n) in index else None for n in names]
    labels = None if dataset.multilabel else np.asarray(dataset.labels)[indices]
    return AttentionInputs(np.asarray(dataset.images[indices]), masks, names, [int(i) for i in indices],
                           dataset.name, split, labels)


def list_images(folder: str, exclude: set[str] = frozenset()) -> list[str]:
    """Image files directly in ``folder`` (sorted); falls back to ``folder/images`` when there are none."""
    if not os.path.isdir(folder):
        raise AttentionError(f'image folder not found: {folder}')

    def scan(directory):
        return [os.path.join(directory, n) for n in sorted(os.listdir(directory))
                if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(directory, n))
                and os.path.abspath(os.path.join(directory, n)) not in exclude]

    paths = scan(folder)
    if not paths and os.path.isdir(os.path.join(folder, 'images')):
        paths = scan(os.path.join(folder, 'images'))
    if not paths:
        raise AttentionError(f'no image files in {folder} (nor in {os.path.join(folder, "images")})')
    return paths


def inputs_from_folder(images_dir: str, masks_dir: str, image_size: int, max_images: int = 64) -> AttentionInputs:
    """Images of a plain folder (or its ``images/`` subfolder) resized to ``image_size`` (bilinear, as the dataset
    cache does) and the masks in ``masks_dir`` matched by stem, resized the same way (nearest)."""
    index = index_masks(masks_dir)
    paths = list_images(images_dir, exclude={os.path.abspath(p) for p in index.values()})[:max_images]
    source = FileImageSource(paths, channels=3)
    images = np.stack([resize_uint8(source.decode(i), image_size) for i in range(len(paths))])
    names = [os.path.basename(p) for p in paths]
    masks = [read_mask(index[_stem(n)], image_size) if _stem(n) in index else None for n in names]
    folder = os.path.abspath(images_dir).rstrip(os.sep)
    name = os.path.basename(os.path.dirname(folder)) if os.path.basename(folder) == 'images' \
        else os.path.basename(folder)
    return AttentionInputs(images, masks, names, list(range(len(paths))), name, 'all')


# -- analysis ---------------------------------------------------------------------------------------------------
@dataclass
class AttentionResult:
    """Per-image scores and CAMs of one model on one set of inputs."""

    scores: list[dict]
    missing_masks: list[dict]
    skipped: list[dict]
    mean: float | None
    ci95: list[float | None]
    cams: np.ndarray
    targets: np.ndarray
    predictions: np.ndarray
    method: str = 'grad_cam'                 # or 'attention_rollout' (a vision transformer)

    def score_of(self, position: int) -> float | None:
        for entry in self.scores:
            if entry['position'] == position:
                return entry['score']
        return None


def analyse(backbone: nn.Module, head: nn.Module, inputs: AttentionInputs, device: torch.device | str = 'cpu',
            target: str = 'predicted', class_names: list[str] | None = None, batch_size: int = 32) -> AttentionResult:
    """The attention map of every input image (Grad-CAM, or attention rollout for a vision transformer:
    :func:`attention_maps`) and its ROI-attention score (see the module docstring)."""
    if target not in ('predicted', 'true'):
        raise AttentionError(f'target must be "predicted" or "true", got {target!r}')
    targets = None
    if target == 'true':
        if inputs.labels is None:
            raise AttentionError(f'--target true needs single-label class labels; {inputs.dataset} has none')
        targets = np.asarray(inputs.labels, dtype=np.int64)
        classes = head.out_features if isinstance(head, nn.Linear) else None
        if classes is not None and (targets.max() >= classes or targets.min() < 0):
            raise AttentionError(f'--target true: labels of {inputs.dataset} do not fit the model\'s {classes} classes')
    cams, logits, chosen = attention_maps(backbone, head, inputs.images, targets, device, batch_size)
    predictions = logits.argmax(axis=1)

    def label(k):
        return class_names[int(k)] if class_names and int(k) < len(class_names) else int(k)

    scores, missing, skipped = [], [], []
    for position, (mask, name, index) in enumerate(zip(inputs.masks, inputs.names, inputs.indices)):
        entry = {'index': index, 'name': name}
        if mask is None:
            missing.append(entry)
            continue
        if mask.shape != cams[position].shape:
            raise AttentionError(f'mask of {name} is {mask.shape}, its image {cams[position].shape}')
        score, reason = roi_score(cams[position], mask)
        if score is None:
            skipped.append({**entry, 'reason': reason})
            continue
        scores.append({**entry, 'score': score, 'position': position, 'target': label(chosen[position]),
                       'predicted': label(predictions[position]), 'roi_fraction': float(mask.mean())})
    mean, ci = mean_ci([s['score'] for s in scores])
    return AttentionResult(scores, missing, skipped, mean, ci, cams, chosen, predictions, attention_method(backbone))


def report_dict(result: AttentionResult, inputs: AttentionInputs, model: dict, target: str) -> dict:
    """The content of ``attention.json``."""
    return {
        'model': model,
        'dataset': inputs.dataset,
        'split': inputs.split,
        'num_images': len(inputs),
        'num_scored': len(result.scores),
        'target': target,
        'scores': [{k: v for k, v in s.items() if k != 'position'} for s in result.scores],
        'mean': result.mean,
        'ci95': list(result.ci95),
        'ci_method': CI_METHOD,
        'method': result.method,
        'score': f'share of positive {METHOD_NAMES[result.method]} mass inside the ROI mask (chance level = ROI '
                 f'area fraction)',
        'mean_roi_fraction': (float(np.mean([s['roi_fraction'] for s in result.scores]))
                              if result.scores else None),
        'missing_masks': result.missing_masks,
        'skipped': result.skipped,
        'notes': list(inputs.notes),
    }


# -- overlay grid -----------------------------------------------------------------------------------------------
def render_grid(inputs: AttentionInputs, result: AttentionResult, path: str, max_rows: int = 8,
                title: str | None = None) -> str:
    """PNG with one row per image: the image with its ROI contour, the CAM, and the CAM over the image.

    Scored images come first, then skipped ones and images without a mask, up to ``max_rows`` rows."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders headless (Agg)

    scored = [s['position'] for s in result.scores]
    others = [p for p in range(len(inputs)) if p not in set(scored)]
    rows = (scored + others)[:max(1, max_rows)]
    fig = Figure(figsize=(7.5, 2.5 * len(rows)))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    skipped = {entry['index']: entry['reason'] for entry in result.skipped}
    for row, position in enumerate(rows):
        image = inputs.images[position]
        shown = image[..., 0] if image.shape[-1] == 1 else image
        cmap = 'gray' if image.shape[-1] == 1 else None
        cam = result.cams[position]
        peak = float(cam.max())
        cam_shown = cam / peak if peak > 0 else cam
        mask = inputs.masks[position]
        score = result.score_of(position)
        if score is not None:
            status = f'in ROI {score:.2f}'
        elif mask is None:
            status = 'no mask'
        else:
            status = skipped.get(inputs.indices[position], 'skipped').split(' (')[0]
        panels = (('image + ROI', None), (METHOD_NAMES[result.method], 'cam'), (status, 'overlay'))
        for col, (label, kind) in enumerate(panels):
            ax = axes[row, col]
            if kind == 'cam':
                ax.imshow(cam_shown, cmap='jet', vmin=0, vmax=1)
            else:
                ax.imshow(shown, cmap=cmap)
                if kind == 'overlay':
                    ax.imshow(cam_shown, cmap='jet', alpha=0.45, vmin=0, vmax=1)
            if mask is not None and mask.any() and not mask.all():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors='lime', linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(inputs.names[position][:28] if col == 0 else label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / (2.5 * len(rows))) if title else None)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp.png'
    fig.savefig(tmp, dpi=90, format='png')
    os.replace(tmp, path)
    return path
