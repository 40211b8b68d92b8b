"""The stage store (curriculum/stage_store.py) on hand-made folders: publishing by rename leaves one valid copy
when two writers finish one stage, a reader sees a stage only complete, and a new attempt resumes from what an
earlier one left — taken over from a dead writer (a killed process, a given-up attempt, a stage an earlier engine
trained in place), published when it was complete, waited for while its writer lives on this machine, and only
linked (left alone) when its writer is on another machine."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from curriculum import stage_store
from curriculum.compat import mark_trusted


def _checkpoint(folder, epoch: int, content: bytes = b'weights') -> None:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f'epoch_{epoch}.pth')
    with open(path, 'wb') as handle:
        handle.write(content + bytes([epoch]))
    mark_trusted(path)
    with open(os.path.join(folder, 'last_checkpoint'), 'w') as handle:
        handle.write(path)
    with open(os.path.join(folder, 'history.json'), 'w') as handle:
        json.dump([{'epoch': e} for e in range(epoch + 1)], handle)


def _complete(folder, tag: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'backbone.pth'), 'w') as handle:
        handle.write(tag)
    with open(os.path.join(folder, 'stage.json'), 'w') as handle:
        json.dump({'tag': tag}, handle)


def _attempt(final: str, owner: dict | None, name: str = '00000000000000000001-elsewhere-1-abcdef') -> str:
    path = f'{final}{stage_store.ATTEMPT_MARK}{name}'
    os.makedirs(path)
    if owner is not None:
        with open(os.path.join(path, stage_store.OWNER_FILE), 'w') as handle:
            json.dump(owner, handle)
    return path


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    process.wait()
    return process.pid


def _owner_of(pid: int) -> dict:
    return dict(stage_store.current_owner(), pid=pid, started=stage_store._process_start(pid))  # noqa: SLF001


@pytest.fixture
def final(tmp_path):
    return str(tmp_path / 'stages' / 'rotation-0123456789abcdef')


def test_two_writers_finishing_one_stage_leave_one_valid_copy(final):
    first = _attempt(final, stage_store.current_owner(), '1-a-1-aaaaaa')
    second = _attempt(final, stage_store.current_owner(), '2-a-1-bbbbbb')
    _complete(first, 'first')
    _complete(second, 'second')
    assert not stage_store.is_complete(final)                     # nothing is visible before the rename
    assert stage_store.publish(first, final) is True
    assert stage_store.publish(second, final) is False            # the later one finds the stage there
    with open(os.path.join(final, 'backbone.pth')) as handle:
        assert handle.read() == 'first'
    assert os.listdir(os.path.dirname(final)) == [os.path.basename(final)]


def test_a_dead_writers_attempt_is_taken_over_with_its_checkpoint_and_trials(final):
    dead = _attempt(final, _owner_of(_dead_pid()))
    _checkpoint(dead, 1)
    os.makedirs(os.path.join(dead, 'lr_search', 'trial_0'))
    mine = stage_store.claim(final, poll=0.05)
    assert mine and not os.path.exists(dead)
    assert stage_store.newest_epoch(mine) == 1 and os.path.isdir(os.path.join(mine, 'lr_search', 'trial_0'))
    with open(os.path.join(mine, stage_store.OWNER_FILE)) as handle:
        assert json.load(handle)['pid'] == os.getpid()
    assert stage_store.writer_state(mine) == stage_store.ALIVE
    stage_store.release(mine)                                    # given up after an error: the next one resumes
    assert stage_store.writer_state(mine) == stage_store.DEAD
    again = stage_store.claim(final, poll=0.05)
    assert again != mine and stage_store.newest_epoch(again) == 1 and not os.path.exists(mine)


def test_the_most_advanced_dead_attempt_is_resumed_and_the_others_go_at_publication(final):
    behind = _attempt(final, _owner_of(_dead_pid()), '1-a-1-aaaaaa')
    ahead = _attempt(final, None, f'2-{stage_store._safe(os.uname().nodename)}-{_dead_pid()}-bbbbbb')  # noqa: SLF001
    _checkpoint(behind, 1)
    _checkpoint(ahead, 3)                                        # no owner.json: judged by the name's host and pid
    mine = stage_store.claim(final, poll=0.05)
    assert stage_store.newest_epoch(mine) == 3 and os.path.isdir(behind) and not os.path.exists(ahead)
    _complete(mine, 'mine')
    assert stage_store.publish(mine, final)
    assert os.listdir(os.path.dirname(final)) == [os.path.basename(final)]


def test_a_complete_attempt_of_a_killed_writer_is_published_as_it_is(final):
    dead = _attempt(final, _owner_of(_dead_pid()))
    _complete(dead, 'killed before its rename')
    assert stage_store.claim(final, poll=0.05) is None
    with open(os.path.join(final, 'backbone.pth')) as handle:
        assert handle.read() == 'killed before its rename'


def test_a_stage_an_earlier_engine_trained_in_place_is_resumed(final):
    _checkpoint(final, 2)                                        # <task>-<key>/ without stage.json
    mine = stage_store.claim(final, poll=0.05)
    assert not os.path.exists(final) and stage_store.newest_epoch(mine) == 2
    _complete(mine, 'resumed')
    assert stage_store.publish(mine, final) and stage_store.is_complete(final)


@pytest.mark.parametrize('outcome', ['publishes', 'dies'])
def test_a_writer_alive_on_this_machine_is_waited_for(final, outcome):
    writer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    try:
        live = _attempt(final, _owner_of(writer.pid))
        _checkpoint(live, 1)

        def finish():
            time.sleep(1.0)
            if outcome == 'publishes':
                _complete(live, 'the live writer')
                os.rename(live, final)
            else:
                writer.kill()
                writer.wait()

        helper = threading.Thread(target=finish)
        started = time.time()
        helper.start()
        mine = stage_store.claim(final, poll=0.1)
        helper.join()
        assert time.time() - started >= 0.9
        if outcome == 'publishes':
            assert mine is None and stage_store.is_complete(final)
        else:
            assert stage_store.newest_epoch(mine) == 1 and not os.path.exists(live)
    finally:
        writer.kill()
        writer.wait()


def test_an_attempt_on_another_machine_is_left_alone_and_its_checkpoint_linked(final):
    other = _attempt(final, dict(stage_store.current_owner(), machine='another-machine', pid=1, ray_node=None))
    _checkpoint(other, 4)
    mine = stage_store.claim(final, poll=0.05)
    assert os.path.isdir(other) and stage_store.writer_state(other) == stage_store.UNKNOWN
    assert stage_store.newest_epoch(mine) == 4
    assert os.path.samefile(os.path.join(mine, 'epoch_4.pth'), os.path.join(other, 'epoch_4.pth'))
    with open(os.path.join(mine, 'last_checkpoint')) as handle:
        assert handle.read() == os.path.abspath(os.path.join(mine, 'epoch_4.pth'))
    _complete(mine, 'mine')
    stage_store.publish(mine, final)
    assert os.path.isdir(other)                                  # its writer may still be at work
