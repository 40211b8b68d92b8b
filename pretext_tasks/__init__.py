"""Pretext tasks, one file each, registered by name (``@register_task``): relloc, rotation, moco, swav, odc,
simclr, byol, micle, colorme, dino, ibot.

Every module of this package is imported here, so a new task is its own file (with the decorator) plus its recipe
``configs/tasks/<name>.yaml``; nothing else lists tasks — tools and the scheduler read :data:`TASKS`. A task knows
nothing about curricula: it trains a backbone on unlabeled images and exposes the backbone.
"""
import importlib
import pkgutil

from .base import PretextTask, build_backbone, pool_last
from .errors import NonFiniteLossError, PretextConfigError, PretextError, UnknownTaskError
from .registry import TASKS, build_task, get_task_class, task_names

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f'{__name__}.{_module.name}')   # registration by the decorator in each task's file

__all__ = ['PretextTask', 'build_backbone', 'pool_last', 'NonFiniteLossError', 'PretextConfigError',
           'PretextError', 'UnknownTaskError', 'TASKS', 'build_task', 'get_task_class', 'task_names']
