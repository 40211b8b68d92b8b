"""Behaviour of the rotation-prediction task: rotation labels match ``torch.rot90``, the flip comes before the
rotation (checked end to end through an oracle backbone), side-effect-free validation, the non-finite-loss report,
YAML defaults, and learning on synthetic_cxr (loss falls, pretext accuracy >= 2x chance, kNN probe beats random
init)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn as nn

from pretext_tasks import PretextConfigError, build_task
from pretext_tasks import rotation
from pretext_tasks.rotation import DEFAULTS, rotate_with_labels

from pretext_helpers import (assert_nan_loss_names_task_epoch_and_iteration,
                             assert_validation_is_deterministic_and_side_effect_free, assert_yaml_matches_code_defaults)

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'tasks', 'rotation.yaml')
TINY_BACKBONE = dict(type='ResNet', depth=18, out_indices=(3,), stem_channels=16, base_channels=16)


def test_all_four_rotations_with_labels_match_rot90():
    x = torch.randn(5, 3, 8, 8)
    rotated, labels = rotate_with_labels(x, 'all')
    assert rotated.shape == (20, 3, 8, 8) and labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 + [3] * 5
    for j in range(20):
        assert torch.equal(rotated[j], torch.rot90(x[j % 5], int(labels[j]), dims=(-2, -1)))
    # a quarter turn is counter-clockwise: the top row becomes the left column
    assert torch.equal(rotated[5, :, :, 0], x[0, :, 0, :].flip(-1))


def test_random_rotation_labels_match_rot90_and_follow_the_generator():
    x = torch.randn(64, 3, 6, 6)
    rotated, labels = rotate_with_labels(x, 'random', torch.Generator().manual_seed(0))
    assert rotated.shape == x.shape and set(labels.tolist()) == {0, 1, 2, 3}
    for i in range(64):
        assert torch.equal(rotated[i], torch.rot90(x[i], int(labels[i]), dims=(-2, -1)))
    again, labels_again = rotate_with_labels(x, 'random', torch.Generator().manual_seed(0))
    assert torch.equal(rotated, again) and torch.equal(labels, labels_again)
    with pytest.raises(PretextConfigError, match='rotation'):
        rotate_with_labels(x, 'some')
    with pytest.raises(PretextConfigError, match='square'):
        rotate_with_labels(torch.zeros(1, 3, 4, 6))


class _EdgeBrightness(nn.Module):
    """Stand-in backbone: mean brightness of the top, left, bottom and right halves as a 1x1 'feature map'."""

    def forward(self, x):
        h, w = x.shape[-2:]
        halves = [x[..., :h // 2, :], x[..., :, :w // 2], x[..., h // 2:, :], x[..., :, w // 2:]]
        return (torch.stack([half.mean(dim=(1, 2, 3)) for half in halves], dim=1)[..., None, None],)


class _Identity(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize('mode', ['all', 'random'])
def test_view_labels_agree_end_to_end_and_the_flip_comes_before_the_rotation(mode):
    """An image bright at the top and dark at the bottom: whatever the crop and (always applied) flip, the bright
    half after rotating by label k is top/left/bottom/right for k = 0/1/2/3. A flip applied AFTER rotating would
    swap left and right for k = 1, 3, so an oracle reading the brightest half must be 100 % right."""
    task = build_task('rotation', TINY_BACKBONE, dict(flip_p=1.0, rotations=mode), 10, 32)
    task.backbone = _EdgeBrightness()
    task.head = _Identity()
    ramp = torch.linspace(255, 0, 32).view(1, 32, 1, 1).expand(16, 32, 32, 3).to(torch.uint8)
    losses = task.compute_loss(ramp, torch.arange(16), torch.Generator().manual_seed(0))
    assert float(losses['pretext_acc']) == 1.0


# -- task contract --------------------------------------------------------------------------------------------
def test_yaml_defaults_match_the_code_defaults():
    assert_yaml_matches_code_defaults(CONFIG, DEFAULTS)


def test_bad_config_is_rejected():
    with pytest.raises(PretextConfigError, match='rotation'):
        build_task('rotation', TINY_BACKBONE, dict(rotations='one'), 10, 32)
    with pytest.raises(PretextConfigError, match='rotation'):
        build_task('rotation', TINY_BACKBONE, dict(crop_scale=[0.0, 1.0]), 10, 32)


def test_validation_score_is_accuracy_deterministic_and_side_effect_free():
    task = build_task('rotation', TINY_BACKBONE, {}, 10, 32)
    images = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    assert_validation_is_deterministic_and_side_effect_free(task, images)


def test_nan_loss_names_task_epoch_and_iteration(monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    task = build_task('rotation', TINY_BACKBONE, {}, len(images), 32)
    assert_nan_loss_names_task_epoch_and_iteration(task, rotation, monkeypatch, images)


# -- learning ---------------------------------------------------------------------------------------------------
def test_rotation_learns_on_synthetic_derm():
    """The dermoscopy generator gives the camera frame an orientation (light from above, rulers mostly at the
    bottom, field of view set low), which rotation prediction learns quickly. Those cues are unrelated to the
    diagnosis, and at this budget the kNN probe stays at chance (measured 0.10-0.15 over 5-30 epochs): the task
    learns, its features do not yet help diagnosis. The kNN evidence is the chest X-ray test below.

    Real dermoscopy behaves the same way (measured 2026-12-01 with ``learning_run('rotation', {}, epochs=E,
    lr=0.05, dataset='ham10000', data_root='../shared/data/ham10000')``, same sample sizes): held-out pretext
    accuracy 0.57 / 0.68 / 0.67 after 5 / 10 / 15 epochs, and the recalibrated kNN probe *falls* from 0.200
    (random init) to 0.170 / 0.154 / 0.153. So the missing kNN gain is a property of the task on skin images (the
    camera frame's orientation is learnable there too), not an artefact of the generator."""
    from pretext_helpers import learning_run

    run = learning_run('rotation', {}, epochs=5, lr=0.05)
    task, history = run['task'], run['history']
    held_out = task.validation_score(run['images'][run['val_idx']])
    print(f'rotation: held-out pretext accuracy {held_out:.3f}')
    assert history[-1]['loss'] < history[0]['loss']
    assert history[-1]['pretext_acc'] >= 2 / 4 and held_out >= 2 / 4  # 2x chance of the 4-way task


def test_rotation_learns_on_synthetic_cxr():
    """Chest X-rays have an anatomical orientation (apices up, heart on the image right, diaphragm down) that is
    tied to what the classes change (heart size, lung bases), the setting the task is meant for."""
    from pretext_helpers import learning_run

    run = learning_run('rotation', {}, epochs=5, lr=0.05, dataset='synthetic_cxr')
    task, history = run['task'], run['history']
    held_out = task.validation_score(run['images'][run['val_idx']])
    print(f'rotation: held-out pretext accuracy {held_out:.3f}')
    assert history[-1]['loss'] < history[0]['loss']
    assert history[-1]['pretext_acc'] >= 2 / 4 and held_out >= 2 / 4
    assert run['trained']['recalibrated'] > run['random']['recalibrated']
