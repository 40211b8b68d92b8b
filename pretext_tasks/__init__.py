"""Pretext tasks, one file each, registered by name: relloc, rotation, moco, swav, odc.

A task knows nothing about curricula: it trains a backbone on unlabeled images and exposes the backbone.
"""
from . import moco, odc, relloc, rotation, swav  # noqa: F401  (registration)
from .base import PretextTask, build_backbone, pool_last
from .errors import (
           NonFiniteLossError,
           PretextConfigError,
           PretextError,
           UnknownTaskError,
)
from .registry import TASKS, build_task, get_task_class

__all__ = ['PretextTask', 'build_backbone', 'pool_last', 'NonFiniteLossError', 'PretextConfigError',
           'PretextError', 'UnknownTaskError', 'TASKS', 'build_task', 'get_task_class']
