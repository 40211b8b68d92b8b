"""Tests of the SimCLR pretext task: mmpretrain's pieces around our backbone, NT-Xent and the pretext accuracy
against a direct computation, config checks, side-effect-free validation, a kill-and-resume of its stage with the
backbone-only hand-over, and a short learning run on synthetic_derm (loss falls, pretext accuracy far above
chance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mmengine.optim import OptimWrapper

from pretext_tasks.registry import build_task, get_task_class
from pretext_tasks.simclr import SimCLRTask

TINY = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8)
SIZE = 32


def tiny_task(**cfg) -> SimCLRTask:
    torch.manual_seed(0)
    return build_task('simclr', TINY, dict(batch_size=8, **cfg), 64, SIZE, seed=0)


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def test_registered_and_built_from_mmpretrains_simclr_around_our_backbone():
    from mmpretrain.models import SimCLR
    from mmpretrain.models.heads import ContrastiveHead
    from mmpretrain.models.necks import NonLinearNeck

    task = tiny_task()
    assert get_task_class('simclr') is SimCLRTask and not SimCLRTask.needs_groups
    assert isinstance(task.algorithm, SimCLR) and isinstance(task.algorithm.neck, NonLinearNeck)
    assert isinstance(task.algorithm.head, ContrastiveHead)
    assert task.backbone is task.algorithm.backbone
    assert task.algorithm.neck.fc0.in_features == task.feature_dim == 64        # hidden width = the backbone's
    assert len(list(task.parameters())) == len({id(p) for p in task.parameters()})


def test_nt_xent_and_pretext_accuracy_match_a_direct_computation():
    task = tiny_task(temperature=0.3)
    task.eval()   # batch norm from running statistics: the projections below are the ones the loss sees
    batch = images()
    with torch.no_grad():
        views = task.make_inputs(batch, torch.Generator().manual_seed(5))
        loss = task.algorithm.loss(views, None)['loss']
        top1 = float(task.algorithm.head.last_top1)
        z = [torch.nn.functional.normalize(task.algorithm.neck(task.backbone(v))[0], dim=1) for v in views]
    z = torch.cat(z)                                        # rows 0..B-1: first views, B..2B-1: second views
    n = len(batch)
    sim = z @ z.T / 0.3
    sim.fill_diagonal_(float('-inf'))                       # a projection is never its own negative
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    expected = torch.nn.functional.cross_entropy(sim, positive)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    negatives = sim.clone()
    negatives[torch.arange(2 * n), positive] = float('-inf')
    expected_top1 = float((sim[torch.arange(2 * n), positive] > negatives.max(1).values).float().mean())
    assert top1 == pytest.approx(expected_top1)


def test_a_training_step_logs_loss_and_accuracy_and_replays_with_the_same_iteration():
    logs = []
    for _ in range(2):
        task = tiny_task()
        task.train()
        wrapper = OptimWrapper(torch.optim.SGD(task.parameters(), lr=0.05, momentum=0.9))
        task.set_progress(0, 3)
        logs.append(task.train_step({'inputs': {'images': images(), 'indices': torch.arange(8)}}, wrapper))
    assert set(logs[0]) == {'loss', 'pretext_acc'}
    assert 0.0 <= float(logs[0]['pretext_acc']) <= 1.0
    assert float(logs[0]['loss'].detach()) == float(logs[1]['loss'].detach())


@pytest.mark.parametrize('key, value, message', [
    ('temperature', 0, 'simclr: temperature must be a positive number, got 0'),
    ('feat_dim', -1, 'simclr: feat_dim must be a positive integer, got -1'),
    ('color_strength', -0.5, 'simclr: color_strength must be a number >= 0, got -0.5'),
    ('blur_prob', 1.5, 'simclr: blur_prob must be in [0, 1], got 1.5'),
    ('crop_scale', [0.9, 0.2], 'simclr: crop_scale must satisfy 0 < low <= high <= 1, got (0.9, 0.2)'),
])
def test_a_bad_config_value_is_one_line_at_plan_time(key, value, message):
    from pretext_helpers import assert_bad_config_is_one_line

    assert_bad_config_is_one_line('simclr', SimCLRTask, key, value, message, SIZE)


def test_yaml_recipe_passes_and_names_every_option_the_code_reads():
    from curriculum.plan import task_recipe

    recipe = task_recipe('simclr')
    SimCLRTask.check_config(recipe, SIZE)
    for key in ('temperature', 'feat_dim', 'neck_hid_channels', 'crop_scale', 'color_strength', 'blur_prob'):
        assert key in recipe, key


def test_validation_is_deterministic_and_side_effect_free():
    task = tiny_task()
    task.train()
    task.set_progress(1, 9)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    batch = images(batch=10, seed=2).numpy()
    first, second = task.validation_score(batch, batch_size=5), task.validation_score(batch, batch_size=5)
    assert first == second and np.isfinite(first) and first < 0
    task.evaluation_loss(torch.as_tensor(batch), torch.Generator().manual_seed(0))
    assert task.training and task.iteration == 9
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_stage_resumes_exactly_after_a_kill_and_passes_only_its_backbone(tmp_path):
    from pretext_helpers import assert_stage_resumes_exactly_and_passes_only_its_backbone, resume_stage_config

    record = assert_stage_resumes_exactly_and_passes_only_its_backbone(
        'simclr', resume_stage_config('simclr'), 0.05, tmp_path)
    assert all('pretext_acc' in entry for entry in record['history'])


# -- learning -----------------------------------------------------------------------------------------------------
#: the recipe (configs/tasks/simclr.yaml) at 32 px on 1,200 images: 12 epochs of 18 batches of 64
EPOCHS, LR = 12, 0.05


@pytest.mark.slow
def test_simclr_learns_on_synthetic_derm():
    from curriculum.plan import task_recipe
    from pretext_helpers import learning_run

    run = learning_run('simclr', task_recipe('simclr'), EPOCHS, LR, weight_decay=1e-6, size=32)
    history = run['history']
    assert all(np.isfinite(h['loss']) for h in history)
    assert history[-1]['loss'] < history[0]['loss'] - 0.5
    chance = 1.0 / (2 * 64 - 1)            # the positive among the 2B - 1 other projections of the batch
    assert history[-1]['pretext_acc'] > 5 * chance
    assert history[-1]['pretext_acc'] > history[0]['pretext_acc']
    # and the kNN probe (batch norm re-estimated on the clean train images) rises above the random init's
    assert run['trained']['recalibrated'] > run['random']['recalibrated'] + 0.03
