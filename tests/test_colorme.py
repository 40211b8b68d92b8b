"""ColorMe (pretext_tasks.colorme): the sRGB → CIE Lab conversion against known values, the colour histograms,
views without colour jitter, one-line config errors, only the backbone passing on, registration (plan, schema,
tools), side-effect-free validation, the non-finite-loss report, an exact resume after a kill -9 in the middle of
a stage, and learning: the loss falls on synthetic_derm, and the network predicts colour better than the training
mean where colour follows the image content (a generated set; HAM10000 when ../shared/data has it)."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from pretext_tasks import PretextConfigError, build_task, colorme
from pretext_tasks.augment import random_resized_crop
from pretext_tasks.base import build_backbone
from pretext_tasks.colorme import (DEFAULTS, LAB_AB_RANGE, ColorMe, colour_histogram, kl_divergence, rgb_to_lab,
                                   split_colour)

from pretext_helpers import (LEARN_BACKBONE, assert_nan_loss_names_task_epoch_and_iteration,
                             assert_stage_resumes_exactly_and_passes_only_its_backbone,
                             assert_yaml_matches_code_defaults, resume_stage_config, train_task)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'tasks', 'colorme.yaml')
TINY = dict(type='ResNet', depth=18, out_indices=(3,), stem_channels=16, base_channels=16)
HAM10000 = os.path.join(REPO, '..', 'shared', 'data', 'ham10000')


def random_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# -- colour conversion ----------------------------------------------------------------------------------------------
# reference values: CIE 1976 L*a*b* of the sRGB primaries and secondaries under D65 (e.g. skimage.color.rgb2lab,
# Bruce Lindbloom's calculator): red (53.2408, 80.0925, 67.2032), ...
KNOWN_LAB = [
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 0.0), (97.1393, -21.5537, 94.4780)),
    ((1.0, 0.0, 1.0), (60.3242, 98.2343, -60.8249)),
    ((0.0, 1.0, 1.0), (91.1132, -48.0875, -14.1312)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
    ((0.02, 0.02, 0.02), (1.3983, 0.0, 0.0)),       # linear segments of sRGB (<= 0.04045) and of L* (Y <= 0.008856)
]


def test_rgb_to_lab_matches_known_values_batched_in_fp32():
    rgb = torch.tensor([c for c, _ in KNOWN_LAB]).view(-1, 3, 1, 1).expand(-1, 3, 2, 3)   # (10, 3, 2, 3)
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape and lab.dtype == torch.float32
    expected = torch.tensor([v for _, v in KNOWN_LAB]).view(-1, 3, 1, 1).expand_as(lab)
    assert torch.allclose(lab, expected, atol=2e-3), (lab[:, :, 0, 0] - expected[:, :, 0, 0]).abs().max()
    # reduced-precision input is converted in fp32
    assert rgb_to_lab(rgb.to(torch.bfloat16)).dtype == torch.float32


def test_every_srgb_colour_is_inside_the_histogram_ranges():
    grid = torch.linspace(0, 1, 17)
    rgb = torch.stack(torch.meshgrid(grid, grid, grid, indexing='ij')).reshape(3, -1).T.reshape(-1, 3, 1, 1)
    ab = rgb_to_lab(rgb)[:, 1:].flatten(1)
    for channel, (low, high) in enumerate(LAB_AB_RANGE):
        assert low <= float(ab[:, channel].min()) < low + 0.1 and high - 0.1 < float(ab[:, channel].max()) <= high


def test_colour_histogram_counts_each_channel_and_sums_to_one():
    colour = torch.zeros(2, 2, 2, 2)
    colour[0, 0] = torch.tensor([[0.05, 0.15], [0.95, 1.0]])    # channel 0: bins 0, 0, 4, 4 (the top edge → 4)
    colour[0, 1] = torch.tensor([[0.5, 0.5], [-3.0, 0.3]])      # channel 1: bins 2, 2, 0 (clipped), 1
    colour[1] = 0.5
    hist = colour_histogram(colour, 5, ((0.0, 1.0), (0.0, 1.0)))
    assert hist.shape == (2, 10)
    assert hist[0].tolist() == pytest.approx([2 / 8, 0, 0, 0, 2 / 8, 1 / 8, 1 / 8, 2 / 8, 0, 0])
    assert hist[1].tolist() == pytest.approx([0, 0, 0.5, 0, 0, 0, 0, 0.5, 0, 0])
    # the KL divergence of a distribution to itself is 0, to anything else positive
    assert float(kl_divergence(hist, hist.clamp(min=1e-12).log())) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_divergence(hist, torch.full_like(hist, 0.1).log())) > 0


@pytest.mark.parametrize('space', ['lab', 'rgb'])
def test_views_split_one_crop_into_gray_input_and_colour_target_without_colour_jitter(space):
    """The input is the cropped view's luminance (L*/100, or G) replicated to the three channels and normalised as
    any image, and the target is exactly the same view's colour: no jitter or other change comes in between."""
    images = random_images(6)
    task = build_task('colorme', TINY, dict(colour_space=space), 10, 32)
    inputs, colour = task.make_inputs(images, torch.Generator().manual_seed(0))
    # the same crop and flip drawn again from the same generator state: the view before it is split
    x = random_resized_crop(images.permute(0, 3, 1, 2).float() / 255, 32, torch.Generator().manual_seed(0),
                            scale=DEFAULTS['crop_scale'], flip_p=DEFAULTS['flip_p'])
    gray, expected = split_colour(x, space)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225])
    unnormalised = inputs * std.view(1, 3, 1, 1) + mean
    assert inputs.shape == (6, 3, 32, 32) and colour.shape == (6, 2, 32, 32)
    for channel in range(3):
        assert torch.allclose(unnormalised[:, channel:channel + 1], gray, atol=1e-4)
    assert torch.allclose(colour, expected, atol=1e-3)
    if space == 'rgb':
        assert torch.equal(gray, x[:, 1:2]) and torch.equal(expected, x[:, [0, 2]])


