"""Compatibility fixes between torch ≥ 2.6, mmengine 0.10.7 and user-supplied weights, in one place.

torch ≥ 2.6 loads with ``weights_only=True``; mmengine's checkpoints hold its ``HistoryBuffer`` and numpy objects,
so resuming fails with ``UnpicklingError``. Full unpickling is only safe for files this engine wrote itself, so
:class:`EngineRunner` writes every checkpoint atomically with a SHA-256 sidecar, and the local checkpoint loader
(installed into mmengine's ``CheckpointLoader``) unpickles fully only when the sidecar matches; any other file is
loaded weights-only. User weights (``--init``) always go through :func:`load_user_weights` (weights-only).
"""
from __future__ import annotations

import hashlib
import os
import pickle

import torch
from mmengine.runner import CheckpointLoader, Runner

from benchmarks.files import temporary_name

from . import faults
from .errors import CheckpointError

SIDECAR_SUFFIX = '.sha256'


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as handle:
        for block in iter(lambda: handle.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def _write_sidecar(path: str, digest: str) -> None:
    path = os.fspath(path)
    tmp = temporary_name(path + SIDECAR_SUFFIX)
    with open(tmp, 'w') as handle:
        handle.write(digest)
    os.replace(tmp, path + SIDECAR_SUFFIX)


def mark_trusted(path: str) -> None:
    """Record that the engine wrote ``path`` (sidecar with its hash, written atomically)."""
    _write_sidecar(path, file_sha256(path))


def publish_trusted(tmp: str, path: str, fault_name: str) -> None:
    """Publish the complete temporary file ``tmp`` as ``path``: its hash sidecar first, then the rename. A kill at
    any moment leaves either the previous ``path`` or the new one with its sidecar (a sidecar without its file, or
    with another file's hash, only makes a file untrusted; stage directories are tidied when a stage starts)."""
    faults.point(fault_name)
    _write_sidecar(path, file_sha256(tmp))
    faults.point(fault_name)
    os.replace(tmp, path)


def is_trusted(path: str) -> bool:
    sidecar = path + SIDECAR_SUFFIX
    if not os.path.isfile(sidecar):
        return False
    with open(sidecar) as handle:
        return handle.read().strip() == file_sha256(path)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file, then its sidecar, then the rename: a kill never leaves a half file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    torch.save(obj, tmp)
    publish_trusted(tmp, path, 'file_write')


def load_checkpoint_file(filename: str, map_location=None):
    """Load a checkpoint: fully unpickled when the engine wrote it, weights-only otherwise."""
    if not os.path.isfile(filename):
        raise CheckpointError(f'checkpoint not found: {filename}')
    if is_trusted(filename):
        return torch.load(filename, map_location=map_location, weights_only=False)
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f'{filename}: not written by this engine and not a plain weights file; refusing to unpickle it '
            f'({first})') from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f'{filename}: corrupt or truncated checkpoint ({str(exc).splitlines()[0]})') from None


def install() -> None:
    """Make mmengine's local checkpoint loading go through :func:`load_checkpoint_file` (idempotent)."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_checkpoint_file, force=True)


def _not_an_mmengine_deprecation_notice(record) -> bool:
    """Logging filter: mmengine's CheckpointHook builds its own FileClient and logs, at WARNING, that FileClient
    and HardDiskBackend "will be deprecated" once per stage and trial; nothing a user of this engine can act on."""
    message = record.getMessage()
    return not (message.startswith('"FileClient" will be deprecated')
                or message.startswith('"HardDiskBackend" is the alias of "LocalBackend"'))


class EngineRunner(Runner):
    """mmengine's Runner whose checkpoints are written atomically and marked as the engine's own, and whose logger
    drops mmengine's notices about its own deprecated file client."""

    def build_logger(self, *args, **kwargs):
        logger = super().build_logger(*args, **kwargs)
        if _not_an_mmengine_deprecation_notice not in logger.filters:
            logger.addFilter(_not_an_mmengine_deprecation_notice)
        return logger

    def save_checkpoint(self, out_dir: str, filename: str, *args, **kwargs):
        from mmengine.dist import get_rank

        if get_rank() != 0:  # mmengine writes checkpoints on rank 0 only (master_only)
            return
        partial = filename + '.partial'
        super().save_checkpoint(out_dir, partial, *args, **kwargs)
        publish_trusted(os.path.join(out_dir, partial), os.path.join(out_dir, filename), 'checkpoint_write')


HEAD_PREFIXES = ('fc.', 'head.', 'classifier.')


def load_user_weights(path: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a user file (e.g. ImageNet ResNet weights), loaded weights-only.

    Accepts a plain state dict or one nested under ``state_dict`` / ``model``; strips ``module.`` and
    ``backbone.`` prefixes and drops classifier-head keys (``fc.*``), which a backbone has no place for.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'--init weights file not found: {path}')
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f'{path}: cannot be loaded weights-only (it contains pickled objects); '
                              f'save a plain state_dict ({str(exc).splitlines()[0]})') from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f'{path}: not a readable torch weights file ({str(exc).splitlines()[0]})') from None
    for key in ('state_dict', 'model'):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError(f'{path}: expected a dict of tensors (a state_dict)')
    state = {}
    for key, value in obj.items():
        for prefix in ('module.', 'backbone.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.startswith(HEAD_PREFIXES):
            continue
        state[key] = value
    return state


def patch_mmcv_adjust_hue() -> None:
    """numpy 2 fix for ``mmcv.adjust_hue``: it computes ``np.uint8(hue_factor * 255)``, which raises
    ``OverflowError`` for the negative hues ColorJitter samples in mmpretrain's MoCo/SwAV pipelines. The replacement
    shifts the hue channel by the same amount modulo 256 (what the uint8 arithmetic meant). Idempotent."""
    import cv2
    import mmcv
    import numpy as np
    from PIL import Image

    if getattr(mmcv.adjust_hue, '_engine_patched', False):
        return

    def adjust_hue(img, hue_factor, backend=None):
        if not -0.5 <= hue_factor <= 0.5:
            raise ValueError(f'hue_factor:{hue_factor} is not in [-0.5, 0.5].')
        shift = np.uint8(int(hue_factor * 255) % 256)
        if (backend or mmcv.image.io.imread_backend) == 'pillow':
            pil = Image.fromarray(img[..., ::-1], mode='RGB')
            h, s, v = pil.convert('HSV').split()
            hue = np.array(h, dtype=np.uint8) + shift  # uint8 addition wraps around the hue circle
            out = Image.merge('HSV', (Image.fromarray(hue, 'L'), s, v)).convert('RGB')
            return np.array(out, dtype=img.dtype)[..., ::-1]
        h, s, v = cv2.split(cv2.cvtColor(img.astype(np.uint8), cv2.COLOR_BGR2HSV_FULL))
        merged = cv2.merge([(h.astype(np.uint8) + shift).astype(np.uint8), s, v])
        return cv2.cvtColor(merged, cv2.COLOR_HSV2BGR_FULL).astype(img.dtype)

    adjust_hue._engine_patched = True
    mmcv.adjust_hue = adjust_hue
    mmcv.image.adjust_hue = adjust_hue
    mmcv.image.photometric.adjust_hue = adjust_hue
