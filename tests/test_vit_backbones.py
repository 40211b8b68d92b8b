"""Vision-transformer backbones through the engine: ``--cfg-options backbone.type=VisionTransformer ...`` builds
exactly the ViT it names, every registered task either trains on one (stepped as a stage trains it, hooks included)
or stops when planned with one line naming why, inputs smaller than a patch stop the plan, the pooling rule, the
strict backbone hand-over between ViT stages, the kNN monitor and the linear / kNN / fine-tuning protocols on a ViT,
and attention rollout in place of Grad-CAM (a model whose class token looks at one quadrant, the attention weights
recomputed exactly, the attention tool on a fine-tuned ViT)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.backbones import patch_size_of, pool_output, vision_transformer_of
from curriculum import preflight
from curriculum.errors import PlanError
from curriculum.plan import build_plan, load_config
from pretext_tasks.base import build_backbone, pool_last
from pretext_tasks.registry import task_names

SIZE = 32
ARCH = dict(embed_dims=48, num_layers=2, num_heads=3, feedforward_channels=96)
#: a two-block ViT with a 8 x 8 grid of 4 px patches at 32 px, as the command line gives it
VIT_OPTIONS = {'backbone.type': 'VisionTransformer', 'backbone.arch': ARCH, 'backbone.img_size': SIZE,
               'backbone.patch_size': 4, 'image_size': SIZE}
#: the tasks that cannot use a ViT, with the fragment of their one-line plan error
PLAN_ERRORS = {'colorme': 'colorme: needs convolutional feature maps (N, C, H, W) from the backbone, and '
                          'VisionTransformer returns (N, 48) for 32 px images (a VisionTransformer returns them '
                          'with backbone.out_type=featmap)'}


def vit_plan(order: str, **options):
    return build_plan(order, load_config(None, {**VIT_OPTIONS, **options}))


def test_another_backbone_type_replaces_the_default_backbone_mapping_and_resnet_configs_are_unchanged(tmp_path):
    config = load_config(None, {'backbone.type': 'VisionTransformer', 'backbone.arch': 'deit-tiny',
                                'backbone.img_size': 32, 'backbone.patch_size': 4})
    assert config['backbone'] == {'type': 'VisionTransformer', 'arch': 'deit-tiny', 'img_size': 32, 'patch_size': 4}
    assert load_config(None, {})['backbone'] == {'type': 'ResNet', 'depth': 18, 'out_indices': [3]}
    assert load_config(None, {'backbone.depth': 34})['backbone'] == {'type': 'ResNet', 'depth': 34,
                                                                     'out_indices': [3]}
    assert load_config(None, {'backbone.type': 'ResNet', 'backbone.depth': 50})['backbone']['out_indices'] == [3]
    path = tmp_path / 'vit.yaml'
    path.write_text('backbone: {type: VisionTransformer, arch: deit-tiny}\n')
    assert load_config(str(path), {})['backbone'] == {'type': 'VisionTransformer', 'arch': 'deit-tiny'}
    vit = build_backbone(config['backbone'])
    assert vision_transformer_of(vit) is vit and patch_size_of(vit) == 4
    assert patch_size_of(build_backbone(None)) is None


def test_a_backbone_option_its_class_does_not_take_is_one_line():
    from pretext_tasks.errors import PretextConfigError

    with pytest.raises(PretextConfigError) as info:
        build_backbone({'type': 'VisionTransformer', 'arch': 'deit-tiny', 'depth': 18})
    message = str(info.value)
    assert message.startswith("backbone 'VisionTransformer' cannot be built from") and "'depth'" in message
    assert '\n' not in message


def test_pooling_keeps_a_class_token_averages_maps_and_token_sequences():
    maps, tokens, vector = torch.randn(2, 5, 3, 3), torch.randn(2, 7, 5), torch.randn(2, 5)
    torch.testing.assert_close(pool_output((maps,)), maps.mean(dim=(2, 3)))
    torch.testing.assert_close(pool_output(tokens), tokens.mean(dim=1))
    assert pool_output((torch.zeros(2, 1), vector)) is vector and pool_last((vector,)) is vector


@pytest.mark.parametrize('task', task_names())
def test_every_task_trains_on_a_vit_or_stops_at_plan_time_in_one_line(task):
    """Each registered task stepped twice as a stage trains it (the stage runner's task, loader, optimiser and the
    task's hooks: curriculum.perf.speed.OurTraining) on the ViT; or its plan fails with the one line it should."""
    from curriculum.perf.speed import OurTraining

    plan = vit_plan(task, **{f'tasks.{task}.batch_size': 16})
    if task in PLAN_ERRORS:
        with pytest.raises(PlanError) as info:
            preflight.check_backbone(plan)
        assert str(info.value) == PLAN_ERRORS[task]
        return
    preflight.check_backbone(plan)
    images = np.random.default_rng(0).integers(0, 256, (48, SIZE, SIZE, 3), dtype=np.uint8)
    training = OurTraining(task, images, batch_size=16, amp='none', backbone_cfg=plan.config['backbone'])
    try:
        logs = [training.step() for _ in range(2)]
    finally:
        training.close()
    assert vision_transformer_of(training.task.backbone) is not None
    assert all(np.isfinite(log['loss']) for log in logs)


@pytest.mark.parametrize('order, options, message', [
    ('relloc', {'backbone.img_size': 64, 'backbone.patch_size': 48, 'image_size': 64},
     'relloc: feeds its backbone 32 px inputs, smaller than one 48 px patch of VisionTransformer; use a smaller '
     'backbone.patch_size or larger inputs'),
    ('rotation,dino', {'backbone.patch_size': 16},
     'dino: feeds its backbone 12 px inputs, smaller than one 16 px patch of VisionTransformer; use a smaller '
     'backbone.patch_size or larger inputs'),
    ('swav', {'backbone.patch_size': 16, 'tasks.swav.local_size': 8},
     'swav: feeds its backbone 8 px inputs, smaller than one 16 px patch of VisionTransformer'),
])
def test_inputs_smaller_than_a_patch_stop_the_plan_in_one_line(order, options, message):
    with pytest.raises(PlanError) as info:
        preflight.check_backbone(vit_plan(order, **options))
    assert str(info.value).startswith(message) and '\n' not in str(info.value)
    preflight.check_backbone(vit_plan(order))   # 4 px patches fit every input


def test_a_vit_stage_hands_its_backbone_over_strictly(tmp_path):
    from curriculum.compat import atomic_torch_save
    from curriculum.errors import CheckpointError
    from curriculum.stage import StageInputs, build_stage_task
    from pretext_tasks.errors import PretextConfigError

    images = np.random.default_rng(1).integers(0, 256, (32, SIZE, SIZE, 3), dtype=np.uint8)
    vit_cfg = vit_plan('dino').config['backbone']

    def inputs(backbone_cfg):
        return StageInputs(train_images=images, val_images=images[:8], image_size=SIZE, backbone_cfg=backbone_cfg,
                           seed=0, device='cpu')

    dino = build_stage_task('dino', {'local_crops': 2}, inputs(vit_cfg), None)
    with torch.no_grad():
        dino.backbone.pos_embed.add_(1.0)                        # a trained backbone, unlike any initialisation
    parent = str(tmp_path / 'backbone.pth')
    atomic_torch_save(dino.backbone_state(), parent)
    ibot = build_stage_task('ibot', {'local_crops': 2}, inputs(vit_cfg), parent)
    for name, value in dino.backbone_state().items():
        assert torch.equal(ibot.backbone.state_dict()[name], value), name
    assert 'mask_token' not in dino.backbone_state() and set(ibot.backbone_state()) == set(dino.backbone_state())
    with pytest.raises((PretextConfigError, CheckpointError)) as info:
        build_stage_task('rotation', {}, inputs({'type': 'ResNet', 'depth': 18}), parent)
    assert 'backbone weights do not match the configured backbone' in str(info.value)


def test_monitor_and_downstream_protocols_run_on_a_vit():
    from benchmarks.datasets import load_dataset
    from benchmarks.protocols import evaluate
    from curriculum.monitor import KnnMonitor
    from pretext_tasks.base import initial_backbone

    data = load_dataset('synthetic_derm', None, image_size=SIZE, seed=0,
                        cache_dir=os.environ.get('CURRICULUM_SSL_CACHE'))
    backbone = initial_backbone(vit_plan('dino').config['backbone'], 0)
    score = KnnMonitor.from_dataset(data, max_images=200).score(backbone)
    assert 0.0 <= score <= 1.0
    results = evaluate(backbone, data, ['linear', 'knn', 'finetune'], label_fraction=0.05, seed=0,
                       epochs={'finetune': 1, 'linear': 20})
    for protocol in ('linear', 'knn', 'finetune'):
        assert 0.0 <= results[protocol]['balanced_accuracy'] <= 1.0, protocol
    model = results['finetune']['model']
    assert vision_transformer_of(model.backbone) is not None and model.head.in_features == ARCH['embed_dims']


# -- attention rollout --------------------------------------------------------------------------------------------
def quadrant_vit(scale: float = 20.0) -> tuple[nn.Module, nn.Module]:
    """A one-block ViT (8-d, one head, 4 x 4 patches of 8 px at 32 px) whose tokens are its positional embeddings
    only (zero patch projection): the class token and the top-left quadrant's patches share one direction, the other
    patches another, and the query/key projections are ``scale`` x identity, so the class token attends to the
    quadrant (and itself) alone."""
    backbone = build_backbone(dict(type='VisionTransformer', arch=dict(embed_dims=8, num_layers=1, num_heads=1,
                                                                       feedforward_channels=16),
                                   img_size=SIZE, patch_size=8))
    backbone.eval()
    inside, outside = torch.zeros(8), torch.zeros(8)
    inside[:2] = torch.tensor([1.0, -1.0])
    outside[2:4] = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        backbone.patch_embed.projection.weight.zero_()
        backbone.patch_embed.projection.bias.zero_()
        backbone.cls_token.zero_()
        positions = [inside] + [inside if row < 2 and col < 2 else outside for row in range(4) for col in range(4)]
        backbone.pos_embed.copy_(torch.stack(positions).unsqueeze(0))
        attention = backbone.layers[0].attn
        attention.qkv.weight.zero_()
        attention.qkv.bias.zero_()
        attention.qkv.weight[:8].copy_(torch.eye(8) * scale)
        attention.qkv.weight[8:16].copy_(torch.eye(8) * scale)
        attention.qkv.weight[16:].copy_(torch.eye(8))
    head = nn.Linear(8, 2)
    return backbone, head


def test_rollout_follows_where_the_class_token_attends():
    from benchmarks.attention import AttentionInputs, analyse

    backbone, head = quadrant_vit()
    images = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    quadrant = np.zeros((SIZE, SIZE), dtype=bool)
    quadrant[:SIZE // 2, :SIZE // 2] = True
    inputs = AttentionInputs(images, [quadrant] * 3, ['a', 'b', 'c'], [0, 1, 2], 'noise', 'all')
    result = analyse(backbone, head, inputs)
    assert result.method == 'attention_rollout'
    assert min(s["score"] for s in result.scores) > 0.85   # 0.88: bilinear upsampling of the 4 x 4 grid leaks a little
    uniform, _ = quadrant_vit(scale=0.0)                       # no preference: about the quadrant's area share
    spread = analyse(uniform, head, inputs)
    assert all(abs(s['score'] - 0.25) < 0.05 for s in spread.scores)


def test_recomputed_attention_weights_are_those_the_block_used():
    from benchmarks.attention import _attention_probabilities

    torch.manual_seed(0)
    backbone = build_backbone(dict(type='VisionTransformer', arch=ARCH, img_size=SIZE, patch_size=8))
    backbone.eval()
    attention = backbone.layers[0].attn
    x = torch.randn(2, 17, ARCH['embed_dims'])
    with torch.no_grad():
        weights = _attention_probabilities(attention, x)
        v = attention.qkv(x).reshape(2, 17, 3, 3, 16)[:, :, 2].transpose(1, 2)
        by_hand = attention.proj((weights @ v).transpose(1, 2).reshape(2, 17, ARCH['embed_dims']))
        torch.testing.assert_close(by_hand, attention(x), atol=1e-5, rtol=1e-5)


def test_attention_tool_uses_rollout_for_a_fine_tuned_vit(tmp_path, capsys):
    from curriculum.compat import atomic_torch_save
    from test_attention import write_ham_fixture
    from tool_loader import load_tool

    root = write_ham_fixture(str(tmp_path / 'ham'))
    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    cfg = dict(type='VisionTransformer', arch=ARCH, img_size=16, patch_size=4)
    torch.manual_seed(0)
    atomic_torch_save({'backbone': build_backbone(cfg).state_dict(), 'head': nn.Linear(48, 2).state_dict(),
                       'backbone_cfg': cfg, 'classes': ['nv', 'mel']}, str(work_dir / 'finetuned.pth'))
    code = load_tool('attention').main(['--work-dir', str(work_dir), '--dataset', 'ham10000', '--data-root', root,
                                        '--image-size', '16', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((work_dir / 'attention' / 'attention.json').read_text())
    assert report['method'] == 'attention_rollout' and 'attention rollout' in report['score']
    assert 'attention in ROI (attention_rollout)' in out
    assert all(0.0 <= s['score'] <= 1.0 for s in report['scores']) and len(report['scores']) == 5