def test_crop_and_flip_move_input_and_target_together():
    """An image whose right half is red and left half green, gray-equal: whatever the crop and flip, where the
    target says red the input's luminance must be the red half's (the two stay aligned pixel for pixel)."""
    image = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    image[:, :, 16:] = torch.tensor([200, 40, 40], dtype=torch.uint8)
    image[:, :, :16] = torch.tensor([20, 120, 20], dtype=torch.uint8)
    task = build_task('colorme', TINY, dict(flip_p=0.5), 10, 32)
    inputs, colour = task.make_inputs(image, torch.Generator().manual_seed(3))
    red_l, green_l = (float(rgb_to_lab(torch.tensor(c).view(1, 3, 1, 1) / 255)[0, 0]) / 100
                      for c in ([200, 40, 40], [20, 120, 20]))
    gray = inputs[:, :1] * 0.229 + 0.485
    red = colour[:, 0] > 60          # a* of the red half ~ +60..70, of the green half ~ -60
    green = colour[:, 0] < -40
    assert bool(red.any()) and bool(green.any())
    assert torch.allclose(gray[:, 0][red], torch.full_like(gray[:, 0][red], red_l), atol=0.02)
    assert torch.allclose(gray[:, 0][green], torch.full_like(gray[:, 0][green], green_l), atol=0.02)


# -- the task contract ------------------------------------------------------------------------------------------
def test_yaml_defaults_match_the_code_defaults():
    assert_yaml_matches_code_defaults(CONFIG, DEFAULTS)


