"""A sweep over orderings as a task graph, and the one scheduler that runs it.

The planned jobs (ordering, seed, init) become the prefix tree of their distinct stages — a node per stage key,
each depending on its parent's node — plus one evaluation node per job depending on its stages: a stage shared by
several orderings is computed once, and a child starts only when its parent is in the stage store. The scheduler
owns the graph, so no two workers ever need the same stage at once: no job queue and no file locks. A backend runs
the nodes: this process (``--workers 1``), a pool of local worker processes (``--workers N``,
:mod:`curriculum.backend_local`) or Ray tasks on a cluster (:mod:`curriculum.backend_ray`). A node that fails takes
only its descendants with it; every other node still runs, and whatever finished stays in the stores.

The job of a stage node is the first job (in plan order) that needs it; that job's result reports the stage as
trained (``cache_hit: false``) when this sweep trained it, every other job reports it as reused, as when the jobs
ran one after another.
"""
from __future__ import annotations

import heapq
import sys
import time
import uuid
from dataclasses import dataclass, field

from .backend_local import NodeError
from .sweep_tasks import evaluate_job, run_stage


def new_sweep_id() -> str:
    return uuid.uuid4().hex[:12]


@dataclass
class Node:
    name: str
    kind: str                      # 'stage' or 'evaluation'
    function: object
    args: tuple
    deps: list[str]                # nodes whose results are appended to ``args``, in order
    priority: tuple                # (index of the first job that needs it, depth): the order nodes start in
    label: str


def stage_node_name(key: str) -> str:
    return f'stage:{key}'


def build_graph(settings, jobs: list[dict], chains: list[list[tuple[str, str]]]) -> dict[str, Node]:
    """The nodes of a sweep: one per distinct stage key (depending on its parent stage) and one evaluation per job
    (depending on its stages)."""
    nodes: dict[str, Node] = {}
    for index, (job, chain) in enumerate(zip(jobs, chains)):
        owned = []
        for depth, (task, key) in enumerate(chain):
            name = stage_node_name(key)
            owned.append(name not in nodes)
            if name not in nodes:
                prefix = ','.join(task for task, _ in chain[:depth + 1])
                nodes[name] = Node(name, 'stage', run_stage, (settings, job, depth, key),
                                   [stage_node_name(chain[depth - 1][1])] if depth else [], (index, depth),
                                   f'{prefix} · seed {job["seed"]} · key {key}')
        label = job['order'] if not job['init'] else f'init {job["init"]} + {job["order"]}'
        if job.get('label_fraction') is not None:
            label += f' · labels {job["label_fraction"]:g}'
        nodes[f'evaluation:{index}'] = Node(f'evaluation:{index}', 'evaluation', evaluate_job,
                                            (settings, job, owned), [stage_node_name(key) for _, key in chain],
                                            (index, len(chain)), f'{label} · seed {job["seed"]}')
    return nodes


@dataclass
class Outcome:
    ok: bool
    value: object = None
    error: NodeError | None = None
    skipped_because: str | None = None    # a dependency that failed


