"""Tests of the BYOL pretext task: mmpretrain's pieces around our backbone, the loss against a direct computation,
the target network (starts from the loaded backbone, then follows it by the cosine-scheduled EMA), config checks,
side-effect-free validation, a kill-and-resume of its stage with the backbone-only hand-over, and a short learning
run on synthetic_derm (loss falls clearly without collapsing; BYOL has no pretext accuracy)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.optim import OptimWrapper

from pretext_tasks.byol import BYOLTask, TargetEMA
from pretext_tasks.registry import build_task, get_task_class

TINY = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8)
SIZE = 32


def tiny_task(**cfg) -> BYOLTask:
    torch.manual_seed(0)
    return build_task('byol', TINY, dict(batch_size=8, **cfg), 64, SIZE, seed=0)


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def step(task: BYOLTask, wrapper: OptimWrapper, iteration: int, batch: torch.Tensor) -> dict:
    task.set_progress(0, iteration)
    return task.train_step({'inputs': {'images': batch, 'indices': torch.arange(len(batch))}}, wrapper)


def sgd(task: BYOLTask, lr: float = 0.05) -> OptimWrapper:
    return OptimWrapper(torch.optim.SGD(task.parameters(), lr=lr, momentum=0.9))


def online_params(task: BYOLTask) -> dict[str, torch.Tensor]:
    online = torch.nn.Sequential(task.algorithm.backbone, task.algorithm.neck)
    return {k: v.detach().clone() for k, v in online.named_parameters()}


def target_params(task: BYOLTask) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.algorithm.target_net.module.named_parameters()}


@pytest.fixture
def max_iters():
    """Publish ``max_iters`` as the Runner does (restored afterwards)."""
    hub = MessageHub.get_current_instance()
    before = hub.get_info('max_iters')

    def publish(value):
        hub.update_info('max_iters', value)

    yield publish
    hub.update_info('max_iters', before)


def test_registered_and_built_from_mmpretrains_byol_around_our_backbone():
    from mmpretrain.models import BYOL
    from mmpretrain.models.heads import LatentPredictHead
    from mmpretrain.models.necks import NonLinearNeck
    from mmpretrain.models.utils import CosineEMA

    task = tiny_task()
    assert get_task_class('byol') is BYOLTask
    assert isinstance(task.algorithm, BYOL) and isinstance(task.algorithm.neck, NonLinearNeck)
    assert isinstance(task.algorithm.head, LatentPredictHead)
    assert isinstance(task.algorithm.head.predictor, NonLinearNeck)
    assert isinstance(task.algorithm.target_net, CosineEMA) and isinstance(task.algorithm.target_net, TargetEMA)
    assert task.backbone is task.algorithm.backbone
    assert task.algorithm.neck.fc0.out_features == 2 * task.feature_dim        # hidden = twice the backbone's
    assert not any(p.requires_grad for p in task.algorithm.target_net.parameters())
    assert len(list(task.parameters())) == len({id(p) for p in task.parameters()})


def test_loss_is_the_papers_symmetrised_2_minus_2_cos():
    task = tiny_task()
    batch = images()
    generator = torch.Generator().manual_seed(4)
    loss = task.evaluation_loss(batch, generator)
    task.eval()
    with torch.no_grad():
        view_1, view_2 = task.make_inputs(batch, torch.Generator().manual_seed(4))
        algorithm = task.algorithm

        def predict(view):
            return algorithm.head.predictor([algorithm.neck(task.backbone(view))[0]])[0]

        def cosine(a, b):
            return torch.nn.functional.cosine_similarity(a, b, dim=1)

        p_1, p_2 = predict(view_1), predict(view_2)
        z_1, z_2 = algorithm.target_net(view_1)[0], algorithm.target_net(view_2)[0]
        expected = (2 - 2 * cosine(p_1, z_2)).mean() + (2 - 2 * cosine(p_2, z_1)).mean()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert 0.0 <= float(loss) <= 8.0


def test_target_starts_from_the_loaded_backbone_then_follows_the_cosine_ema(max_iters):
    from pretext_helpers import perturbed_backbone_state

    incoming = perturbed_backbone_state(tiny_task())
    task = tiny_task()
    wrapper = sgd(task)
    task.train()
    step(task, wrapper, 0, images())                 # a step before loading moves the target's counter
    task.load_backbone(incoming)
    for name, value in incoming.items():
        torch.testing.assert_close(task.algorithm.target_net.module[0].state_dict()[name], value, msg=name)

    max_iters(100)
    step(task, wrapper, 1, images(seed=1))           # first update after loading: a copy
    for name, value in task.algorithm.target_net.module[0].named_parameters():
        torch.testing.assert_close(value, incoming[name])
    # then t <- tau t + (1 - tau) o, tau = 1 - 0.01 (cos(pi k / K) + 1) / 2 (k = 1 update so far, K = 100)
    tau = task.algorithm.target_net.current_tau()
    assert tau == pytest.approx(1 - 0.01 * (np.cos(np.pi / 100) + 1) / 2)
    before_t, before_o = target_params(task), online_params(task)
    log = step(task, wrapper, 2, images(seed=2))
    assert float(log['target_momentum']) == pytest.approx(tau)
    after_t = target_params(task)
    for name in before_t:
        torch.testing.assert_close(after_t[name], tau * before_t[name] + (1 - tau) * before_o[name],
                                   atol=1e-6, rtol=1e-5)
    max_iters(None)                                  # no Runner: the base momentum, no annealing
    assert task.algorithm.target_net.current_tau() == pytest.approx(0.99)


@pytest.mark.parametrize('key, value, message', [
    ('momentum', 1.0, "byol: momentum must be in [0.5, 1) (BYOL's target tau, e.g. 0.99), got 1.0"),
    ('feat_dim', 0, 'byol: feat_dim must be a positive integer, got 0'),
    ('blur_probs', [1.0], 'byol: blur_probs must be two probabilities [view 1, view 2], got [1.0]'),
    ('blur_probs', [1.0, 2.0], 'byol: blur_probs[1] must be in [0, 1], got 2.0'),
    ('solarize_prob', -0.1, 'byol: solarize_prob must be in [0, 1], got -0.1'),
])
def test_a_bad_config_value_is_one_line_at_plan_time(key, value, message):
    from pretext_helpers import assert_bad_config_is_one_line

    assert_bad_config_is_one_line('byol', BYOLTask, key, value, message, SIZE)


def test_yaml_recipe_passes_and_names_every_option_the_code_reads():
    from curriculum.plan import task_recipe

    recipe = task_recipe('byol')
    BYOLTask.check_config(recipe, SIZE)
    for key in ('momentum', 'feat_dim', 'neck_hid_channels', 'predictor_hid_channels', 'crop_scale',
                'color_strength', 'blur_probs', 'solarize_prob'):
        assert key in recipe, key


def test_validation_is_deterministic_and_side_effect_free():
    task = tiny_task()
    task.train()
    step(task, sgd(task), 0, images())
    task.set_progress(1, 9)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    batch = images(batch=10, seed=2).numpy()
    first, second = task.validation_score(batch, batch_size=5), task.validation_score(batch, batch_size=5)
    assert first == second and -8.0 <= first <= 0.0
    task.evaluation_loss(torch.as_tensor(batch), torch.Generator().manual_seed(0))
    assert task.training and task.iteration == 9
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_stage_resumes_exactly_after_a_kill_and_passes_only_its_backbone(tmp_path):
    from pretext_helpers import assert_stage_resumes_exactly_and_passes_only_its_backbone, resume_stage_config

    record = assert_stage_resumes_exactly_and_passes_only_its_backbone(
        'byol', resume_stage_config('byol'), 0.05, tmp_path)
    # the Runner publishes max_iters: the target momentum anneals from 0.99 towards 1 over the stage
    taus = [entry['target_momentum'] for entry in record['history']]
    assert 0.99 <= taus[0] < taus[1] < 1.0


# -- learning -----------------------------------------------------------------------------------------------------
#: the recipe (configs/tasks/byol.yaml) at 32 px on 1,200 images: 8 epochs of 18 batches of 64
EPOCHS, LR = 8, 0.05


def projection_spread(task: BYOLTask, images: np.ndarray) -> float:
    """SimSiam's collapse measure: the per-dimension standard deviation of the L2-normalised projections, averaged
    over dimensions, times sqrt(d): about 1 for spread-out outputs, 0 for a collapsed (constant) one."""
    task.eval()
    with torch.no_grad():
        x = torch.as_tensor(images)
        view = task.make_inputs(x, torch.Generator().manual_seed(0))[0]
        z = torch.nn.functional.normalize(task.algorithm.neck(task.backbone(view))[0], dim=1)
    task.train()
    return float(z.std(dim=0).mean() * z.shape[1] ** 0.5)


@pytest.mark.slow
def test_byol_loss_falls_clearly_without_collapse_on_synthetic_derm():
    """BYOL has no accuracy, and at this budget its kNN probe does not rise above the random init's (it dips, as
    measured in configs/tasks/byol.yaml): the test asks for the other criterion, a clear fall of the loss, and
    checks that it is not the fall of a collapse (every image mapped to one point, which also gives a low loss)."""
    from curriculum.plan import task_recipe
    from pretext_helpers import learning_run

    run = learning_run('byol', task_recipe('byol'), EPOCHS, LR, weight_decay=1e-5, size=32)
    history = run['history']
    losses = [h['loss'] for h in history]
    assert all(np.isfinite(losses))
    assert min(losses) < losses[0] - 0.5 and losses[-1] < losses[0] - 0.3
    assert projection_spread(run['task'], run['images'][run['val_idx']]) > 0.3
