"""A new pretext task is one file and one YAML: once its file is imported (a file in pretext_tasks/ is imported
by the package itself), the task is planned, configured, listed in every tool's help and task list, and ordered
by the leaderboard, with nothing else edited."""
from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from tool_loader import load_tool

TASK_FILE = '''
    """A test-only task: predict whether the image was flipped left-right (real enough to train)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pretext_tasks.augment import normalize, to_float_nchw
    from pretext_tasks.base import PretextTask, pool_last
    from pretext_tasks.registry import register_task


    @register_task
    class FlipPrediction(PretextTask):
        name = 'flipdummy'

        def __init__(self, backbone, task_cfg, num_images, image_size, seed=0):
            super().__init__(backbone, task_cfg, num_images, image_size, seed)
            self.head = nn.Linear(self.feature_dim, 2)

        def make_inputs(self, images, generator):
            x = to_float_nchw(images)
            flipped = torch.rand(len(x), generator=generator, device=x.device) < 0.5
            x = torch.where(flipped[:, None, None, None], x.flip(-1), x)
            return normalize(x), flipped.long()

        def compute_loss(self, images, indices, generator):
            x, labels = self.make_inputs(images, generator)
            logits = self.head(pool_last(self.backbone(x)))
            return {'loss': F.cross_entropy(logits, labels)}
'''
RECIPE = 'epochs: 1\nbatch_size: 16\nlr: 0.01\nlr_range: [0.001, 0.1]\noptimizer: {type: SGD, momentum: 0.9}\n'


@pytest.fixture
def new_task(tmp_path):
    from pretext_tasks.registry import TASKS

    (tmp_path / 'flip_dummy.py').write_text(textwrap.dedent(TASK_FILE))
    (tmp_path / 'flip_dummy.yaml').write_text(RECIPE)
    spec = importlib.util.spec_from_file_location('flip_dummy', tmp_path / 'flip_dummy.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['flip_dummy'] = module
    spec.loader.exec_module(module)
    yield 'flipdummy'
    TASKS.pop('flipdummy', None)
    sys.modules.pop('flip_dummy', None)


def test_a_new_task_file_and_yaml_are_all_it_takes(new_task, capsys):
    from curriculum.plan import build_plan, load_config

    plan = build_plan(f'{new_task},rotation', load_config(None, {f'tasks.{new_task}.epochs': 2}))
    assert [stage.task for stage in plan.stages] == [new_task, 'rotation']
    assert plan.stages[0].cfg['epochs'] == 2 and plan.stages[0].cfg['batch_size'] == 16   # its own recipe

    for tool in ('run_curriculum', 'leaderboard', 'budget'):
        with pytest.raises(SystemExit):
            load_tool(tool).parse_args(['--help'])
        assert new_task in capsys.readouterr().out, tool
    benchmark = load_tool('benchmark')
    assert new_task in benchmark.tasks_with_recipes(benchmark.SWEEP_PREFERENCE)
    assert load_tool('budget').parse_args([]).tasks.split(',').count(new_task) == 1

    leaderboard = load_tool('leaderboard')
    jobs = leaderboard.build_jobs(leaderboard.parse_args(['--tasks', f'{new_task},rotation', '--max-len', '2']))
    assert {job['order'] for job in jobs} >= {new_task, f'{new_task},rotation', f'rotation,{new_task}'}


def test_the_new_task_trains_and_exposes_its_inputs(new_task):
    import numpy as np
    import torch

    from pretext_tasks import build_task

    task = build_task(new_task, {'type': 'ResNet', 'depth': 18, 'base_channels': 8, 'out_indices': [3]},
                      {}, 32, 32)
    images = torch.as_tensor(np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    views, labels = task.make_inputs(images, torch.Generator().manual_seed(0))
    assert views.shape == (8, 3, 32, 32) and set(labels.tolist()) <= {0, 1}
