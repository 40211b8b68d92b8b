"""Stage cache keys: a stage is identified by everything that determines its output.

key = hash(parent stage key, task, resolved task config, LR-search config, seed, dataset fingerprint, image size,
backbone config, device/precision, engine cache version). Because the parent key is part of the key, orderings
that share a prefix share those stages: ``odc`` → ``odc,moco`` → ``odc,moco,relloc`` reuse the earlier stages.
"""
from __future__ import annotations

import hashlib
import json
import os

#: 2: stages before it ignored their parent's backbone (re-initialised by the Runner); never reuse them
#: 3: a first stage starts from the seed's task-independent initial backbone (pretext_tasks.base.initial_backbone)
#: 4: a stage without an LR search no longer depends on the search settings; ODC's paramwise_cfg is applied
CACHE_VERSION = 4
STAGES_DIR = 'stages'


def stage_key(parent_key: str | None, task: str, task_cfg: dict, search_cfg: dict, seed: int, data_fingerprint: str,
              image_size: int, backbone_cfg: dict, precision: str) -> str:
    searched = int(search_cfg.get('trials', 0) or 0) > 0   # without a search its settings change nothing
    payload = dict(version=CACHE_VERSION, parent=parent_key, task=task, task_cfg=task_cfg,
                   search=search_cfg if searched else {'trials': 0}, seed=seed, data=data_fingerprint,
                   image_size=image_size, backbone=backbone_cfg, precision=precision)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_dir(work_root: str, task: str, key: str) -> str:
    return os.path.join(work_root, STAGES_DIR, f'{task}-{key}')
