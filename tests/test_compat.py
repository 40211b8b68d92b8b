"""The compatibility layer: trusted engine checkpoints, weights-only user files, the numpy-2 hue fix, quiet one-time
task initialisation."""
from __future__ import annotations

import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from curriculum.compat import (EngineRunner, atomic_torch_save, is_trusted, load_checkpoint_file, load_user_weights,
                               patch_mmcv_adjust_hue)
from curriculum.errors import CheckpointError


def test_engine_checkpoint_with_python_objects_loads_only_while_its_hash_matches(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    payload = {'state_dict': {'w': torch.ones(2)}, 'meta': collections.OrderedDict(note=np.float64(1.5))}
    atomic_torch_save(payload, path)
    assert is_trusted(path)
    assert load_checkpoint_file(path)['meta']['note'] == 1.5
    with open(path, 'ab') as handle:   # tampering breaks the trust
        handle.write(b'x')
    assert not is_trusted(path)
    with pytest.raises(CheckpointError, match='not written by this engine'):
        load_checkpoint_file(path)


def test_foreign_pickle_is_refused_but_plain_weights_load(tmp_path):
    foreign = str(tmp_path / 'foreign.pth')
    torch.save({'meta': np.float64(2.0), 'w': torch.zeros(1)}, foreign)
    with pytest.raises(CheckpointError, match='refusing to unpickle'):
        load_checkpoint_file(foreign)
    plain = str(tmp_path / 'plain.pth')
    torch.save({'w': torch.zeros(3)}, plain)
    assert load_checkpoint_file(plain)['w'].shape == (3,)


def test_user_weights_are_loaded_weights_only_and_normalised(tmp_path):
    path = str(tmp_path / 'imagenet.pth')
    torch.save({'state_dict': {'module.conv1.weight': torch.ones(1), 'backbone.layer1.0.bn1.bias': torch.ones(1),
                               'fc.weight': torch.ones(1), 'fc.bias': torch.ones(1)}}, path)
    assert set(load_user_weights(path)) == {'conv1.weight', 'layer1.0.bn1.bias'}
    pickled = str(tmp_path / 'pickled.pth')
    torch.save({'model': collections.Counter(a=1)}, pickled)
    with pytest.raises(CheckpointError):
        load_user_weights(pickled)
    with pytest.raises(CheckpointError, match='not found'):
        load_user_weights(str(tmp_path / 'missing.pth'))


def test_engine_runner_is_an_mmengine_runner():
    from mmengine.runner import Runner
    assert issubclass(EngineRunner, Runner)


def test_negative_hue_no_longer_overflows_and_matches_the_positive_inverse():
    import mmcv
    patch_mmcv_adjust_hue()
    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8)
    for backend in ('cv2', 'pillow'):
        shifted = mmcv.adjust_hue(image, -0.2, backend=backend)
        assert shifted.shape == image.shape and (shifted != image).any()
        back = mmcv.adjust_hue(shifted, 0.2, backend=backend)
        assert np.abs(back.astype(int) - image.astype(int)).mean() < 6


def test_task_initialisation_prints_no_per_parameter_report_in_a_fresh_process():
    """mmengine dumps one INFO line per parameter when a top-level module initialises. In a fresh interpreter
    (as a study worker starts) the logger is at NOTSET and filters in its handler, which once let the report
    through to stdout; a second call must be a no-op that neither re-initialises nor warns."""
    code = ('import torch\n'
            'from pretext_tasks import build_task\n'
            "task = build_task('rotation', None, {}, 8, 32)\n"
            'task.init_weights()\n'
            'before = {k: v.clone() for k, v in task.state_dict().items()}\n'
            'task.init_weights()\n'
            'assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())\n'
            "print('done')\n")
    proc = subprocess.run([sys.executable, '-W', 'ignore', '-c', code], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == 'done', proc.stdout[:2000]
    assert 'init_weights' not in proc.stderr and 'torch.Size' not in proc.stderr, proc.stderr[:2000]


def test_runner_logger_drops_only_mmengine_file_client_notices():
    import logging

    from curriculum.compat import _not_an_mmengine_deprecation_notice as keep

    def record(message):
        return logging.LogRecord('mmengine', logging.WARNING, __file__, 0, message, None, None)

    assert not keep(record('"FileClient" will be deprecated in future. Please use io functions in ...'))
    assert not keep(record('"HardDiskBackend" is the alias of "LocalBackend" and the former will be deprecated in '
                           'future.'))
    assert keep(record('The config file a.py will be deprecated in the future. Please use b.py instead.'))
    assert keep(record('odc: 40 training images support at most 1 clusters'))