BAD = [
    ('colour_space', 'hsv', "colorme: colour_space must be one of ('lab', 'rgb'), got 'hsv'"),
    ('mse_weight', -1, 'colorme: mse_weight must be a non-negative number, got -1'),
    ('kl_weight', 'x', "colorme: kl_weight must be a number, got 'x'"),
    ('kl_weight', float('nan'), 'colorme: kl_weight must be a non-negative number, got nan'),
    ('hist_bins', 1, 'colorme: hist_bins must be at least 2, got 1'),
    ('hist_bins', 0, 'colorme: hist_bins must be a positive integer, got 0'),
    ('decoder_width', 0, 'colorme: decoder_width must be a positive integer, got 0'),
    ('decoder_skips', 'yes', "colorme: decoder_skips must be true or false, got 'yes'"),
    ('crop_scale', [0.0, 1.0], 'colorme: crop_scale must satisfy 0 < low <= high <= 1, got (0.0, 1.0)'),
    ('flip_p', 2, 'colorme: flip_p must be in [0, 1], got 2.0'),
]


@pytest.mark.parametrize('key, value, message', BAD, ids=[f'{k}={v}' for k, v, _ in BAD])
def test_a_bad_config_value_is_one_line_naming_the_key(key, value, message):
    with pytest.raises(PretextConfigError) as info:
        ColorMe.check_config({key: value}, 32)
    assert str(info.value) == message and '\n' not in str(info.value)
    with pytest.raises(PretextConfigError, match='^colorme: '):
        build_task('colorme', TINY, {key: value}, 10, 32)


def test_both_loss_weights_zero_is_rejected_and_the_defaults_pass():
    with pytest.raises(PretextConfigError, match='^colorme: mse_weight and kl_weight are both 0'):
        ColorMe.check_config({'mse_weight': 0, 'kl_weight': 0.0}, 32)
    ColorMe.check_config({}, 32)
    ColorMe.check_config({'kl_weight': 0}, 32)


def test_a_plan_with_a_bad_value_fails_before_anything_runs():
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config

    with pytest.raises((PlanError, PretextConfigError), match='colour_space'):
        build_plan('colorme', load_config(None, {'tasks.colorme.colour_space': 'hsv'}))


def test_registered_planned_and_listed_by_the_tools(capsys):
    from curriculum.plan import build_plan, load_config
    from pretext_tasks.registry import get_task_class, task_names
    from tool_loader import load_tool

    assert get_task_class('colorme') is ColorMe and 'colorme' in task_names()
    plan = build_plan('rotation,colorme', load_config(None, {'tasks.colorme.decoder_width': 32}))
    stage = plan.stages[1]
    assert stage.task == 'colorme' and stage.cfg['decoder_width'] == 32 and stage.cfg['colour_space'] == 'lab'
    budget = load_tool('budget')
    assert budget.parse_args([]).tasks.split(',').count('colorme') == 1
    with pytest.raises(SystemExit):
        budget.parse_args(['--help'])
    assert 'colorme' in capsys.readouterr().out


def test_only_the_backbone_passes_on():
    """Decoder and histogram head stay in the stage: the weights handed on are exactly the configured backbone's
    keys (3-channel stem, whatever the decoder needed from the backbone), they load strictly into a fresh backbone
    and into the next stage's task, and none of the stage's own modules goes with them."""
    images = random_images(16)
    task = build_task('colorme', TINY, {}, len(images), 32)
    train_task(task, images.numpy(), epochs=1, batch_size=8, lr=0.01)
    state = task.backbone_state()
    fresh = build_backbone(TINY)
    assert set(state) == set(fresh.state_dict())
    assert state['conv1.weight'].shape[1] == 3
    own = {k for k in task.state_dict() if not k.startswith('backbone.')}
    assert own and all(k.startswith(('decoder.', 'hist_head.')) for k in own)
    assert fresh.load_state_dict(state, strict=True)
    nxt = build_task('rotation', TINY, {}, 16, 32)
    nxt.load_backbone(state)
    assert torch.equal(nxt.backbone.conv1.weight, state['conv1.weight'])
    # the next stage (a fresh backbone from the same config) sees the usual single last-stage output
    out = nxt.backbone(torch.zeros(2, 3, 32, 32))
    assert len(out) == 1 and out[0].shape[1] == 8 * TINY['base_channels']


