"""The Ray backend on a real two-node cluster on loopback: a 2-task sweep (4 orderings, 2 seeds) through
``tools/leaderboard.py --backend ray --ray-address ...``; the second node's raylet is killed while that node trains
a stage (with the worker training it), and the sweep still completes: Ray retries the lost task on the head node,
which takes the dead attempt over, each ordering is recorded once and each distinct stage trained once (counted from
the stage records)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from ray_cluster import REPO, available, ray_cluster

TOOL = os.path.join(REPO, 'tools', 'leaderboard.py')
TINY = ['--image-size', '16', '--epochs', '1', '--lr-trials', '0', '--protocols', 'knn', '--device', 'cpu',
        '--amp', 'none', '--quiet', '--cfg-options', 'dataset_options.num_images=240', 'tasks.rotation.batch_size=16',
        'tasks.relloc.batch_size=16', 'monitor.max_images=64', 'monitor.k=5', 'backbone.stem_channels=8',
        'backbone.base_channels=8']


def _owner(attempt: str) -> dict | None:
    try:
        with open(os.path.join(attempt, 'owner.json')) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_two_node_cluster_loses_a_node_during_a_stage_and_the_sweep_completes(tmp_path):
    reason = available()
    if reason:
        pytest.fail(f'the ray extra is part of .[test]: {reason}')
    work_root = tmp_path / 'root'
    stages = work_root / 'stages'
    log = tmp_path / 'driver.log'
    with ray_cluster(head_cpus=1, second_cpus=1) as cluster:
        with open(log, 'w') as handle:
            driver = subprocess.Popen([sys.executable, TOOL, '--tasks', 'rotation,relloc', '--max-len', '2',
                                       '--seeds', '0,1', '--baselines', '', '--work-root', str(work_root),
                                       '--backend', 'ray', '--ray-address', cluster.address, '--cpus-per-stage', '1',
                                       *TINY], cwd=REPO, env=cluster.env, stdout=handle, stderr=subprocess.STDOUT)
        killed = None
        deadline = time.time() + 600
        while killed is None and driver.poll() is None and time.time() < deadline:
            for name in sorted(os.listdir(stages)) if stages.is_dir() else []:
                attempt = os.path.join(stages, name)
                owner = _owner(attempt) if '.attempt-' in name else None
                if owner and cluster.on_second_node(owner['pid']) and not os.path.exists(
                        os.path.join(attempt, 'stage.json')):
                    raylet = cluster.second_raylet()
                    assert raylet, 'the second node has no raylet'
                    os.kill(raylet, signal.SIGKILL)
                    try:   # and the node's stage worker: a lost machine takes its processes along (a worker left
                        os.kill(owner['pid'], signal.SIGKILL)   # alone could finish a tiny stage before noticing
                    except ProcessLookupError:                  # that its raylet is gone; seen on a fast CPU)
                        pass
                    killed = {'stage': name.split('.attempt-')[0], 'owner': owner}
                    break
            time.sleep(0.05)
        assert killed, 'no stage ran on the second node before the sweep ended:\n' + log.read_text()[-3000:]
        code = driver.wait(timeout=max(1, deadline - time.time()))
    output = log.read_text()
    assert code == 0, output[-5000:]
    connection = sqlite3.connect(work_root / 'results.db')
    rows = connection.execute('select ordering, seed, result_json from runs').fetchall()
    connection.close()
    orderings = ['rotation', 'relloc', 'rotation,relloc', 'relloc,rotation']
    assert sorted((r[0], r[1]) for r in rows) == sorted((o, s) for o in orderings for s in (0, 1))
    # each distinct stage trained once: one complete folder per key, no attempt left, and across the stored runs
    # exactly one record per key says "trained" (the others reused it from the cache)
    folders = sorted(os.listdir(stages))
    assert len(folders) == 8 and not [f for f in folders if '.attempt-' in f], folders
    assert all((stages / folder / 'stage.json').is_file() for folder in folders)
    records = [s for r in rows for s in json.loads(r[2])['stages']]
    trained = [s['key'] for s in records if not s['cache_hit']]
    assert sorted(trained) == sorted(f.split('-', 1)[1] for f in folders)
    assert sum(s['cache_hit'] for s in records) == 4
    # the stage the lost node was training was finished by a process of the head node
    final_owner = _owner(os.path.join(stages, killed['stage']))
    assert final_owner['ray_node'] != killed['owner']['ray_node'], (final_owner, killed)
    assert f'key {killed["stage"].split("-", 1)[1]}: trained' in output
    print(f'\nkilled the second node while it trained {killed["stage"]}; finished on node '
          f'{final_owner["ray_node"][:8]}')
