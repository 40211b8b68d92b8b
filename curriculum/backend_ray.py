"""The Ray backend of the sweep scheduler (:mod:`curriculum.sweep`): every node of the sweep's graph is one Ray task
with ``num_cpus`` / ``num_gpus`` resources, handed its parent's result (so Ray starts it once the parent is done),
and retried by Ray when its worker or node dies (``max_retries``); errors a node raises itself are not retried.

``ray.init(address=...)`` joins a running cluster (``auto``: the one this machine belongs to); without an address
Ray starts a local one with ``workers × cpus_per_stage`` CPUs, so the same command runs on a laptop and on a
cluster. Every node must reach the work root, the data and the command's folder at the same paths (a shared file
system) and the results store and Optuna storage (PostgreSQL on a cluster).
"""
from __future__ import annotations

import logging
import socket

from .backend_local import NodeError, node_error
from .errors import PlanError


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A PlanError when ``HOST:PORT`` (or ``ray://HOST:PORT``) does not accept a TCP connection: ``ray.init`` itself
    keeps retrying an unreachable address for many minutes. ``auto`` is left to Ray (it fails at once when this
    machine has no running cluster)."""
    target = address[len('ray://'):] if address.startswith('ray://') else address
    if address == 'auto' or ':' not in target:
        return
    host, _, port = target.rpartition(':')
    try:
        with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout):
            pass
    except ValueError:
        raise PlanError(f'--ray-address {address}: not HOST:PORT') from None
    except OSError as exc:
        raise PlanError(f'cannot reach Ray at {address}: {exc.strerror or type(exc).__name__}') from None


class RayBackend:
    native_dependencies = True

    def __init__(self, address: str | None, workers: int, cpus_per_stage: float, gpus_per_stage: float,
                 retries: int = 3):
        try:
            import ray
        except ImportError:
            raise PlanError('--backend ray needs Ray: pip install -e ".[ray]"') from None
        self.ray = ray
        self.options = dict(num_cpus=cpus_per_stage, num_gpus=gpus_per_stage, max_retries=int(retries),
                            retry_exceptions=False)
        if address:
            check_reachable(address)
        try:   # Ray's own start-up lines are left out: the tool prints the dashboard URL and the cluster it got
            if address:
                context = ray.init(address=address, logging_level=logging.ERROR)
            else:
                # 'local': a new local Ray even where `ray start` left a cluster running (joining one is --ray-address auto)
                context = ray.init(address='local', num_cpus=max(1, round(workers * cpus_per_stage)),
                                   logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise PlanError(f'cannot start or reach Ray{f" at {address}" if address else ""}: '
                            f'{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}') \
                from None
        url = getattr(context, 'dashboard_url', None) or ''
        self.dashboard = url if not url or url.startswith('http') else f'http://{url}'
        resources = ray.cluster_resources()
        self.slots = max(1, int(resources.get('CPU', 1) // max(cpus_per_stage, 1e-9)))
        self.description = (f'Ray, {len([n for n in ray.nodes() if n.get("Alive")])} node(s), '
                            f'{resources.get("CPU", 0):g} CPUs, {resources.get("GPU", 0):g} GPUs; '
                            f'{cpus_per_stage:g} CPUs and {gpus_per_stage:g} GPUs per stage')
        if gpus_per_stage > resources.get('GPU', 0) or cpus_per_stage > resources.get('CPU', 0):
            self.close()
            raise PlanError(f'the Ray cluster has {resources.get("CPU", 0):g} CPUs and {resources.get("GPU", 0):g} '
                            f'GPUs: a stage asking for {cpus_per_stage:g} CPUs and {gpus_per_stage:g} GPUs '
                            f'would never start')
        self._remote = {}

    def _task(self, function):
        if function not in self._remote:
            self._remote[function] = self.ray.remote(function).options(**self.options)
        return self._remote[function]

    def plan(self, function, args: tuple):
        return self.result(self.submit(function, args))

    def submit(self, function, args: tuple):
        return self._task(function).remote(*args)

    def wait(self, handles: list) -> list:
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        more, _ = self.ray.wait(list(handles), num_returns=len(handles), timeout=0)
        return list(dict.fromkeys(ready + more))

    def result(self, handle):
        from ray.exceptions import RayError, RayTaskError

        try:
            return self.ray.get(handle)
        except RayTaskError as exc:
            cause = getattr(exc, 'cause', None)
            raise node_error(cause if isinstance(cause, BaseException) else exc) from None
        except RayError as exc:   # its worker or node died more often than the retries allow, ...
            raise NodeError(f'{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ""}',
                            False, str(exc)) from None

    def close(self) -> None:
        self.ray.shutdown()