@dataclass
class Progress:
    """One line per finished stage and run (and per failure), counted per kind."""
    totals: dict[str, int]
    done: dict[str, int] = field(default_factory=lambda: {'stage': 0, 'evaluation': 0})
    stream: object = None
    started: float = field(default_factory=time.time)

    def line(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def finished(self, node: Node, outcome: Outcome) -> None:
        self.done[node.kind] += 1
        count = f'{self.done[node.kind]}/{self.totals[node.kind]}'
        clock = f'{time.time() - self.started:7.0f} s'
        if node.kind == 'stage':
            head = f'[{clock}] [stage {count}] {node.label}'
        else:
            head = f'[{clock}] [run {count}] {node.label}'
        if outcome.skipped_because:
            self.line(f'{head}: not run ({outcome.skipped_because} failed)')
        elif not outcome.ok:
            self.line(f'{head}: FAILED: {outcome.error}')
        elif node.kind == 'stage':
            record = outcome.value
            how = 'from the cache' if record.get('cache_hit') else (
                f'trained in {float(record.get("seconds") or 0):.1f} s'
                + (f' (resumed at epoch {record["resumed_at_epoch"]})' if record.get('resumed_at_epoch') else ''))
            self.line(f'{head}: {how} [{record.get("where", "")}]')
        else:
            summary = outcome.value
            metrics = ', '.join(f'{protocol} {value:.4f}' if isinstance(value, (int, float)) else f'{protocol} -'
                                for protocol, value in summary['metrics'].items())
            state = 'already recorded' if summary['already_recorded'] else 'recorded'
            self.line(f'{head}: {summary["headline"]} {metrics} ({state}, results id {summary["results_id"]})')


def execute(nodes: dict[str, Node], backend, progress: Progress | None = None) -> dict[str, Outcome]:
    """Run every node on ``backend`` once its dependencies are done; returns each node's outcome."""
    outcomes: dict[str, Outcome] = {}
    children: dict[str, list[str]] = {name: [] for name in nodes}
    for node in nodes.values():
        for dep in node.deps:
            children[dep].append(node.name)

    def settle(name: str, handle) -> None:
        node = nodes[name]
        failed = next((dep for dep in node.deps if not outcomes[dep].ok), None) if all(
            dep in outcomes for dep in node.deps) else None
        try:
            outcome = Outcome(True, backend.result(handle))
        except NodeError as exc:
            outcome = Outcome(False, error=exc, skipped_because=nodes[failed].label if failed else None)
        outcomes[name] = outcome
        if progress:
            progress.finished(node, outcome)

    order = sorted(nodes, key=lambda name: nodes[name].priority)
    if backend.native_dependencies:
        # the whole graph at once: the backend starts each node when its dependencies are done
        handles = {}
        for name in order:
            node = nodes[name]
            handles[name] = backend.submit(node.function, node.args + tuple(handles[dep] for dep in node.deps))
        pending = {handle: name for name, handle in handles.items()}
        while pending:
            for handle in sorted(backend.wait(list(pending)), key=lambda h: nodes[pending[h]].priority):
                settle(pending.pop(handle), handle)
        return outcomes

    ready = [(nodes[name].priority, name) for name in order if not nodes[name].deps]
    heapq.heapify(ready)
    running: dict[object, str] = {}
    waiting = {name: len(nodes[name].deps) for name in nodes}

    def release(name: str) -> None:
        """``name`` is settled: its children either become ready or, if it failed, fail with it."""
        for child in children[name]:
            if child in outcomes:
                continue
            if not outcomes[name].ok:
                outcomes[child] = Outcome(False, error=NodeError('a dependency failed'),
                                          skipped_because=nodes[name].label)
                if progress:
                    progress.finished(nodes[child], outcomes[child])
                release(child)
                continue
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready, (nodes[child].priority, child))

    while ready or running:
        while ready and len(running) < backend.slots:
            _, name = heapq.heappop(ready)
            node = nodes[name]
            args = node.args + tuple(outcomes[dep].value for dep in node.deps)
            running[backend.submit(node.function, args)] = name
        for handle in backend.wait(list(running)):
            name = running.pop(handle)
            settle(name, handle)
            release(name)
    return outcomes


def check_backend_settings(kind: str, workers: int, address: str | None = None, cpus_per_stage: float = 1.0,
                           gpus_per_stage: float = 0.0, retries: int = 3) -> None:
    """A PlanError for impossible backend flags, checked before anything is written or started."""
    from .errors import PlanError

    if workers < 1:
        raise PlanError(f'--workers must be at least 1, got {workers}')
    if retries < 0:
        raise PlanError(f'--retries must be at least 0, got {retries}')
    if cpus_per_stage <= 0 or gpus_per_stage < 0:
        raise PlanError('--cpus-per-stage must be positive and --gpus-per-stage not negative')
    if kind not in ('local', 'ray'):
        raise PlanError(f'unknown backend {kind!r} (local or ray)')
    if kind == 'local' and (address or gpus_per_stage):
        raise PlanError('--ray-address and --gpus-per-stage need --backend ray')


def open_backend(kind: str, workers: int, address: str | None = None, cpus_per_stage: float = 1.0,
                 gpus_per_stage: float = 0.0, retries: int = 3):
    """The backend named by ``--backend`` (a PlanError for impossible settings)."""
    check_backend_settings(kind, workers, address, cpus_per_stage, gpus_per_stage, retries)
    if kind == 'ray':
        from .backend_ray import RayBackend

        return RayBackend(address, workers, cpus_per_stage, gpus_per_stage, retries)
    from .backend_local import InProcessBackend, WorkerPoolBackend

    return InProcessBackend() if workers == 1 else WorkerPoolBackend(workers, retries)
