"""A run's fine-tuned model and result file loaded back for the analysis tools (``tools/attention.py``,
``tools/evaluate.py``).

``<work dir>/finetuned.pth`` is written by :mod:`curriculum.run` when the run used ``--protocols finetune``: the
backbone's and the linear head's weights, the backbone config and the class names. It is read through the engine's
trust check (:func:`curriculum.compat.load_checkpoint_file`: fully unpickled only when this engine wrote it).
"""
from __future__ import annotations

import json
import os

CHECKPOINT = 'finetuned.pth'
RESULT = 'result.json'


def read_result(work_dir: str) -> dict | None:
    """``work_dir/result.json``, or None when there is none; a one-line EngineError when it cannot be read."""
    from .errors import EngineError

    path = os.path.join(work_dir, RESULT)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError) as exc:
        raise EngineError(f'{path}: unreadable result file ({exc})') from None


def checkpoint_path(work_dir: str) -> str:
    """``work_dir/finetuned.pth``; a one-line CheckpointError saying how to make it when it is missing."""
    from .errors import CheckpointError

    path = os.path.join(work_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise CheckpointError(f'no {CHECKPOINT} in {work_dir}: the run has no fine-tuned model; '
                              f're-run tools/run_curriculum.py with --protocols finetune')
    return path


def load_finetuned(path: str):
    """``(backbone, head, classes)`` from a run's ``finetuned.pth`` (loaded through the engine's trust check)."""
    import torch

    from pretext_tasks.base import build_backbone

    from .compat import load_checkpoint_file
    from .errors import CheckpointError

    state = load_checkpoint_file(path, map_location='cpu')
    if not isinstance(state, dict) or not {'backbone', 'head', 'backbone_cfg'} <= set(state):
        raise CheckpointError(f'{path}: not a fine-tuned model file (expected keys backbone, head, backbone_cfg)')
    backbone = build_backbone(dict(state['backbone_cfg']))
    weight = state['head'].get('weight')
    if weight is None or weight.ndim != 2:
        raise CheckpointError(f'{path}: head weights missing or not a linear layer')
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias='bias' in state['head'])
    try:
        backbone.load_state_dict(state['backbone'], strict=True)
        head.load_state_dict(state['head'], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f'{path}: weights do not match backbone_cfg {state["backbone_cfg"]} '
                              f'({str(exc).splitlines()[0]})') from None
    return backbone, head, list(state.get('classes') or [])
