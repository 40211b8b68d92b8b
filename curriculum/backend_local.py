"""The local backends of the sweep scheduler (:mod:`curriculum.sweep`): nodes run in this process one after the
other (``--workers 1``), or on a pool of N worker processes on this machine (``--workers N``).

The pool is written here rather than taken from ``concurrent.futures.ProcessPoolExecutor``: when one of its workers
dies, the executor is broken and kills every other worker with it, so one lost worker would cost every stage in
flight. Here a worker that dies (killed, out of memory) is replaced, and only the node it was running is tried
again (at most ``retries`` times; the stage resumes from its last epoch checkpoint, see
:mod:`curriculum.stage_store`); the other workers go on. Workers are started with ``spawn`` (a fresh interpreter:
no fork of a process that holds torch threads) and end themselves when the sweep's process is gone.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from multiprocessing.connection import wait as wait_for


class NodeError(Exception):
    """A node that failed: its one-line message, whether it is a user error (exit code 2) and the traceback."""

    def __init__(self, message: str, user_error: bool = False, details: str = ''):
        super().__init__(message)
        self.user_error = user_error
        self.details = details

    def __reduce__(self):   # crosses process boundaries with all three fields
        return NodeError, (str(self), self.user_error, self.details)


def node_error(exc: BaseException) -> NodeError:
    from .errors import USER_ERRORS

    if isinstance(exc, NodeError):
        return exc
    text = str(exc).strip()
    message = text.splitlines()[0] if text else type(exc).__name__
    user = isinstance(exc, USER_ERRORS)
    return NodeError(message if user else f'{type(exc).__name__}: {message}', user,
                     ''.join(traceback.format_exception(exc)))


class _Done:
    """A finished call's outcome."""

    def __init__(self, ok: bool, value):
        self.ok, self.value = ok, value


class InProcessBackend:
    """Each node runs in this process when it is submitted."""

    native_dependencies = False
    slots = 1
    description = 'in this process'

    def plan(self, function, args: tuple):
        return function(*args)

    def submit(self, function, args: tuple) -> _Done:
        try:
            return _Done(True, function(*args))
        except Exception as exc:  # noqa: BLE001 (reported as the node's failure; KeyboardInterrupt stops the sweep)
            return _Done(False, node_error(exc))

    def wait(self, handles: list) -> list:
        return list(handles)

    def result(self, handle: _Done):
        if not handle.ok:
            raise handle.value
        return handle.value

    def close(self) -> None:
        pass


def _exit_with_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(1)
        time.sleep(1.0)


def threads_per_worker(workers: int) -> int | None:
    """The intra-op threads each of ``workers`` processes should use: its share of this process's cores, or None
    when the user set ``OMP_NUM_THREADS`` (kept as given). Left to torch's default, every worker takes all the
    cores: measured on a 2-core CPU, two workers fine-tuning a ResNet-18 at 32 px took 2.15 s per step with two
    threads each and 0.55 s with one each (one process alone with both cores: 0.43 s)."""
    if os.environ.get('OMP_NUM_THREADS'):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // max(1, workers))


def _worker_main(connection, parent: int, threads: int | None = None) -> None:
    """A worker process: run the calls it is sent until told to stop, with ``threads`` intra-op threads."""
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if threads is not None:
        os.environ['OMP_NUM_THREADS'] = str(threads)    # for this process's libraries that read it at import
        import torch

        torch.set_num_threads(threads)
    if 'fork' in multiprocessing.get_all_start_methods():
        # what mmengine's Runner sets in every process it runs in (it warns when it finds spawn); this process
        # itself starts no other
        multiprocessing.set_start_method('fork', force=True)
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:
                return
            if message is None:
                return
            task, function, args = message
            try:
                outcome = (task, True, function(*args))
            except Exception as exc:  # noqa: BLE001 (sent back as the node's failure)
                outcome = (task, False, node_error(exc))
            try:
                connection.send(outcome)
            except Exception as exc:  # noqa: BLE001 (a result that cannot be pickled)
                connection.send((task, False, node_error(exc)))
    except KeyboardInterrupt:
        return


class _Worker:
    def __init__(self, context, threads: int | None):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, os.getpid(), threads), daemon=True)
        self.process.start()
        child.close()
        self.task: int | None = None


class WorkerPoolBackend:
    """Nodes on ``workers`` processes of this machine; a dead worker is replaced and its node tried again."""

    native_dependencies = False

    def __init__(self, workers: int, retries: int = 3):
        self.slots = int(workers)
        self.retries = int(retries)
        self.threads = threads_per_worker(self.slots)
        self.description = f'{workers} worker processes on this machine' + (
            f', {self.threads} thread(s) each' if self.threads else ', threads from OMP_NUM_THREADS')
        self._context = multiprocessing.get_context('spawn')
        self._workers = [_Worker(self._context, self.threads) for _ in range(self.slots)]
        self._calls: dict[int, tuple] = {}        # task → (function, args)
        self._tries: dict[int, int] = {}
        self._queue: list[int] = []
        self._done: dict[int, _Done] = {}
        self._next = 0

    def plan(self, function, args: tuple):
        return function(*args)

    def submit(self, function, args: tuple) -> int:
        task = self._next
        self._next += 1
        self._calls[task] = (function, args)
        self._tries[task] = 0
        self._queue.append(task)
        self._dispatch()
        return task

    def _dispatch(self) -> None:
        for worker in self._workers:
            if not self._queue:
                return
            if worker.task is None:
                task = self._queue.pop(0)
                function, args = self._calls[task]
                self._tries[task] += 1
                worker.task = task
                worker.connection.send((task, function, args))

    def _lost(self, worker: _Worker) -> None:
        """``worker`` died: replace it and retry (or fail) its node."""
        task = worker.task
        worker.process.join(timeout=5)
        code = worker.process.exitcode
        worker.connection.close()
        self._workers[self._workers.index(worker)] = _Worker(self._context, self.threads)
        if task is None:
            return
        if self._tries[task] <= self.retries:
            self._queue.insert(0, task)
        else:
            self._done[task] = _Done(False, NodeError(
                f'its worker process died {self._tries[task]} times (last exit code {code})'))

    def wait(self, handles: list) -> list:
        while not any(handle in self._done for handle in handles):
            busy = [worker for worker in self._workers if worker.task is not None]
            if not busy:
                raise RuntimeError('nothing is running, yet the awaited nodes are not done')
            ready = wait_for([w.connection for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.connection in ready:
                    try:
                        task, ok, value = worker.connection.recv()
                    except (EOFError, OSError):
                        self._lost(worker)
                        continue
                    self._done[task] = _Done(ok, value)
                    worker.task = None
                elif worker.process.sentinel in ready:
                    self._lost(worker)
            self._dispatch()
        return [handle for handle in handles if handle in self._done]

    def result(self, handle: int):
        outcome = self._done.pop(handle)
        self._calls.pop(handle, None)
        if not outcome.ok:
            raise outcome.value
        return outcome.value

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.connection.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
