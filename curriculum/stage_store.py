"""The stage store: stages under the work root, written through attempt folders so that a reader never sees half a
stage and two writers of one stage leave one valid copy, without locks (a shared file system across machines, NFS
included, needs only the atomic rename of a folder).

A complete stage is ``<work_root>/stages/<task>-<key>/`` with its ``stage.json`` (the layout of every earlier
version). It is trained in an *attempt folder* beside it, ``<task>-<key>.attempt-<time>-<host>-<pid>-<random>``,
whose ``owner.json`` names the writer (machine, process and its start time, Ray node). Once the stage is complete
there, the attempt folder is renamed onto ``<task>-<key>``: the rename publishes the whole folder at once, or fails
because another writer published first, and then the loser removes its copy and reads the winner's.

Before training, :func:`claim` looks at the stage's earlier attempts, and at ``<task>-<key>/`` without
``stage.json`` (where engines before this module trained in place, under a file lock):

* an attempt that holds a complete stage (its writer was killed between ``stage.json`` and the rename) is
  published as it is;
* while one is written by a process alive on this machine, it waits (two commands that need one stage train it
  once);
* the most advanced one whose writer is dead (its process is gone from this machine, its Ray node is dead, it gave
  the attempt up after an error, or an earlier engine trained it in place) is taken over, renamed to the new
  attempt's name: training resumes from its last epoch checkpoint and an interrupted LR trial is run again;
* from one whose writer cannot be judged from here (another machine, no Ray), the newest trusted epoch checkpoint
  is hard-linked (copied where links are not possible) into the new attempt, which leaves that one alone.

Attempts of dead writers are removed when the stage is published.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import sys
import time

from benchmarks.files import write_json_atomic

from .compat import SIDECAR_SUFFIX, is_trusted
from .stage import HISTORY_FILE, STAGE_FILE

OWNER_FILE = 'owner.json'
ATTEMPT_MARK = '.attempt-'
ALIVE, DEAD, UNKNOWN = 'alive', 'dead', 'unknown'
_EPOCH = re.compile(r'^epoch_(\d+)\.pth$')
#: the attempts this process is writing now (an attempt of this process that is not here was given up)
_ACTIVE: set[str] = set()


def is_complete(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, STAGE_FILE))


def _read_json(path: str):
    import json

    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


# -- who writes an attempt, and is that writer alive ------------------------------------------------------------
def _machine() -> str:
    """This machine and process namespace: the boot id and the pid namespace on Linux (processes of another boot
    or container cannot be judged by their pid), else the host name."""
    try:
        with open('/proc/sys/kernel/random/boot_id') as handle:
            boot = handle.read().strip()
        return f'{boot}/{os.readlink("/proc/self/ns/pid")}'
    except OSError:
        return socket.gethostname()


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), None where it cannot be read: with the pid
    it names one process, never a later one that reused the pid."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            return handle.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _process_start(pid) in (started, None)


def _ray():
    """The Ray module when this process is connected to a Ray cluster (a task or a driver), else None."""
    ray = sys.modules.get('ray')
    return ray if ray is not None and ray.is_initialized() else None


def current_owner() -> dict:
    ray = _ray()
    return {'host': socket.gethostname(), 'machine': _machine(), 'pid': os.getpid(),
            'started': _process_start(os.getpid()), 'time': time.time(),
            'ray_node': ray.get_runtime_context().get_node_id() if ray else None}


def _ray_node_alive(node_id: str) -> bool | None:
    ray = _ray()
    if ray is None:
        return None
    try:
        nodes = ray.nodes()
    except Exception:  # noqa: BLE001 (the cluster cannot be asked: judge nothing by it)
        return None
    return next((bool(node.get('Alive')) for node in nodes if node.get('NodeID') == node_id), None)


def _owner_from_name(path: str) -> dict | None:
    """The host and pid written into an attempt folder's name (for a folder whose owner.json was not written
    yet)."""
    rest = os.path.basename(path).split(ATTEMPT_MARK, 1)[-1]
    try:
        head, pid, _ = rest.rsplit('-', 2)
        return {'host': head.split('-', 1)[1], 'pid': int(pid)}
    except (ValueError, IndexError):
        return None


def writer_state(path: str) -> str:
    """ALIVE, DEAD or UNKNOWN: the writer of attempt folder ``path`` (a folder that is gone has no writer)."""
    if not os.path.isdir(path):
        return DEAD
    owner = _read_json(os.path.join(path, OWNER_FILE))
    if not isinstance(owner, dict):
        owner = _owner_from_name(path)
        if owner is None:
            return DEAD
        if owner['host'] != _safe(socket.gethostname()):
            return UNKNOWN
        if owner['pid'] == os.getpid():
            return ALIVE if os.path.abspath(path) in _ACTIVE else DEAD
        return ALIVE if _process_alive(owner['pid'], None) else DEAD
    if owner.get('released'):
        return DEAD
    if owner.get('machine') == _machine():
        if int(owner['pid']) == os.getpid():
            return ALIVE if os.path.abspath(path) in _ACTIVE else DEAD
        return ALIVE if _process_alive(int(owner['pid']), owner.get('started')) else DEAD
    if owner.get('ray_node') and _ray_node_alive(owner['ray_node']) is False:
        return DEAD
    return UNKNOWN


def writer_may_be_alive(stages_dir: str, attempt_name: str | None) -> bool:
    """Whether the writer of attempt ``attempt_name`` (a folder name under ``stages_dir``) may still be at work."""
    if not attempt_name:
        return False
    return writer_state(os.path.join(stages_dir, attempt_name)) != DEAD


# -- attempts -----------------------------------------------------------------------------------------------------
def _safe(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9.]+', '_', text)[:40] or 'host'


def _attempts(final_dir: str) -> list[str]:
    """The attempt folders of the stage ``final_dir`` (oldest name first)."""
    folder, stem = os.path.split(final_dir)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    prefix = stem + ATTEMPT_MARK
    return sorted(os.path.join(folder, name) for name in names if name.startswith(prefix))


def newest_epoch(directory: str) -> int:
    """The newest epoch with a trusted checkpoint in ``directory`` (0: none)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return 0
    epochs = [int(m.group(1)) for m in map(_EPOCH.match, names) if m]
    for epoch in sorted(epochs, reverse=True):
        try:
            if is_trusted(os.path.join(directory, f'epoch_{epoch}.pth')):
                return epoch
        except OSError:   # removed while we looked (its writer keeps two checkpoints)
            continue
    return 0


