"""BYOL pretext task: mmpretrain's ``BYOL`` algorithm (online backbone + NonLinearNeck projector, LatentPredictHead
with a NonLinearNeck predictor and the cosine-similarity loss, a target network that follows the online one by a
cosine-scheduled exponential moving average, mmpretrain's ``CosineEMA`` on mmengine's EMA) around the task's own
backbone, fed with BYOL's two asymmetric views.

The algorithm is built around the task's backbone object (``self.backbone is self.algorithm.backbone``; the state
dict holds it under both prefixes; the target copy lives under ``algorithm.target_net`` and is never passed on).
Loss: mmpretrain's symmetrised ``2 * (l(v1 → v2) + l(v2 → v1))`` with ``CosineSimilarityLoss(shift_factor=1)``,
i.e. ``l = 1 - cos(prediction, target projection)``: exactly the paper's ``||p̄ - z̄'||² = 2 - 2 cos`` summed over
the two directions, 0 when every prediction matches its target and 4 for orthogonal ones. BYOL has no pretext
accuracy (no negatives, no classes): its pretext metric is this loss, and whether it learns shows in the kNN
monitor.

Target momentum: ``momentum`` is BYOL's tau (base 0.99 here; mmengine's EMA gets ``1 - tau``), raised to 1 along a
cosine over the training iterations the Runner publishes (``max_iters``: the stage, or an LR trial). Without a
Runner (a hand-written loop) it stays at the base value. After a parent's backbone is loaded the target restarts
from it (the EMA copies on its first update).

Views: both crop + flip (area ``crop_scale``), colour jitter (0.4, 0.4, 0.2, 0.1) x ``color_strength`` at p 0.8,
grayscale p 0.2; view 1 blurred with p ``blur_probs[0]`` (1.0) and never solarised, view 2 blurred with p
``blur_probs[1]`` (0.1) and solarised with p ``solarize_prob`` (0.2), blur sigma scaled from 224 px.
"""
from __future__ import annotations

from math import cos, pi

import torch
import torch.nn as nn
from mmengine.logging import MessageHub
from mmpretrain.models.utils import CosineEMA

from .augment import colour_distortion, gaussian_blur, normalize, random_resized_crop, solarize, \
    to_float_nchw
from .base import PretextTask, check_crop_scale, check_probabilities, config_number, config_positive
from .errors import PretextConfigError
from .moco import _backbone_outputs
from .registry import register_task

#: the code defaults: BYOL's ImageNet recipe (configs/tasks/byol.yaml adapts them to small images)
DEFAULTS = dict(momentum=0.99, feat_dim=256, batch_size=64, crop_scale=(0.08, 1.0), color_strength=1.0,
                blur_probs=(1.0, 0.1), solarize_prob=0.2)


class TargetEMA(CosineEMA):
    """mmpretrain's ``CosineEMA`` (the momentum rises from its base value to 1 along a cosine over ``max_iters``),
    kept at the base value when no Runner has published ``max_iters`` (CosineEMA would fail on ``None``)."""

    def avg_func(self, averaged_param: torch.Tensor, source_param: torch.Tensor, steps: int) -> None:
        max_iters = MessageHub.get_current_instance().get_info('max_iters')
        if max_iters:
            super().avg_func(averaged_param, source_param, steps)
        else:
            averaged_param.mul_(1 - self.momentum).add_(source_param, alpha=self.momentum)

    def current_tau(self) -> float:
        """The target's momentum (tau = 1 - mmengine's momentum) at the next update."""
        max_iters = MessageHub.get_current_instance().get_info('max_iters')
        if not max_iters:
            return 1.0 - self.momentum
        annealing = (cos(pi * int(self.steps) / float(max_iters)) + 1) / 2
        return 1.0 - (self.end_momentum - (self.end_momentum - self.momentum) * annealing)


def byol_view(x: torch.Tensor, size: int, generator: torch.Generator, scale, color_strength: float,
              blur_prob: float, solarize_prob: float) -> torch.Tensor:
    s = float(color_strength)
    view = random_resized_crop(x, size, generator, scale=scale)
    view = colour_distortion(view, generator, (0.4, 0.4, 0.2, 0.1), s)
    view = gaussian_blur(view, generator, p=blur_prob)
    if solarize_prob > 0:
        view = solarize(view, generator, p=solarize_prob)
    return normalize(view)


