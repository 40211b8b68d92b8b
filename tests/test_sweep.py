"""The sweep's task graph and scheduler (curriculum/sweep.py) and the local worker pool (curriculum/backend_local.py),
with stand-in node functions: the prefix tree has one node per distinct stage, a failing node takes only its
descendants with it, and a worker process that dies is replaced and only its node is tried again."""
from __future__ import annotations

import os
import time

import pytest

from curriculum.leaderboard import all_orderings, distinct_prefixes


def _chains(orderings, seed=0):
    """Stand-in stage keys: the prefix itself."""
    return [[(task, f'{seed}:' + ','.join(ordering[:depth + 1])) for depth, task in enumerate(ordering)]
            for ordering in orderings]


def test_graph_is_the_prefix_tree_of_the_jobs_plus_one_evaluation_each():
    from curriculum.sweep import build_graph

    orderings = all_orderings(['a', 'b', 'c'], 3)
    jobs = [{'order': ','.join(o), 'seed': 0, 'init': None} for o in orderings]
    nodes = build_graph(None, jobs, _chains(orderings))
    stages = {name: node for name, node in nodes.items() if node.kind == 'stage'}
    assert len(stages) == len(distinct_prefixes(orderings)) == 15
    assert sum(node.kind == 'evaluation' for node in nodes.values()) == 15
    assert stages['stage:0:a,b,c'].deps == ['stage:0:a,b'] and stages['stage:0:a'].deps == []
    evaluation = nodes[f'evaluation:{orderings.index(("b", "c", "a"))}']
    assert evaluation.deps == ['stage:0:b', 'stage:0:b,c', 'stage:0:b,c,a']
    owned = evaluation.args[2]
    assert owned == [False, False, True]       # 'b' and 'b,c' were first needed by the jobs 'b' and 'b,c'
    # every node starts after its dependencies in the start order
    order = sorted(nodes, key=lambda name: nodes[name].priority)
    assert all(order.index(dep) < order.index(name) for name in nodes for dep in nodes[name].deps)


def _value(name, *parents):
    if name == 'bad':
        from curriculum.errors import PlanError

        raise PlanError('bad stage')
    return name


def test_a_failing_node_takes_only_its_descendants_with_it():
    from curriculum.backend_local import InProcessBackend
    from curriculum.sweep import Node, execute

    def node(name, deps, priority):
        return Node(name, 'stage', _value, (name,), deps, priority, name)

    nodes = {n.name: n for n in [node('good', [], (0, 0)), node('bad', [], (1, 0)), node('child', ['bad'], (1, 1)),
                                  node('grandchild', ['child'], (1, 2)), node('other', ['good'], (2, 1))]}
    outcomes = execute(nodes, InProcessBackend())
    assert outcomes['good'].value == 'good' and outcomes['other'].value == 'other'
    assert not outcomes['bad'].ok and outcomes['bad'].error.user_error and str(outcomes['bad'].error) == 'bad stage'
    assert outcomes['child'].skipped_because == 'bad' and outcomes['grandchild'].skipped_because == 'child'


def _die_once(folder, name):
    marker = os.path.join(folder, f'{name}.died')
    if not os.path.exists(marker):
        open(marker, 'w').close()
        os._exit(9)          # like a kill -9 of the worker
    return name


def _steady(folder, name):
    time.sleep(0.5)
    with open(os.path.join(folder, f'{name}.{os.getpid()}'), 'w'):
        pass
    return name


def _always_die(folder, name):
    os._exit(9)


def test_a_dead_worker_is_replaced_and_only_its_node_runs_again(tmp_path):
    from curriculum.backend_local import NodeError, WorkerPoolBackend

    pool = WorkerPoolBackend(2, retries=1)
    try:
        steady = pool.submit(_steady, (str(tmp_path), 'steady'))
        dies = pool.submit(_die_once, (str(tmp_path), 'dies'))
        never = pool.submit(_always_die, (str(tmp_path), 'never'))
        results = {}
        pending = [steady, dies, never]
        while pending:
            for handle in pool.wait(pending):
                pending.remove(handle)
                try:
                    results[handle] = pool.result(handle)
                except NodeError as exc:
                    results[handle] = exc
        assert results[steady] == 'steady' and results[dies] == 'dies'
        assert isinstance(results[never], NodeError) and 'died 2 times' in str(results[never])
        assert len([name for name in os.listdir(tmp_path) if name.startswith('steady.')]) == 1   # ran once
        assert all(worker.process.is_alive() for worker in pool._workers)  # noqa: SLF001 (replaced)
    finally:
        pool.close()


def _torch_threads():
    import torch

    return torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS')


def _pool_threads(workers: int) -> list:
    from curriculum.backend_local import WorkerPoolBackend

    pool = WorkerPoolBackend(workers, retries=0)
    try:
        handles = [pool.submit(_torch_threads, ()) for _ in range(workers)]
        pending = list(handles)
        while pending:
            for handle in pool.wait(pending):
                pending.remove(handle)
        return [pool.result(handle) for handle in handles]
    finally:
        pool.close()


def test_worker_processes_share_the_cores_unless_the_user_set_omp_num_threads(monkeypatch):
    """Left to torch's default, each of N workers took every core (2 workers x 2 threads on a 2-core CPU: 2.15 s
    per fine-tuning step instead of 0.55 s); each now gets its share, and a user's OMP_NUM_THREADS is kept."""
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // 2)
    assert _pool_threads(2) == [(share, str(share))] * 2
    assert _pool_threads(1) == [(cores, str(cores))]
    monkeypatch.setenv('OMP_NUM_THREADS', '1')      # the user's choice, even where the share would be more
    assert _pool_threads(1) == [(1, '1')]


@pytest.mark.parametrize('flags, message', [
    (['--workers', '0'], '--workers must be at least 1'),
    (['--gpus-per-stage', '1'], '--ray-address and --gpus-per-stage need --backend ray'),
    (['--retries', '-1'], '--retries must be at least 0'),
])
def test_impossible_backend_settings_are_one_line_errors(flags, message):
    from curriculum.errors import PlanError
    from curriculum.sweep import open_backend

    args = dict(workers=1, retries=3, gpus_per_stage=0.0)
    for flag, value in zip(flags[::2], flags[1::2]):
        args[flag.lstrip('-').replace('-', '_')] = float(value) if 'gpus' in flag else int(value)
    with pytest.raises(PlanError, match=message):
        open_backend('local', args['workers'], None, 1.0, args['gpus_per_stage'], args['retries'])