def _new_attempt_name(final_dir: str) -> str:
    return (f'{final_dir}{ATTEMPT_MARK}{time.time_ns():020d}-{_safe(socket.gethostname())}-{os.getpid()}-'
            f'{secrets.token_hex(3)}')


def _write_owner(path: str) -> None:
    write_json_atomic(os.path.join(path, OWNER_FILE), current_owner())


def release(path: str) -> None:
    """Give an attempt up (its training failed): it stays for a later attempt to take over and resume."""
    _ACTIVE.discard(os.path.abspath(path))
    owner = _read_json(os.path.join(path, OWNER_FILE))
    try:
        write_json_atomic(os.path.join(path, OWNER_FILE), {**(owner if isinstance(owner, dict) else {}),
                                                           'released': True})
    except OSError:
        pass


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _seed_from(source: str, target: str) -> int:
    """Put the newest trusted epoch checkpoint of ``source`` (an attempt another writer may still use) and its
    history into ``target``; returns its epoch (0: nothing usable)."""
    epoch = newest_epoch(source)
    if not epoch:
        return 0
    name = f'epoch_{epoch}.pth'
    try:
        for suffix in ('', SIDECAR_SUFFIX):
            _link_or_copy(os.path.join(source, name + suffix), os.path.join(target, name + suffix))
        if os.path.isfile(os.path.join(source, HISTORY_FILE)):
            shutil.copy2(os.path.join(source, HISTORY_FILE), os.path.join(target, HISTORY_FILE))
    except OSError:   # its writer rotated the checkpoint away meanwhile
        return 0
    if not is_trusted(os.path.join(target, name)):
        return 0
    tmp = os.path.join(target, f'last_checkpoint.{os.getpid()}.tmp')
    with open(tmp, 'w') as handle:
        handle.write(os.path.abspath(os.path.join(target, name)))
    os.replace(tmp, os.path.join(target, 'last_checkpoint'))
    return epoch