@register_task
class BYOLTask(PretextTask):
    """BYOL (Grill et al., NeurIPS 2020) on top of mmpretrain's implementation."""

    name = 'byol'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        momentum = config_number('byol', task_cfg, 'momentum', DEFAULTS['momentum'])
        if not 0.5 <= momentum < 1.0:
            raise PretextConfigError(f'byol: momentum must be in [0.5, 1) (BYOL\'s target tau, e.g. 0.99), '
                                     f'got {momentum}')
        for key in ('feat_dim', 'batch_size'):
            config_positive('byol', task_cfg, key, DEFAULTS[key], int)
        for key in ('neck_hid_channels', 'predictor_hid_channels'):
            if task_cfg.get(key) is not None:
                config_positive('byol', task_cfg, key, None, int)
        check_crop_scale('byol', task_cfg, DEFAULTS['crop_scale'])
        strength = config_number('byol', task_cfg, 'color_strength', DEFAULTS['color_strength'])
        if not strength >= 0:
            raise PretextConfigError(f'byol: color_strength must be a number >= 0, got {strength}')
        blur = task_cfg.get('blur_probs', DEFAULTS['blur_probs'])
        if not (isinstance(blur, (list, tuple)) and len(blur) == 2):
            raise PretextConfigError(f'byol: blur_probs must be two probabilities [view 1, view 2], got {blur!r}')
        check_probabilities('byol', {'blur_probs[0]': blur[0], 'blur_probs[1]': blur[1]}, {},
                            'blur_probs[0]', 'blur_probs[1]')
        check_probabilities('byol', task_cfg, DEFAULTS, 'solarize_prob')

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        import mmpretrain.models  # noqa: F401  (registers BYOL and its parts)
        from mmpretrain.registry import MODELS

        outputs = _backbone_outputs(self.backbone, self.image_size)
        if len(outputs) != 1:
            raise PretextConfigError(f'byol: the backbone must return one feature map (NonLinearNeck takes one), '
                                     f'got {len(outputs)}; set out_indices to a single stage')
        momentum = float(self.cfg('momentum', DEFAULTS['momentum']))
        self.feat_dim = int(self.cfg('feat_dim', DEFAULTS['feat_dim']))
        hidden = int(self.cfg('neck_hid_channels') or 2 * self.feature_dim)
        predictor_hidden = int(self.cfg('predictor_hid_channels') or hidden)
        self.crop_scale = tuple(float(v) for v in self.cfg('crop_scale', DEFAULTS['crop_scale']))
        self.color_strength = float(self.cfg('color_strength', DEFAULTS['color_strength']))
        self.blur_probs = tuple(float(v) for v in self.cfg('blur_probs', DEFAULTS['blur_probs']))
        self.solarize_prob = float(self.cfg('solarize_prob', DEFAULTS['solarize_prob']))
        # the original projector and predictor: fc(bias)-BN-ReLU-fc, no last BN (4096 hidden, 256 out for
        # ResNet-50: the hidden width is twice the backbone's); BN1d instead of SyncBN
        neck = dict(type='NonLinearNeck', in_channels=self.feature_dim, hid_channels=hidden,
                    out_channels=self.feat_dim, num_layers=2, with_bias=True, with_last_bn=False,
                    with_avg_pool=outputs[0].dim() == 4, norm_cfg=dict(type='BN1d'))
        predictor = dict(type='NonLinearNeck', in_channels=self.feat_dim, hid_channels=predictor_hidden,
                         out_channels=self.feat_dim, num_layers=2, with_bias=True, with_last_bn=False,
                         with_avg_pool=False, norm_cfg=dict(type='BN1d'))
        head = dict(type='LatentPredictHead', predictor=predictor,
                    loss=dict(type='CosineSimilarityLoss', shift_factor=1.0, scale_factor=1.0))
        self.algorithm = MODELS.build(dict(type='BYOL', backbone=self.backbone, neck=neck, head=head,
                                           base_momentum=1.0 - momentum))
        assert self.algorithm.backbone is self.backbone
        # the target network: mmpretrain's CosineEMA with a fallback for loops without a Runner (TargetEMA)
        self.algorithm.target_net = TargetEMA(nn.Sequential(self.backbone, self.algorithm.neck),
                                              momentum=1.0 - momentum)

    # -- the backbone hand-over ------------------------------------------------------------------------------
    def on_backbone_loaded(self) -> None:
        """Start the target network from the incoming weights (backbone and projector copied into the EMA)."""
        self.sync_target()

    @torch.no_grad()
    def sync_target(self) -> None:
        online = nn.Sequential(self.algorithm.backbone, self.algorithm.neck)
        self.algorithm.target_net.module.load_state_dict(online.state_dict())
        self.algorithm.target_net.steps.zero_()  # mmengine's EMA copies (not averages) on its first update

    # -- training ---------------------------------------------------------------------------------------------
    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """BYOL's two asymmetric views of every image."""
        x = to_float_nchw(images)
        return [byol_view(x, self.image_size, generator, self.crop_scale, self.color_strength, self.blur_probs[0],
                          0.0),
                byol_view(x, self.image_size, generator, self.crop_scale, self.color_strength, self.blur_probs[1],
                          self.solarize_prob)]

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        tau = self.algorithm.target_net.current_tau()
        loss = self.algorithm.loss(self.make_inputs(images, generator), None)['loss']
        return {'loss': loss, 'target_momentum': torch.tensor(tau, dtype=torch.float64)}

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The BYOL loss of the batch with the modules in eval mode; the target network is not updated."""
        was_training = self.training
        self.eval()
        try:
            view_1, view_2 = self.make_inputs(images, generator)
            algorithm = self.algorithm
            online_1 = algorithm.neck(algorithm.backbone(view_1))[0]
            online_2 = algorithm.neck(algorithm.backbone(view_2))[0]
            target_1 = algorithm.target_net(view_1)[0]
            target_2 = algorithm.target_net(view_2)[0]
            return 2.0 * (algorithm.head.loss(online_1, target_2) + algorithm.head.loss(online_2, target_1))
        finally:
            self.train(was_training)
