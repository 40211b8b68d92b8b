"""Fault-injection points for the kill -9 harness (``tests/test_fault_injection.py``); inert unless asked.

The engine calls :func:`point` with a name at the moments a crash is most harmful (a training iteration, between
writing a file and publishing it, inside a results-store transaction). Two environment variables drive it:

* ``CURRICULUM_FAULT=<name>:<n>`` — the process sends itself SIGKILL the ``n``-th time (1-based) it reaches point
  ``<name>``: no cleanup, no ``finally``, no atexit, exactly like ``kill -9``.
* ``CURRICULUM_FAULT_TRACE=<file>`` — every point reached is appended to ``<file>`` as ``<name> <unix time>``, so a
  harness can choose kill points that a run really reaches (and say when they come).

Point names: ``trial_iter`` (after an LR-trial iteration), ``train_iter`` (after a stage iteration),
``checkpoint_write`` (an epoch checkpoint written under a temporary name; reached twice per checkpoint: before its
hash sidecar and before its rename), ``file_write`` (the same two moments for backbone / weights files),
``json_write`` (a JSON record written under a temporary name, before its rename), ``results_write`` (inside the
results-store transaction, after the insert and before the commit).
"""
from __future__ import annotations

import os
import signal
import time

FAULT_ENV = 'CURRICULUM_FAULT'
TRACE_ENV = 'CURRICULUM_FAULT_TRACE'
_counts: dict[str, int] = {}


def point(name: str) -> None:
    """A named crash point: SIGKILL this process when ``CURRICULUM_FAULT`` names this occurrence."""
    fault, trace = os.environ.get(FAULT_ENV), os.environ.get(TRACE_ENV)
    if not fault and not trace:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if trace:
        with open(trace, 'a') as handle:
            handle.write(f'{name} {time.time():.3f}\n')
    if fault and fault == f'{name}:{_counts[name]}':
        os.kill(os.getpid(), signal.SIGKILL)
