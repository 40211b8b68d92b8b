"""Grad-CAM / ROI-attention analysis: a model that only sees one quadrant, mask alignment, missing masks, the
Shenzhen overlay grid through the CLI, and the CLI's one-line errors."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from benchmarks.attention import (AttentionInputs, analyse, inputs_from_dataset, inputs_from_folder, mean_ci,
                                  roi_score)
from benchmarks.datasets import load_dataset
from benchmarks.metrics import t_quantile
from tool_loader import load_tool, tool_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO, '..', 'shared', 'data')
TOOL = tool_path('attention')


class QuadrantBackbone(nn.Module):
    """mmpretrain-style backbone (forward → tuple of one feature map) that only sees the top-left quadrant."""

    def __init__(self, pool: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        nn.init.constant_(self.conv.weight, 0.1)
        nn.init.constant_(self.conv.bias, 3.0)  # positive on any normalised input
        self.pool = pool

    def forward(self, x):
        fmap = torch.relu(self.conv(x))
        if self.pool > 1:
            fmap = nn.functional.avg_pool2d(fmap, self.pool)
        h, w = fmap.shape[-2:]
        keep = torch.zeros(h, w, device=fmap.device)
        keep[:h // 2, :w // 2] = 1
        return (fmap * keep,)


def quadrant_head() -> nn.Linear:
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
        head.bias.zero_()
    return head


def quadrant_inputs(size: int = 32, count: int = 4) -> tuple[AttentionInputs, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    quadrant = np.zeros((size, size), dtype=bool)
    quadrant[:size // 2, :size // 2] = True
    masks = [quadrant] * (count - 1) + [None]
    names = [f'img{i}.png' for i in range(count)]
    return AttentionInputs(images, masks, names, list(range(count)), 'noise', 'all',
                           labels=np.ones(count, dtype=np.int64)), quadrant


@pytest.mark.parametrize('pool', [1, 4])
def test_scores_follow_the_region_the_model_looks_at(pool):
    inputs, quadrant = quadrant_inputs()
    result = analyse(QuadrantBackbone(pool), quadrant_head(), inputs)
    assert [s['index'] for s in result.scores] == [0, 1, 2]
    assert all(s['predicted'] == 0 for s in result.scores)
    inside = [s['score'] for s in result.scores]
    assert min(inside) > (0.999 if pool == 1 else 0.9)  # bilinear upsampling of a 8×8 map leaks a little
    assert result.missing_masks == [{'index': 3, 'name': 'img3.png'}]

    complement = AttentionInputs(inputs.images, [~quadrant] * 4, inputs.names, inputs.indices, 'noise', 'all')
    outside = analyse(QuadrantBackbone(pool), quadrant_head(), complement)
    assert max(s['score'] for s in outside.scores) < (1e-6 if pool == 1 else 0.1)
    assert np.allclose(inside, [1 - s['score'] for s in outside.scores[:3]], atol=1e-6)
    assert result.mean == pytest.approx(np.mean(inside))
    assert result.ci95[0] <= result.mean <= result.ci95[1]


def test_all_zero_cam_is_skipped_with_its_reason():
    # explaining class 1 (negative weights on non-negative features) gives no positive evidence anywhere
    inputs, _ = quadrant_inputs()
    result = analyse(QuadrantBackbone(4), quadrant_head(), inputs, target='true')
    assert result.scores == [] and result.mean is None and result.ci95 == [None, None]
    assert [s['index'] for s in result.skipped] == [0, 1, 2]
    assert all('all-zero CAM' in s['reason'] for s in result.skipped)
    assert len(result.missing_masks) == 1
    assert roi_score(np.zeros((4, 4)), np.ones((4, 4), bool))[0] is None
    assert roi_score(np.ones((4, 4)), np.zeros((4, 4), bool)) == (None, 'empty mask')


def test_student_t_interval():
    assert t_quantile(0.975, 9) == pytest.approx(2.262, abs=2e-3)
    assert t_quantile(0.975, 1) == pytest.approx(12.706, abs=2e-2)
    mean, ci = mean_ci([0.4, 0.5, 0.6])
    assert mean == pytest.approx(0.5)
    assert ci == pytest.approx([0.5 - 4.303 * 0.1 / np.sqrt(3), 0.5 + 4.303 * 0.1 / np.sqrt(3)], abs=1e-3)
    assert mean_ci([0.5]) == (0.5, [None, None])
    assert mean_ci([0.0, 1.0])[1] == [0.0, 1.0]  # clipped to the score's range


# -- masks resized exactly as their images ----------------------------------------------------------------------
RECTS = [(2, 6, 3, 9), (8, 14, 1, 5), (5, 12, 9, 15), (1, 15, 6, 8), (10, 13, 10, 13), (3, 5, 3, 5)]  # x0 x1 y0 y1


def write_ham_fixture(root: str) -> str:
    """A ham10000-layout folder: 48×32 PNG images with a bright rectangle, 96×64 masks of the same rectangle
    (another native size and aspect), one image without a mask; all images in the test split."""
    os.makedirs(os.path.join(root, 'images'))
    os.makedirs(os.path.join(root, 'masks'))
    meta, split = [], []
    for i, (x0, x1, y0, y1) in enumerate(RECTS):
        image_id = f'ISIC_{i:07d}'
        image = np.full((32, 48, 3), 30, np.uint8)
        image[2 * y0:2 * y1, 3 * x0:3 * x1] = 220
        Image.fromarray(image).save(os.path.join(root, 'images', f'{image_id}.png'))
        if i != 4:
            mask = np.zeros((64, 96), np.uint8)
            mask[4 * y0:4 * y1, 6 * x0:6 * x1] = 255
            Image.fromarray(mask).convert('1').save(os.path.join(root, 'masks', f'{image_id}_segmentation.png'))
        meta.append([f'HAM_{i:07d}', image_id, 'nv'])
        split.append([image_id, 'test'])
    for name, header, rows in (('HAM10000_metadata.csv', ['lesion_id', 'image_id', 'dx'], meta),
                               ('splits.csv', ['image_id', 'split'], split)):
        with open(os.path.join(root, name), 'w', newline='') as handle:
            writer = csv.writer(handle)
            writer.writerow(header)
            writer.writerows(rows)
    return root


def test_masks_align_with_their_images_and_missing_ones_are_reported(tmp_path):
    root = write_ham_fixture(str(tmp_path / 'ham'))
    dataset = load_dataset('ham10000', root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    from_dataset = inputs_from_dataset(dataset, 'test')
    from_folder = inputs_from_folder(os.path.join(root, 'images'), os.path.join(root, 'masks'), 16)
    for inputs in (from_dataset, from_folder):
        assert inputs.names == [f'ISIC_{i:07d}.png' for i in range(len(RECTS))]
        assert inputs.masks[4] is None
        for i, (x0, x1, y0, y1) in enumerate(RECTS):
            bright = inputs.images[i].mean(axis=-1) > 127
            expected = np.zeros((16, 16), bool)
            expected[y0:y1, x0:x1] = True
            assert np.array_equal(bright, expected), i
            if inputs.masks[i] is not None:
                assert inputs.masks[i].shape == (16, 16)
                assert np.array_equal(inputs.masks[i], bright), i
    result = analyse(QuadrantBackbone(1), quadrant_head(), from_dataset)
    assert result.missing_masks == [{'index': 4, 'name': 'ISIC_0000004.png'}]
    assert len(result.scores) + len(result.skipped) == len(RECTS) - 1


# -- the CLI ----------------------------------------------------------------------------------------------------
def shared_path(*parts: str) -> str:
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        if os.environ.get('REQUIRE_SHARED_DATA') == '1':
            pytest.fail(f'shared data not found: {path} (REQUIRE_SHARED_DATA=1)')
        pytest.skip(f'shared data not found: {path}')
    return path


def write_tiny_run(work_dir: str) -> None:
    """A run folder with a tiny fine-tuned ResNet in the engine's finetuned.pth format, and a result.json."""
    from curriculum.compat import atomic_torch_save
    from pretext_tasks.base import build_backbone

    cfg = {'type': 'ResNet', 'depth': 18, 'base_channels': 8, 'stem_channels': 8, 'out_indices': [3]}
    torch.manual_seed(0)
    backbone = build_backbone(cfg)
    head = nn.Linear(64, 2)
    atomic_torch_save({'backbone': backbone.state_dict(), 'head': head.state_dict(), 'backbone_cfg': cfg,
                       'classes': ['normal', 'abnormal']}, os.path.join(work_dir, 'finetuned.pth'))
    with open(os.path.join(work_dir, 'result.json'), 'w') as handle:
        json.dump({'order': ['rotation'], 'dataset': 'synthetic_cxr', 'downstream_dataset': 'synthetic_cxr',
                   'image_size': 64, 'seed': 0, 'downstream': {'finetune': {'balanced_accuracy': 0.5}},
                   'config': {'dataset': 'synthetic_cxr', 'data_root': None}}, handle)


