"""The backbones a DVME evaluation fuses (``--fuse RUN_DIR [RUN_DIR ...]``, config ``evaluation.fuse``): each entry
resolved to the final backbone of a finished run and loaded, at plan time.

An entry may be

* a run folder written by ``tools/run_curriculum.py`` (it holds ``result.json``): its final backbone is the last
  stage's ``backbone.pth`` in the stage cache (the ``stage_dir`` recorded in ``result.json``, or
  ``<work_root>/stages/<task>-<key>`` when the cache moved with its work root); a run of ``--order none`` has the
  seed's random initialisation (rebuilt from its backbone config and seed), a run of ``--init W --order none`` the
  weights ``W`` (loaded weights-only);
* a stage folder of the cache (``backbone.pth`` with ``stage.json``), or that ``backbone.pth`` itself: the backbone
  config is then the current run's.

Anything else, or a run whose final backbone is gone, is a one-line PlanError / CheckpointError naming the entry, so
the run stops before any compute. Engine-written backbone files are loaded through the engine's trust check, user
weights weights-only (:mod:`curriculum.compat`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .cache import stage_dir
from .errors import CheckpointError, PlanError
from .finetuned import RESULT as RESULT_FILE
from .leaderboard import run_label
from .stage import BACKBONE_FILE, STAGE_FILE


@dataclass(frozen=True)
class FusedSource:
    """One resolved ``--fuse`` entry."""

    name: str                   # how tables name it: the run's ordering label, or the stage folder's name
    path: str                   # the entry as given, made absolute
    backbone_file: str | None   # None: the seed's random initialisation
    backbone_cfg: dict
    seed: int
    user_weights: bool = False  # True: ``backbone_file`` is a user's weights file (loaded weights-only)
    order: tuple[str, ...] | None = None   # the run's ordering (None for a stage folder)

    def describe(self) -> dict:
        """What ``result.json`` records of the source."""
        return {'name': self.name, 'path': self.path, 'backbone_file': self.backbone_file,
                'order': list(self.order) if self.order is not None else None, 'seed': self.seed}


def _read_result(path: str) -> dict:
    file = os.path.join(path, RESULT_FILE)
    try:
        with open(file) as handle:
            result = json.load(handle)
    except (OSError, ValueError) as exc:
        raise PlanError(f'--fuse {path}: unreadable {RESULT_FILE} ({exc})') from None
    if not isinstance(result, dict) or 'order' not in result or 'stages' not in result:
        raise PlanError(f'--fuse {path}: {RESULT_FILE} is not the result of tools/run_curriculum.py')
    return result


def final_backbone_file(result: dict, where: str, work_root: str | None = None) -> str:
    """The last stage's backbone file of a stored run: its recorded ``stage_dir``, else the stage cache under the
    run's work root, else under ``work_root`` (a compact export keeps neither path); a CheckpointError naming
    ``where`` when none holds it."""
    last = result['stages'][-1]
    candidates = []
    if last.get('stage_dir'):
        candidates.append(os.path.join(last['stage_dir'], BACKBONE_FILE))
    for root in (result.get('work_root'), work_root):
        if root and last.get('task') and last.get('key'):
            candidates.append(os.path.join(stage_dir(root, last['task'], last['key']), BACKBONE_FILE))
    for candidate in candidates:
        if os.path.isfile(candidate):
            return candidate
    missing = candidates[0] if candidates else 'the last stage\'s backbone.pth (no stage_dir recorded)'
    raise CheckpointError(f'--fuse {where}: the final backbone {missing} is missing (was the stage cache '
                          f'deleted?)')


def resolve(entry: str, backbone_cfg: dict, seed: int) -> FusedSource:
    """One ``--fuse`` entry as a :class:`FusedSource` (nothing loaded yet); ``backbone_cfg`` and ``seed`` are the
    current run's (used for a stage folder)."""
    path = os.path.abspath(entry)
    if os.path.isfile(path) and os.path.basename(path) == BACKBONE_FILE:
        path = os.path.dirname(path)
    if not os.path.exists(path):
        raise PlanError(f'--fuse {entry}: no such folder')
    if not os.path.isdir(path):
        raise PlanError(f'--fuse {entry}: not a run folder (a file; give the folder of a finished run)')
    if os.path.isfile(os.path.join(path, RESULT_FILE)):
        result = _read_result(path)
        config = result.get('config') or {}
        cfg = dict(config.get('backbone') or backbone_cfg)
        run_seed = int(result.get('seed', config.get('seed', 0)))
        order = tuple(result.get('order') or [])
        if result['stages']:
            file, user = final_backbone_file(result, entry), False
        elif result.get('init'):
            file, user = result['init'], True
            if not os.path.isfile(file):
                raise CheckpointError(f'--fuse {entry}: its --init weights {file} are missing')
        else:
            file, user = None, False
        return FusedSource(run_label(result), path, file, cfg, run_seed, user, order)
    if os.path.isfile(os.path.join(path, BACKBONE_FILE)) and os.path.isfile(os.path.join(path, STAGE_FILE)):
        return FusedSource(os.path.basename(path.rstrip(os.sep)), path, os.path.join(path, BACKBONE_FILE),
                           dict(backbone_cfg), int(seed))
    raise PlanError(f'--fuse {entry}: not a run folder (no {RESULT_FILE}) nor a stage folder (no {BACKBONE_FILE} '
                    f'with {STAGE_FILE}): nothing to fuse there')


def load_backbone(source: FusedSource):
    """The source's backbone module on the CPU (the caller's RNG untouched); a CheckpointError when the weights do
    not fit its backbone config."""
    from pretext_tasks.base import initial_backbone

    from .compat import load_checkpoint_file, load_user_weights

    backbone = initial_backbone(source.backbone_cfg, source.seed)
    if source.backbone_file is None:
        return backbone
    if source.user_weights:
        state = load_user_weights(source.backbone_file)
    else:
        state = load_checkpoint_file(source.backbone_file, map_location='cpu')
    result = backbone.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f'--fuse {source.path}: {source.backbone_file} does not fit the backbone config '
                              f'{source.backbone_cfg} (missing {result.missing_keys[:3]}, unexpected '
                              f'{result.unexpected_keys[:3]})')
    return backbone


def fused_backbones(entries: list[str], backbone_cfg: dict, seed: int) -> list[tuple[FusedSource, object]]:
    """Every ``--fuse`` entry resolved and loaded: ``[(source, backbone)]``, in the order given."""
    if isinstance(entries, str):
        entries = [entries]
    return [(source, load_backbone(source)) for source in (resolve(e, backbone_cfg, seed) for e in entries)]
