"""Test-suite settings: a decoded-image / generated-dataset cache shared by the whole session, and the machine's
cores split between the pytest-xdist workers (``-n auto`` in setup.cfg).

Each worker gets ``cpu_count // workers`` torch threads, also passed to the tools the tests start as subprocesses
(``OMP_NUM_THREADS``; a value set by the user is kept). Measured on this 2-core CPU machine: a small ResNet-18 step
takes 1.23x less time with 2 threads than with 1, while two 1-thread processes side by side get 1.36x the work done
of one 2-thread process, so two single-threaded workers finish the suite sooner than one worker with two threads.
"""
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault('CURRICULUM_SSL_CACHE', os.path.join(REPO, '.cache', 'tests'))


def _threads_per_worker() -> int | None:
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT') or 0)
    if workers <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


_THREADS = _threads_per_worker()
if _THREADS is not None and 'OMP_NUM_THREADS' not in os.environ:  # a user's value: torch reads it at import
    os.environ['OMP_NUM_THREADS'] = str(_THREADS)
    import torch

    torch.set_num_threads(_THREADS)


@pytest.fixture(scope='module')
def one_torch_thread():
    """Single-threaded torch for a module (``pytestmark = pytest.mark.usefixtures('one_torch_thread')``): on a
    small shared CPU, intra-op threads spin against each other (~10x slower); the count is restored after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
