"""Name → pretext-task class registry. Names are a contract used by ``--order``.

Registering a task is one decorator line in its own file; the curriculum scheduler only ever looks tasks up here
and never mentions one by name.
"""
from __future__ import annotations

from .errors import UnknownTaskError

TASKS: dict[str, type] = {}


def register_task(cls: type) -> type:
    name = getattr(cls, 'name', '')
    if not name or name in TASKS:
        raise KeyError(f'pretext task name {name!r} is empty or registered twice')
    TASKS[name] = cls
    return cls


def task_names() -> list[str]:
    """The registered task names, sorted (every tool's list of tasks comes from here)."""
    return sorted(TASKS)


def get_task_class(name: str) -> type:
    if name not in TASKS:
        raise UnknownTaskError(f'unknown pretext task {name!r}; known: {", ".join(sorted(TASKS))}')
    return TASKS[name]


def build_task(name: str, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int,
               seed: int = 0):
    """Instantiate the registered task ``name``."""
    return get_task_class(name)(backbone, task_cfg, num_images, image_size, seed)
