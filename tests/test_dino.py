"""Tests of the DINO pretext task: lightly's head and loss around our backbone (a ResNet or a vision transformer),
the loss against a direct computation of the paper's formula, centring, the teacher (starts from the loaded backbone,
then follows the student by the cosine EMA), the frozen last layer, the teacher-temperature schedule, the
prototype-count rule, one-line config errors at plan time, side-effect-free validation, a kill-and-resume of its
stage with the backbone-only hand-over, and a short learning run of a ViT on synthetic_derm (the kNN probe rises
above the random initialisation's without a collapse of the teacher; DINO has no pretext accuracy)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

from pretext_tasks.dino import DINOTask, dino_out_dim
from pretext_tasks.registry import build_task, get_task_class

RESNET = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8)
#: a two-block vision transformer with 4 x 4 patches of 8 px at 32 px
VIT = dict(type='VisionTransformer', arch=dict(embed_dims=48, num_layers=2, num_heads=3, feedforward_channels=96),
           img_size=32, patch_size=8)
SIZE = 32


def tiny_task(backbone=RESNET, **cfg) -> DINOTask:
    torch.manual_seed(0)
    cfg = {'batch_size': 8, 'local_crops': 2, **cfg}
    task = build_task('dino', backbone, cfg, 64, SIZE, seed=0)
    task.init_weights()
    task.load_backbone(task.backbone_state())
    return task


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def step(task: DINOTask, wrapper: OptimWrapper, iteration: int, batch: torch.Tensor, epoch: int = 0) -> dict:
    task.set_progress(epoch, iteration)
    return task.train_step({'inputs': {'images': batch, 'indices': torch.arange(len(batch))}}, wrapper)


def adamw(task: DINOTask, lr: float = 1e-3) -> OptimWrapper:
    return OptimWrapper(torch.optim.AdamW(task.parameters(), lr=lr))


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


@pytest.fixture
def max_iters():
    """Publish ``max_iters`` as the Runner does (restored afterwards)."""
    hub = MessageHub.get_current_instance()
    before = hub.get_info('max_iters')
    yield lambda value: hub.update_info('max_iters', value)
    hub.update_info('max_iters', before)


@pytest.mark.parametrize('backbone', [RESNET, VIT], ids=['resnet', 'vit'])
def test_registered_and_built_from_lightlys_head_and_loss_around_our_backbone(backbone):
    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from mmpretrain.models.utils import CosineEMA

    task = tiny_task(backbone)
    assert get_task_class('dino') is DINOTask and not DINOTask.needs_patch_tokens
    assert isinstance(task.head, DINOProjectionHead) and isinstance(task.loss_fn, DINOLoss)
    assert isinstance(task.teacher, CosineEMA)
    assert task.student.backbone is task.backbone and task.student.head is task.head
    assert task.head.layers[0].in_features == task.feature_dim     # ResNet: 64 channels; ViT: its 48-d class token
    assert not any(p.requires_grad for p in task.teacher.parameters())
    assert not set(map(id, task.teacher.parameters())) & set(map(id, task.student.parameters()))
    assert task.out_dim == 2048 and task.local_size == 12         # 64 images → 2048 prototypes; 32 × 96 / 224 → 12


def test_prototype_count_comes_from_the_data():
    assert dino_out_dim(1_281_167) == 65536                        # ImageNet: the paper's 65,536
    assert dino_out_dim(100_000) == 8192 and dino_out_dim(7015) == 2048 and dino_out_dim(1200) == 2048
    assert dino_out_dim(10 ** 9) == 65536 and dino_out_dim(10) == 2048
    assert dino_out_dim(7015, 1000) == 1000


def test_loss_is_the_papers_cross_entropy_between_centred_teacher_and_student():
    """H(P_t, P_s) = - sum softmax((t - c) / tau_t) log softmax(s / tau_s), averaged over the (teacher global view,
    other student view) pairs and the images; the centre then moves to 0.9 c + 0.1 mean(t)."""
    task = tiny_task()
    task.train()
    with torch.no_grad():
        task.loss_fn.center.normal_()
    centre = task.loss_fn.center.clone()
    crops = task.make_inputs(images(), torch.Generator().manual_seed(3))
    with torch.no_grad():
        teacher, student = task.teacher_outputs(crops), task.student_outputs(crops)
        loss = task.loss_fn(teacher, student, teacher_temp=0.04)
    pairs = []
    for i, t in enumerate(teacher):
        p_t = torch.softmax((t - centre[0]) / 0.04, dim=1)
        for j, s in enumerate(student):
            if i != j:
                pairs.append(-(p_t * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean())
    assert len(pairs) == 2 * (2 + 2) - 2
    torch.testing.assert_close(loss, torch.stack(pairs).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(task.loss_fn.center, 0.9 * centre + 0.1 * torch.cat(teacher).mean(0).view(1, 1, -1))


def test_teacher_starts_from_the_loaded_backbone_then_follows_the_cosine_ema(max_iters):
    from pretext_helpers import perturbed_backbone_state

    incoming = perturbed_backbone_state(tiny_task())
    task = tiny_task()
    wrapper = adamw(task)
    task.train()
    step(task, wrapper, 0, images())                 # a step before loading moves the teacher's counter
    task.load_backbone(incoming)
    max_iters(100)
    step(task, wrapper, 1, images(seed=1))           # first update after loading: a copy
    for name, value in task.teacher.module.backbone.named_parameters():   # (its BN statistics move in its forward)
        torch.testing.assert_close(value, incoming[name], msg=name)
    tau = task.teacher.current_tau()
    assert tau == pytest.approx(1 - 0.004 * (np.cos(np.pi / 100) + 1) / 2)   # 0.996 → 1 along a cosine
    before_t, before_s = params(task.teacher.module), params(task.student)
    log = step(task, wrapper, 2, images(seed=2))
    assert float(log['teacher_momentum']) == pytest.approx(tau)
    after_t = params(task.teacher.module)
    for name in before_t:
        torch.testing.assert_close(after_t[name], tau * before_t[name] + (1 - tau) * before_s[name],
                                   atol=1e-6, rtol=1e-5)


def test_the_last_layer_is_frozen_in_the_first_epoch_then_trained():
    task = tiny_task(freeze_last_layer=1)
    wrapper = adamw(task)
    task.train()
    last = task.head.last_layer
    direction = last.parametrizations.weight.original1
    before, mlp = direction.detach().clone(), params(task.head.layers)
    step(task, wrapper, 0, images(), epoch=0)
    assert torch.equal(direction, before)                          # frozen: the optimiser skipped it
    assert not all(torch.equal(value, mlp[name]) for name, value in params(task.head.layers).items())
    step(task, wrapper, 1, images(seed=1), epoch=1)
    assert not torch.equal(direction, before)
    gain = last.parametrizations.weight.original0
    assert not gain.requires_grad and torch.equal(gain, torch.ones_like(gain))   # norm_last_layer: the norm stays 1


def test_teacher_temperature_rises_linearly_over_the_warm_up_epochs():
    task = tiny_task(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    temperatures = []
    for epoch in range(5):
        task.set_progress(epoch, 0)
        temperatures.append(task.current_teacher_temp())
    assert temperatures == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07])


@pytest.mark.parametrize('key, value, message', [
    ('momentum', 1.0, "dino: momentum must be in [0.5, 1) (the teacher's EMA momentum, e.g. 0.996), got 1.0"),
    ('teacher_temp', 0, 'dino: teacher_temp must be a positive number, got 0'),
    ('local_crops', -1, 'dino: local_crops must be an integer >= 0, got -1'),
    ('center_momentum', 1.0, 'dino: center_momentum must be in [0, 1), got 1.0'),
    ('global_scale', [0.5, 0.2], 'dino: global_scale must satisfy 0 < low <= high <= 1, got (0.5, 0.2)'),
    ('local_size', 48, 'dino: local_size 48 exceeds the image size 32'),
    ('norm_last_layer', 'yes', "dino: norm_last_layer must be true or false, got 'yes'"),
    ('out_dim', 0, 'dino: out_dim must be a positive integer, got 0'),
])
def test_a_bad_config_value_is_one_line_at_plan_time(key, value, message):
    from pretext_helpers import assert_bad_config_is_one_line

    assert_bad_config_is_one_line('dino', DINOTask, key, value, message, SIZE, plan_image_size=SIZE)


def test_yaml_recipe_passes_and_names_every_option_the_code_reads():
    from curriculum.plan import task_recipe
    from pretext_tasks.dino import DEFAULTS

    recipe = task_recipe('dino')
    DINOTask.check_config(recipe, SIZE)
    assert set(DEFAULTS) <= set(recipe)
    assert recipe['optimizer']['type'] == 'AdamW' and recipe['clip_grad'] == {'max_norm': 3.0}


def test_validation_is_deterministic_and_side_effect_free():
    task = tiny_task(VIT)
    task.train()
    step(task, adamw(task), 0, images())
    task.set_progress(1, 9)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    batch = images(batch=10, seed=2).numpy()
    first, second = task.validation_score(batch, batch_size=5), task.validation_score(batch, batch_size=5)
    assert first == second and -math.log(task.out_dim) - 1 <= first < 0
    task.evaluation_loss(torch.as_tensor(batch), torch.Generator().manual_seed(0))
    assert task.training and task.iteration == 9
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_stage_resumes_exactly_after_a_kill_and_passes_only_its_backbone(tmp_path):
    from pretext_helpers import assert_stage_resumes_exactly_and_passes_only_its_backbone, resume_stage_config

    cfg = resume_stage_config('dino', local_crops=2, head_hidden=64, bottleneck=32)
    record = assert_stage_resumes_exactly_and_passes_only_its_backbone('dino', cfg, 1e-3, tmp_path)
    # the Runner publishes max_iters: the teacher momentum anneals from 0.996 towards 1 over the stage
    taus = [entry['teacher_momentum'] for entry in record['history']]
    assert 0.996 <= taus[0] < taus[1] < 1.0


# -- learning -----------------------------------------------------------------------------------------------------
def teacher_assignments(task: DINOTask, images_uint8: np.ndarray) -> tuple[float, int]:
    """(mean entropy of the teacher's centred, sharpened distribution, number of distinct prototypes it picks) on
    one global crop of every image: near ln K for the uniform collapse, one prototype for the one-hot collapse."""
    task.eval()
    with torch.no_grad():
        crops = task.make_inputs(torch.as_tensor(images_uint8), torch.Generator().manual_seed(0))
        logits = task.teacher(crops[0])
        p = torch.softmax((logits - task.loss_fn.center[0]) / task.teacher_temp, dim=1)
    task.train()
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
    return entropy, int(p.argmax(1).unique().numel())


#: a 4-block ViT (96-d, patches of 4 px: an 8 x 8 grid at 32 px) on 1,200 images at 32 px: the recipe with 2 local
#: crops, AdamW at the recipe's lr, teacher momentum 0.99 (constant without a Runner; 0.996 barely moves the teacher
#: in the test's 54 iterations). Measured (2026-12-03, seed 0): kNN 0.153 (random init) → 0.183, 0.195, 0.196 after
#: epochs 1-3 (and 0.214 after 6), the loss near ln K (7.62) with 18 of the 2048 prototypes picked on 256 images.
#: With 256 prototypes (the earlier rule) the same run drifted to the uniform collapse (loss → ln 256, kNN +1).
LEARN_VIT = dict(type='VisionTransformer', arch=dict(embed_dims=96, num_layers=4, num_heads=3,
                                                      feedforward_channels=192), img_size=32, patch_size=4)
EPOCHS, LR = 2, 1.25e-4


@pytest.mark.slow
def test_dino_lifts_the_knn_probe_above_random_init_without_collapse_on_synthetic_derm():
    """DINO's loss does not fall in so short a run (the centred teacher starts near uniform and the loss near ln K;
    it falls over hundreds of epochs in the paper): the test asks for what the representation gains, the kNN probe
    above the random initialisation's, and checks that the teacher has not collapsed (one prototype for all images,
    or a uniform output)."""
    from curriculum.plan import task_recipe
    from pretext_helpers import learning_run

    run = learning_run('dino', {**task_recipe('dino'), 'local_crops': 2, 'momentum': 0.99}, EPOCHS, LR,
                       weight_decay=0.04, backbone=LEARN_VIT, size=32, optimizer='adamw', probe_every_epoch=True,
                       init_weights=True)
    losses = [h['loss'] for h in run['history']]
    assert all(np.isfinite(losses))
    assert max(h['knn'] for h in run['history']) >= run['random']['raw'] + 0.02
    entropy, used = teacher_assignments(run['task'], run['images'][run['val_idx']])
    assert entropy < math.log(run['task'].out_dim) - 0.1       # not the uniform collapse
    assert used >= 8                                           # not the one-prototype collapse
