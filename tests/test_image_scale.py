"""A stage's ``image_scale`` (an engine option of every task): the stage decodes its pretext images at the run's
image_size × image_scale (same images, same split), while the monitor and the downstream protocols stay at the
run's size; bad values end at plan time with one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from curriculum.errors import PlanError
from curriculum.plan import build_plan, load_config, stage_image_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, 'tools', 'run_curriculum.py')


def test_stage_image_size_follows_the_scale_and_bad_scales_fail_at_plan_time():
    config = load_config(None, {'image_size': 32, 'tasks.relloc.image_scale': 2})
    relloc, moco = build_plan('relloc,moco', config).stages
    assert stage_image_size(relloc, 32) == 64 and stage_image_size(moco, 32) == 32
    for bad, message in ((0, 'positive integer'), (1.5, 'positive integer'), ('two', 'number'),
                         (64, 'exceeds 1024 px')):
        with pytest.raises(PlanError, match=message):
            build_plan('relloc', load_config(None, {'image_size': 32, 'tasks.relloc.image_scale': bad}))
    # the task's own checks see the scaled side (relloc's patch grid must fit the 64 px crop)
    with pytest.raises(PlanError, match='the crop has 64 px'):
        build_plan('relloc', load_config(None, {'image_size': 32, 'tasks.relloc.image_scale': 2,
                                                'tasks.relloc.patch_frac': 0.4}))


def test_stage_inputs_are_the_same_images_and_split_at_the_scaled_side(tmp_path):
    from curriculum.run import prepare_run, stage_inputs

    config = load_config(None, {'image_size': 32, 'tasks.relloc.image_scale': 2,
                                'dataset_options.num_images': 480, 'lr_search.trials': 0})
    plan = build_plan('relloc,rotation', config)
    work_root = str(tmp_path / 'root')
    ctx = prepare_run(plan, work_root, f'sqlite:///{tmp_path}/results.db', None, None, str(tmp_path / 'run'))
    scaled, plain = (stage_inputs(ctx, stage) for stage in plan.stages)
    assert plain is ctx.inputs and plain.image_size == 32 and plain.train_images.shape[1:3] == (32, 32)
    assert scaled.image_size == 64 and scaled.train_images.shape[1:3] == (64, 64)
    assert len(scaled.train_images) == len(plain.train_images) and len(scaled.val_images) == len(plain.val_images)
    assert stage_inputs(ctx, plan.stages[0]) is scaled  # decoded once per run
    # the same images in the same order: the 64 px copy averaged down to 32 px matches the 32 px decode
    down = scaled.train_images.astype(np.float32).reshape(-1, 32, 2, 32, 2, 3).mean(axis=(2, 4))
    error = np.abs(down - plain.train_images.astype(np.float32)).mean(axis=(1, 2, 3))
    shuffled = np.abs(down - np.roll(plain.train_images, 1, axis=0).astype(np.float32)).mean(axis=(1, 2, 3))
    assert error.mean() < 0.25 * shuffled.mean()


def test_a_scaled_stage_trains_at_its_side_and_is_monitored_at_the_runs(tmp_path):
    args = ['--order', 'relloc', '--image-size', '32', '--epochs', '1', '--lr-trials', '0', '--protocols', 'knn',
            '--quiet', '--work-root', str(tmp_path / 'root'), '--cfg-options', 'dataset_options.num_images=480',
            'tasks.relloc.batch_size=32', 'tasks.relloc.image_scale=2']
    done = subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / 'root' / 'relloc' / 'result.json').read_text())
    stage = result['stages'][0]
    assert result['image_size'] == 32 and stage['image_size'] == 64
    # the monitor's epoch 0 is the run's random initialisation at 32 px, as for an unscaled stage
    plain = subprocess.run([sys.executable, TOOL, *args[:-1], '--order', 'rotation', '--epochs', '1'],
                           capture_output=True, text=True, cwd=REPO, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    other = json.loads((tmp_path / 'root' / 'rotation' / 'result.json').read_text())['stages'][0]
    assert other['image_size'] == 32
    assert stage['monitor']['start'] == pytest.approx(other['monitor']['start'], abs=1e-9)
