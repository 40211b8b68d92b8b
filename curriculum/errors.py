"""Exceptions of the curriculum engine and the tuple of all user-facing errors.

Command-line tools catch :data:`USER_ERRORS`, print the one-line message and exit with code 2.
"""
from benchmarks.datasets.errors import DatasetError
from pretext_tasks.errors import PretextError


class EngineError(Exception):
    """Base class for curriculum-engine problems."""


class PlanError(EngineError):
    """An order or config that cannot be run (found before any compute)."""


class CheckpointError(EngineError):
    """A checkpoint or weights file that is missing, corrupt, mismatched or not trusted."""


USER_ERRORS = (EngineError, DatasetError, PretextError)