def test_shenzhen_overlay_grid_renders(tmp_path, capsys):
    shenzhen = shared_path('shenzhen_lung_masks_mini')
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    write_tiny_run(str(work_dir))
    tool = load_tool('attention')
    code = tool.main(['--work-dir', str(work_dir), '--data-root', shenzhen, '--masks',
                      os.path.join(shenzhen, 'masks'), '--device', 'cpu', '--grid-images', '4'])
    out = capsys.readouterr().out
    assert code == 0
    assert 'images without a mask: 7' in out
    report = json.loads((work_dir / 'attention' / 'attention.json').read_text())
    assert report['dataset'] == 'shenzhen_lung_masks_mini' and report['num_images'] == 17
    assert len(report['scores']) + len(report['skipped']) == 10
    assert sorted(m['name'] for m in report['missing_masks'])[0] == 'CHNCXR_0185_0.png'
    assert all(0.0 <= s['score'] <= 1.0 for s in report['scores'])
    with Image.open(work_dir / 'attention' / 'attention_grid.png') as grid:
        assert grid.format == 'PNG' and grid.size[1] > grid.size[0] > 300
    result = json.loads((work_dir / 'result.json').read_text())
    assert result['attention']['mean'] == pytest.approx(report['mean'])
    assert result['attention']['dataset'] == 'shenzhen_lung_masks_mini'
    assert result['downstream'] == {'finetune': {'balanced_accuracy': 0.5}}  # the rest is kept


def test_cli_errors_exit_2(tmp_path, capsys):
    missing = tmp_path / 'nowhere'
    proc = subprocess.run([sys.executable, TOOL, '--work-dir', str(missing)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'error: work dir not found: {missing}']

    tool = load_tool('attention')
    assert tool.main(['--work-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'finetuned.pth' in err[0] and '--protocols finetune' in err[0]


def test_attention_keeps_a_result_json_with_nan_metrics_and_leaves_no_temporary_file(tmp_path):
    """The engine writes undefined metrics as NaN; adding the attention summary must keep them (it raised before)."""
    tool = load_tool('attention')
    result = {'order': ['moco'], 'downstream': {'linear': {'balanced_accuracy': 0.5, 'auc': float('nan')}}}
    (tmp_path / 'result.json').write_text(json.dumps(result))
    assert tool.update_result(str(tmp_path), {'mean': 0.4, 'ci': [0.3, 0.5]})
    stored = json.loads((tmp_path / 'result.json').read_text())
    assert math.isnan(stored['downstream']['linear']['auc']) and stored['attention']['mean'] == 0.4
    assert sorted(os.listdir(tmp_path)) == ['result.json']