def test_decoder_without_skips_works_from_the_last_map_alone():
    task = build_task('colorme', TINY, dict(decoder_skips=False), 10, 64)
    assert len(task.backbone(torch.zeros(2, 3, 64, 64))) == 1
    losses = task.compute_loss(random_images(4, 64), torch.arange(4), torch.Generator().manual_seed(0))
    assert set(losses) == {'loss', 'mse', 'kl', 'color_mae'} and bool(torch.isfinite(losses['loss']))


def test_losses_stay_fp32_when_the_backbone_runs_in_bf16():
    from curriculum.precision import Precision, apply_precision

    task = build_task('colorme', TINY, {}, 10, 32)
    apply_precision(task, task.backbone, Precision('bf16', 'bf16', 'cpu', True, 'test'))
    inputs, colour = task.make_inputs(random_images(4), torch.Generator().manual_seed(0))
    predicted, log_distribution = task.predict(inputs)
    assert colour.dtype == predicted.dtype == log_distribution.dtype == torch.float32
    losses = task.compute_loss(random_images(4), torch.arange(4), torch.Generator().manual_seed(0))
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_validation_score_is_minus_the_colour_error_deterministic_and_side_effect_free():
    images = random_images(12).numpy()
    task = build_task('colorme', TINY, {}, 10, 32)
    task.train()
    task.set_progress(2, 17)
    before = {k: v.clone() for k, v in task.state_dict().items()}
    first = task.validation_score(images, batch_size=5)
    assert first == task.validation_score(images, batch_size=5) and first < 0
    assert task.training and task.iteration == 17
    loss = task.evaluation_loss(torch.as_tensor(images), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and task.training
    assert all(torch.equal(before[k], v) for k, v in task.state_dict().items())


def test_nan_loss_names_task_epoch_and_iteration(monkeypatch):
    images = random_images(16).numpy()
    task = build_task('colorme', TINY, {}, len(images), 32)
    assert_nan_loss_names_task_epoch_and_iteration(task, colorme, monkeypatch, images)


# -- resume after kill -9 ----------------------------------------------------------------------------------------
def test_a_stage_killed_mid_epoch_resumes_exactly_and_hands_on_only_its_backbone(tmp_path):
    """Through the engine (tests/pretext_helpers.py): SIGKILL in the second epoch after the first checkpoint, the
    rerun ends with the uninterrupted run's history and backbone, and backbone.pth holds the backbone alone."""
    record = assert_stage_resumes_exactly_and_passes_only_its_backbone('colorme', resume_stage_config('colorme'),
                                                                        0.01, tmp_path)
    assert {'loss', 'mse', 'kl', 'color_mae'} <= set(record['history'][-1])


# -- learning -----------------------------------------------------------------------------------------------------
def mean_predictor_error(task: ColorMe, train_images: np.ndarray, val_images: np.ndarray) -> float:
    """``color_mae`` on ``val_images`` (the validation score's views) of predicting every pixel's colour as the
    mean colour of the training views: the baseline a colour predictor must beat."""
    with torch.no_grad():
        _, colour = task.make_inputs(torch.as_tensor(train_images), torch.Generator().manual_seed(1))
        mean = colour.mean(dim=(0, 2, 3), keepdim=True)
        total = 0.0
        for start in range(0, len(val_images), 128):
            generator = torch.Generator().manual_seed(12345 + start)   # validation_score's draws
            _, colour = task.make_inputs(torch.as_tensor(val_images[start:start + 128]), generator)
            total += float((colour - mean).abs().mean()) * len(colour)
    return total / len(val_images) * (255.0 if task.colour_space == 'rgb' else 1.0)


def learn(images: np.ndarray, train_idx, val_idx, epochs: int, lr: float = 0.01, **cfg) -> dict:
    torch.manual_seed(0)
    task = build_task('colorme', LEARN_BACKBONE, cfg, len(train_idx), images.shape[1], seed=0)
    mean_error = mean_predictor_error(task, images[train_idx], images[val_idx])
    started = time.perf_counter()
    history = train_task(task, images[train_idx], epochs=epochs, batch_size=64, lr=lr)
    seconds = time.perf_counter() - started
    error = -task.validation_score(images[val_idx])
    print(f'\ncolorme: loss {history[0]["loss"]:.3f} -> {history[-1]["loss"]:.3f}, held-out colour error {error:.2f} '
          f'vs training mean {mean_error:.2f}; {epochs} epochs in {seconds:.0f} s')
    return {'task': task, 'history': history, 'error': error, 'mean_error': mean_error}


def shapes_with_colour(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Generated images whose colour follows their content, not their brightness: on a gray background, a striped
    square is red and a plain square blue, each with a random brightness in one shared range (the luminance of a
    pixel alone does not tell the colour; the texture around it does)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(size).view(1, size, 1)
    cols = torch.arange(size).view(1, 1, size)
    images = (0.35 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)).expand(n, size, size, 3).clone()
    side = size // 2
    for colour, striped in (((0.95, 0.35, 0.35), True), ((0.35, 0.5, 0.95), False)):
        top = torch.randint(0, size - side + 1, (n, 1, 1), generator=g)
        left = torch.randint(0, size - side + 1, (n, 1, 1), generator=g)
        inside = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
        bright = 0.55 + 0.45 * torch.rand(n, 1, 1, generator=g)
        if striped:
            bright = bright * torch.where((rows // 2) % 2 == 0, 1.0, 0.75)
        value = torch.tensor(colour).view(1, 1, 1, 3) * bright.unsqueeze(-1)
        images = torch.where(inside.unsqueeze(-1), value.expand(n, size, size, 3), images)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def test_colorme_predicts_colour_that_follows_the_content_better_than_the_mean():
    images = shapes_with_colour(640)
    run = learn(images, np.arange(512), np.arange(512, 640), epochs=12)
    history = run['history']
    assert history[-1]['loss'] < 0.5 * history[0]['loss']
    assert run['error'] < 0.7 * run['mean_error']


def test_colorme_loss_falls_on_synthetic_derm():
    """synthetic_derm randomises every image's white balance and hue, so its colour is hardly predictable from the
    luminance: after short runs the held-out a*b* error stays at the training-mean predictor's (measured, 32 px,
    512 / 1200 images, 12-25 epochs, lr 0.01-0.03: 5.6-5.9 vs 5.8); the loss falls (the histogram term and the
    colour's mean are learnt) and the prediction must not be worse than the mean."""
    from pretext_helpers import derm_sample

    images, _, train_idx, val_idx = derm_sample(train=512, val=256, size=32)
    run = learn(images, train_idx, val_idx, epochs=12)
    history = run['history']
    assert history[-1]['loss'] < 0.5 * history[0]['loss']
    assert run['error'] < 1.1 * run['mean_error']


@pytest.mark.skipif(not os.path.isfile(os.path.join(HAM10000, 'HAM10000_metadata.csv')),
                    reason='HAM10000 is not in ../shared/data')
def test_colorme_beats_the_mean_colour_on_ham10000():
    """Real dermoscopy: the colour is largely predictable from the luminance (measured, held-out a*b* error after
    12 epochs on 512 images at 32 px: 6.6 vs 9.2 for the training mean in bf16 on an AMD EPYC with AVX-512 BF16; 7.8 vs
    9.2 in fp32 on an AVX2 EPYC, CI 2026-12-04)."""
    from pretext_helpers import derm_sample

    images, _, train_idx, val_idx = derm_sample(train=512, val=256, size=32, dataset='ham10000', data_root=HAM10000)
    run = learn(images, train_idx, val_idx, epochs=12)
    assert run['history'][-1]['loss'] < 0.5 * run['history'][0]['loss']
    assert run['error'] < 0.9 * run['mean_error']


def test_grayscale_detection_sees_one_channel_and_three_equal_channels():
    from curriculum.preflight import is_grayscale

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    assert is_grayscale(grey) and is_grayscale(np.repeat(grey, 3, axis=-1))
    colour = np.repeat(grey, 3, axis=-1)
    colour[2, 3, 4, 1] ^= 1
    assert not is_grayscale(colour)
