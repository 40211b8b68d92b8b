"""Process launcher of the kill -9 harness (tests/test_fault_injection.py).

Each run of tools/run_curriculum.py is a real process, ended by a real SIGKILL, but forked from a server process
that imported torch, mmengine, mmpretrain, optuna and the engine once (multiprocessing's ``forkserver`` with this
module preloaded): the harness starts over 40 runs, and importing the stack anew costs more than a tiny run.
Every child runs with one torch thread (the reference and every rerun compute alike) and writes its stdout and
stderr to a log file.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tool_loader import load_tool  # noqa: E402  (tests/ is on the path of pytest and of the forkserver)


def _preload() -> None:
    """What the server imports once (runs when the forkserver imports this module; no torch op runs there, so
    forking it is safe)."""
    import curriculum  # noqa: F401  (first: it silences a warning of mmcv-lite's import)
    import faiss  # noqa: F401
    import matplotlib.pyplot  # noqa: F401  (mmengine's Visualizer)
    import mmengine.runner  # noqa: F401
    import mmpretrain.models  # noqa: F401
    import optuna
    import sqlalchemy  # noqa: F401
    import torch  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    from mmpretrain.utils import register_all_modules

    import benchmarks.protocols  # noqa: F401
    import curriculum.config_schema  # noqa: F401
    import curriculum.run  # noqa: F401

    register_all_modules(init_default_scope=False)
    optuna.storages.RDBStorage('sqlite://')   # imports alembic and the SQLite dialect (an in-memory database)
    load_tool('run_curriculum')


if multiprocessing.current_process().name == 'MainProcess' and os.environ.get('FAULT_HARNESS_SERVER') == '1':
    _preload()


def _check_preloaded() -> None:
    """Exit code 0 when the server had imported the engine before forking this process."""
    sys.exit(0 if 'curriculum.run' in sys.modules and 'run_curriculum_tool' in sys.modules else 3)


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    """Body of one run (in the forked process)."""
    os.environ.update(env)
    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    import torch

    torch.set_num_threads(1)
    code = load_tool('run_curriculum').main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


class Launcher:
    """Starts runs as processes forked from the preloaded server."""

    def __init__(self):
        self.context = multiprocessing.get_context('forkserver')
        self.context.set_forkserver_preload([__name__])
        saved = {key: os.environ.get(key) for key in ('OMP_NUM_THREADS', 'FAULT_HARNESS_SERVER', 'PYTHONPATH')}
        # read by the server only; the server imports this module by name, and Python 3.11's forkserver does not
        # pass it the parent's sys.path
        paths = [os.path.dirname(os.path.abspath(__file__)), REPO] + [saved['PYTHONPATH'] or '']
        os.environ.update(OMP_NUM_THREADS='1', FAULT_HARNESS_SERVER='1',
                          PYTHONPATH=os.pathsep.join(path for path in paths if path))
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        probe = self.context.Process(target=_check_preloaded)   # returns once the server has imported everything
        probe.start()
        probe.join()
        if probe.exitcode != 0:
            raise RuntimeError('the fork server did not import the engine (see fault_harness._preload)')

    @staticmethod
    def children_cpu_seconds() -> float | None:
        """CPU time (user + system) of every finished run so far, killed ones included: the server reaps them
        (Linux only; None elsewhere)."""
        pid = getattr(multiprocessing.forkserver._forkserver, '_forkserver_pid', None)  # noqa: SLF001
        try:
            with open(f'/proc/{pid}/stat') as handle:
                fields = handle.read().rsplit(')', 1)[1].split()
        except (OSError, IndexError, TypeError):
            return None
        return (int(fields[13]) + int(fields[14])) / os.sysconf('SC_CLK_TCK')   # cutime + cstime

    def start(self, argv: list[str], log: str, **env: str):
        process = self.context.Process(target=_child, args=(list(argv), dict(env), str(log)), daemon=True)
        process.start()
        return process