def _publish_folder(path: str, final_dir: str) -> bool:
    """Rename the complete folder ``path`` onto ``final_dir``; False when a complete stage is there already (then
    ``path`` is removed). A leftover ``final_dir`` without ``stage.json`` (trained in place by an earlier engine) is
    moved aside first."""
    for _ in range(5):
        try:
            os.rename(path, final_dir)
            return True
        except OSError:
            if is_complete(final_dir):
                shutil.rmtree(path, ignore_errors=True)
                return False
            if not os.path.isdir(path):
                return is_complete(final_dir)
            aside = _new_attempt_name(final_dir)
            try:
                os.rename(final_dir, aside)
                release(aside)
            except OSError:
                time.sleep(0.1)
    raise OSError(f'cannot publish {path} as {final_dir}')


def remove_dead_attempts(final_dir: str) -> None:
    """Remove the attempt folders of stage ``final_dir`` whose writers are dead."""
    for path in _attempts(final_dir):
        if writer_state(path) == DEAD:
            shutil.rmtree(path, ignore_errors=True)


def claim(final_dir: str, poll: float = 2.0, log=None) -> str | None:
    """An attempt folder to train stage ``final_dir`` in (seeded for resume, see the module's docstring), or None
    when the stage is complete (published meanwhile, by this call or another writer)."""
    os.makedirs(os.path.dirname(final_dir), exist_ok=True)
    waited = False
    while True:
        if is_complete(final_dir):
            return None
        states = {path: writer_state(path) for path in _attempts(final_dir)}
        finished = [path for path, state in states.items() if state != ALIVE and is_complete(path)]
        if finished:
            _publish_folder(finished[0], final_dir)
            continue
        if any(state == ALIVE for state in states.values()):
            if log and not waited:
                log(f'{os.path.basename(final_dir)}: another process on this machine is training it; waiting')
            waited = True
            time.sleep(poll)
            continue
        mine = _new_attempt_name(final_dir)
        dead = [path for path, state in states.items() if state == DEAD]
        if os.path.isdir(final_dir):   # trained in place by an earlier engine and interrupted
            dead.append(final_dir)
        taken = False
        for path in sorted(dead, key=newest_epoch, reverse=True):
            try:
                os.rename(path, mine)
                taken = True
                break
            except OSError:   # another writer took it first, or removed it
                continue
        if taken and is_complete(mine):   # a stage published between our look and the rename: put it back
            _publish_folder(mine, final_dir)
            continue
        if not taken:
            os.makedirs(mine)
        _write_owner(mine)
        if not taken:
            for path, state in states.items():
                if state == UNKNOWN and _seed_from(path, mine):
                    break
        # two writers on this machine that claimed at the same moment: the later one yields
        earlier = [path for path in _attempts(final_dir)
                   if path != mine and os.path.basename(path) < os.path.basename(mine) and writer_state(path) == ALIVE]
        if not earlier:
            _ACTIVE.add(os.path.abspath(mine))
            return mine
        release(mine)


def publish(attempt: str, final_dir: str) -> bool:
    """Publish the complete attempt folder; False when another writer's copy was published first (ours is
    removed). Attempts of dead writers are removed either way."""
    published = _publish_folder(attempt, final_dir)
    _ACTIVE.discard(os.path.abspath(attempt))
    remove_dead_attempts(final_dir)
    return published
