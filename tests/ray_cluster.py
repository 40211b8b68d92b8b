"""A throw-away two-node Ray cluster on loopback for tests: ``ray start --head`` and a second ``ray start --address``
with its own resources, each in a session of its own so that it (its raylet, its agents, the workers its raylet
starts) can be found by process group and ended by it, never by name; a worker belongs to the node whose raylet is
its parent. Every port is a free one, the temporary folder is short (Ray's Unix sockets live there, and their paths
are limited to 107 bytes), node death is detected within seconds (health checks every 0.5 s), and the cluster
authenticates with a token of its own."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_NODE_DEATH = {'health_check_initial_delay_ms': 1000, 'health_check_period_ms': 500,
                   'health_check_timeout_ms': 1000, 'health_check_failure_threshold': 4}


def available() -> str | None:
    """None when Ray is installed (a cluster can be started here), else the reason."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return 'ray not installed (pip install -e ".[ray]")'
    if shutil.which('ray', path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', '')) is None:
        return 'the ray command is not on the PATH'
    return None


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(('127.0.0.1', 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def processes_of_group(pgid: int) -> list[int]:
    out = []
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                if os.getpgid(int(name)) == pgid:
                    out.append(int(name))
            except OSError:
                continue
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as handle:
            return handle.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


@dataclass
class Cluster:
    address: str
    head_group: int
    second_group: int
    second_manager_port: int
    env: dict

    def second_raylet(self) -> int | None:
        """The pid of the second node's raylet."""
        for pid in processes_of_group(self.second_group):
            text = cmdline(pid)
            if 'raylet' in text.split(' ')[0] and f'--node_manager_port={self.second_manager_port}' in text:
                return pid
        return None

    def on_second_node(self, pid: int) -> bool:
        """Whether process ``pid`` is a worker of the second node (its raylet started it)."""
        try:
            with open(f'/proc/{pid}/stat') as handle:
                parent = int(handle.read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return parent == self.second_raylet()


def _start(args: list[str], env: dict) -> int:
    """Run ``ray start ...`` in a new session; returns the process group its daemons belong to."""
    ray = os.path.join(os.path.dirname(sys.executable), 'ray')
    process = subprocess.Popen([ray if os.path.exists(ray) else 'ray', 'start', *args], env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate(timeout=180)
    if process.returncode != 0:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise RuntimeError(f'ray start failed: {output[-2000:]}')
    return process.pid


@contextmanager
def ray_cluster(head_cpus: int = 1, second_cpus: int = 1):
    """Yield a :class:`Cluster`; both nodes' processes are killed (by process group) and their folder removed
    afterwards."""
    temp = tempfile.mkdtemp(prefix='ray', dir='/tmp')
    # the cluster's own token (Ray's token authentication; every node, worker and driver gets it from the env)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED='0', OMP_NUM_THREADS='1', RAY_AUTH_MODE='token',
               RAY_AUTH_TOKEN=secrets.token_hex(32),
               PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH', '')) if p))
    memory = str(80 * 1024 * 1024)
    groups = []
    try:
        (port, client, dashboard, agent, agent_grpc, metrics, runtime_env, head_manager, head_objects,
         second_manager, second_objects, agent2, agent2_grpc, metrics2, runtime_env2) = _free_ports(15)
        common = ['--node-ip-address', '127.0.0.1', '--object-store-memory', memory, '--disable-usage-stats',
                  '--temp-dir', temp]
        groups.append(_start(['--head', '--port', str(port), '--num-cpus', str(head_cpus), '--include-dashboard',
                              'false', '--ray-client-server-port', str(client), '--dashboard-port', str(dashboard),
                              '--dashboard-agent-listen-port', str(agent), '--dashboard-agent-grpc-port',
                              str(agent_grpc), '--metrics-export-port', str(metrics), '--runtime-env-agent-port',
                              str(runtime_env), '--node-manager-port', str(head_manager), '--object-manager-port',
                              str(head_objects), '--system-config', json.dumps(FAST_NODE_DEATH), *common], env))
        address = f'127.0.0.1:{port}'
        groups.append(_start(['--address', address, '--num-cpus', str(second_cpus), '--resources',
                              json.dumps({'second_node': 1}), '--node-manager-port', str(second_manager),
                              '--object-manager-port', str(second_objects), '--dashboard-agent-listen-port',
                              str(agent2), '--dashboard-agent-grpc-port', str(agent2_grpc), '--metrics-export-port',
                              str(metrics2), '--runtime-env-agent-port', str(runtime_env2), *common], env))
        yield Cluster(address, groups[0], groups[1], second_manager, env)
    finally:
        for group in reversed(groups):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        while time.time() < deadline and any(processes_of_group(g) for g in groups):
            time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
