"""DINO pretext task (Caron et al., ICCV 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294): self-distillation without labels between a student and a teacher that is an
exponential moving average of the student, on multi-crop views, with centring and sharpening of the teacher's
output against collapse.

Parts: the student is the task's backbone + lightly's ``DINOProjectionHead`` (3-layer MLP with GELU, L2-normalised
bottleneck, weight-normalised last layer of ``out_dim`` prototypes); the teacher is a copy of both that follows
the student by mmpretrain's ``CosineEMA`` (:class:`pretext_tasks.byol.TargetEMA`: the momentum rises from
``momentum`` to 1 along a cosine over the stage's iterations, the paper's schedule); the loss is lightly's
``DINOLoss`` (cross-entropy between the teacher's centred softmax at temperature ``teacher_temp`` and the student's
log-softmax at ``student_temp``, over every (teacher global view, other student view) pair; the centre is a
buffer, an EMA of the teacher's outputs with ``center_momentum``, so it is checkpointed and resumed). The teacher's
temperature rises linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over ``warmup_teacher_temp_epochs``
epochs (per epoch, as in the paper). The last layer of the student's head is frozen for the first
``freeze_last_layer`` epochs (its ``requires_grad`` switched off, so the optimiser skips it, as the paper's
``cancel_gradients_last_layer``).

Views (multi-crop): two global crops at the image size (area ``global_scale``) and ``local_crops`` local crops of
``local_size`` px (``local_scale``), all with flip, colour jitter (0.4, 0.4, 0.2, 0.1) x ``color_strength`` at
p 0.8 and grayscale p 0.2; blur p 1.0 on global view 1, p 0.1 and solarisation p 0.2 on global view 2, blur p 0.5
on the local crops (sigma given for 224 px global / 96 px local crops, scaled to the actual sizes). The teacher sees
the two global crops, the student every crop. ``local_size: null`` → ``image_size x 96 / 224`` rounded to a
multiple of 4 (12 px at 32, 28 px at 64), SwAV's rule.

The image embedding is the backbone's pooled output (:func:`pretext_tasks.base.pool_last`): a vision transformer's
class token (mmpretrain's ``out_type='cls_token'``, DINO's choice) or a ResNet's averaged last map, so DINO runs on
either. Sizes from the data: ``out_dim: null`` → the power of two nearest ``num_images / 16`` within
[2048, 65536] (65536 at ImageNet's 1.28 M images, the paper's; 2048 for HAM10000's 7,015 training images: with 256
prototypes a short run on synthetic_derm drifted to the uniform collapse, see configs/tasks/dino.yaml).
DINO has no pretext accuracy; its pretext metric is the loss, and whether it learns shows in the kNN monitor.

Why lightly's head and loss and not written here: they are the paper's (a port of the authors' code), small, and
usable outside a framework; ``DINOLoss`` takes the teacher temperature per call, so the schedule stays here.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import ClassVar

import torch
import torch.nn as nn

from .augment import colour_distortion, gaussian_blur, normalize, random_resized_crop, solarize, \
    to_float_nchw
from .base import PretextTask, check_crop_scale, config_number, config_positive, pool_last
from .byol import TargetEMA
from .errors import PretextConfigError
from .registry import register_task
from .swav import swav_local_size

#: the code defaults: DINO's ViT-S/16 recipe (main_dino.py's defaults; configs/tasks/dino.yaml adapts them)
DEFAULTS = dict(momentum=0.996, out_dim=None, head_hidden=2048, bottleneck=256, head_batch_norm=False,
                norm_last_layer=True, freeze_last_layer=1, student_temp=0.1, teacher_temp=0.04,
                warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0, center_momentum=0.9,
                global_scale=(0.4, 1.0), local_crops=8, local_size=None, local_scale=(0.05, 0.4),
                color_strength=1.0, batch_size=64)
MIN_OUT_DIM, MAX_OUT_DIM = 2048, 65536


def dino_out_dim(num_images: int, configured: int | None = None) -> int:
    """The number of prototypes: ``configured``, or the power of two nearest ``num_images / 16`` within
    [2048, 65536]."""
    if configured:
        return int(configured)
    power = round(math.log2(max(1.0, num_images / 16)))
    return int(min(MAX_OUT_DIM, max(MIN_OUT_DIM, 2 ** power)))


def dino_view(x: torch.Tensor, size: int, generator: torch.Generator, scale, color_strength: float,
              blur_prob: float, solarize_prob: float, reference_size: int) -> torch.Tensor:
    """One DINO crop per image of ``x`` (float NCHW in [0, 1]): resized crop + flip, colour jitter (0.4, 0.4, 0.2,
    0.1) x ``color_strength`` at p 0.8, grayscale p 0.2, blur at ``blur_prob`` (sigma for ``reference_size`` px
    crops), solarisation at ``solarize_prob``, normalisation."""
    view = random_resized_crop(x, size, generator, scale=scale)
    view = colour_distortion(view, generator, (0.4, 0.4, 0.2, 0.1), color_strength)
    view = gaussian_blur(view, generator, p=blur_prob, reference_size=reference_size)
    if solarize_prob > 0:
        view = solarize(view, generator, p=solarize_prob)
    return normalize(view)


#: name of the weight norm's gain in a last layer (torch.nn.utils.parametrizations.weight_norm)
GAIN = 'parametrizations.weight.original0'


def projection_head(input_dim: int, hidden: int, bottleneck: int, out_dim: int, batch_norm: bool,
                    norm_last_layer: bool) -> nn.Module:
    """lightly's ``DINOProjectionHead`` with its last layer's weight norm moved to torch's parametrization (same
    weights: gain 1, the same directions; the gain trainable only without ``norm_last_layer``). Why: lightly applies
    the deprecated hook-based ``torch.nn.utils.weight_norm``, whose computed ``weight`` attribute cannot be
    deep-copied (torch refuses non-leaf tensors), and the teacher is a deep copy of the student."""
    from lightly.models.modules import DINOProjectionHead

    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        head = DINOProjectionHead(input_dim, hidden, bottleneck, out_dim, batch_norm=batch_norm,
                                  norm_last_layer=norm_last_layer)
        torch.nn.utils.remove_weight_norm(head.last_layer)
    torch.nn.utils.parametrizations.weight_norm(head.last_layer)
    gain = head.last_layer.get_parameter(GAIN)
    with torch.no_grad():
        gain.fill_(1.0)
    gain.requires_grad_(not norm_last_layer)
    return head


class Encoder(nn.Module):
    """Backbone + projection head: ``forward(x)`` = head(pooled backbone output). The student holds the task's own
    backbone object; the teacher is a copy of the whole encoder."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool_last(self.backbone(x)))


@contextlib.contextmanager
def kept_buffers(module: nn.Module):
    """Every buffer of ``module`` restored on exit (the loss centres: a validation loss must not move them)."""
    saved = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


@register_task
class DINOTask(PretextTask):
    """DINO (Caron et al. 2021): student/teacher self-distillation on multi-crop views."""

    name = 'dino'
    #: the code defaults of this class's options (iBOT's class brings its own)
    defaults: ClassVar[dict] = DEFAULTS

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        name = cls.name
        momentum = config_number(name, task_cfg, 'momentum', cls.defaults['momentum'])
        if not 0.5 <= momentum < 1.0:
            raise PretextConfigError(f'{name}: momentum must be in [0.5, 1) (the teacher\'s EMA momentum, e.g. '
                                     f'0.996), got {momentum}')
        for key in ('head_hidden', 'bottleneck', 'batch_size'):
            config_positive(name, task_cfg, key, cls.defaults[key], int)
        if task_cfg.get('out_dim') is not None:
            config_positive(name, task_cfg, 'out_dim', None, int)
        for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
            config_positive(name, task_cfg, key, cls.defaults[key])
        for key in ('warmup_teacher_temp_epochs', 'freeze_last_layer', 'local_crops'):
            value = config_number(name, task_cfg, key, cls.defaults[key], int)
            if value < 0:
                raise PretextConfigError(f'{name}: {key} must be an integer >= 0, got {value}')
        centre = config_number(name, task_cfg, 'center_momentum', cls.defaults['center_momentum'])
        if not 0.0 <= centre < 1.0:
            raise PretextConfigError(f'{name}: center_momentum must be in [0, 1), got {centre}')
        check_crop_scale(name, task_cfg, cls.defaults['global_scale'], 'global_scale')
        check_crop_scale(name, task_cfg, cls.defaults['local_scale'], 'local_scale')
        if task_cfg.get('local_size') is not None:
            local = config_positive(name, task_cfg, 'local_size', None, int)
            if local > image_size:
                raise PretextConfigError(f'{name}: local_size {local} exceeds the image size {image_size}')
        strength = config_number(name, task_cfg, 'color_strength', cls.defaults['color_strength'])
        if not strength >= 0:
            raise PretextConfigError(f'{name}: color_strength must be a number >= 0, got {strength}')
        for key in ('head_batch_norm', 'norm_last_layer'):
            if not isinstance(task_cfg.get(key, cls.defaults[key]), bool):
                raise PretextConfigError(f'{name}: {key} must be true or false, got {task_cfg.get(key)!r}')

    @classmethod
    def backbone_input_sizes(cls, task_cfg: dict, image_size: int) -> list[int]:
        """The global crops at the image size and, with local crops, the local crops' side."""
        local = int(task_cfg.get('local_crops', cls.defaults['local_crops']))
        return [int(image_size)] + ([swav_local_size(image_size, task_cfg.get('local_size'))] if local else [])

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        from lightly.loss import DINOLoss

        d = self.defaults
        self.momentum = float(self.cfg('momentum', d['momentum']))
        self.out_dim = dino_out_dim(self.num_images, self.cfg('out_dim', d['out_dim']))
        self.global_scale = tuple(float(v) for v in self.cfg('global_scale', d['global_scale']))
        self.local_crops = int(self.cfg('local_crops', d['local_crops']))
        self.local_size = swav_local_size(self.image_size, self.cfg('local_size', d['local_size']))
        self.local_scale = tuple(float(v) for v in self.cfg('local_scale', d['local_scale']))
        self.color_strength = float(self.cfg('color_strength', d['color_strength']))
        self.freeze_last_layer = int(self.cfg('freeze_last_layer', d['freeze_last_layer']))
        self.teacher_temp = float(self.cfg('teacher_temp', d['teacher_temp']))
        self.warmup_teacher_temp = float(self.cfg('warmup_teacher_temp', d['warmup_teacher_temp']))
        self.warmup_teacher_temp_epochs = int(self.cfg('warmup_teacher_temp_epochs', d['warmup_teacher_temp_epochs']))
        self.head = projection_head(self.embedding_dim(), int(self.cfg('head_hidden', d['head_hidden'])),
                                    int(self.cfg('bottleneck', d['bottleneck'])), self.out_dim,
                                    bool(self.cfg('head_batch_norm', d['head_batch_norm'])),
                                    bool(self.cfg('norm_last_layer', d['norm_last_layer'])))
        self.student = Encoder(self.backbone, self.head)
        # the teacher: a copy of backbone + head that follows the student (mmengine's EMA gets 1 - momentum)
        self.teacher = TargetEMA(self.student, momentum=1.0 - self.momentum)
        self.loss_fn = DINOLoss(output_dim=self.out_dim, teacher_temp=self.teacher_temp,
                                student_temp=float(self.cfg('student_temp', d['student_temp'])),
                                center_momentum=float(self.cfg('center_momentum', d['center_momentum'])))

    def embedding_dim(self) -> int:
        """Width of the image embedding the head takes (the pooled backbone output)."""
        return self.feature_dim

    # -- the backbone hand-over ------------------------------------------------------------------------------
    def on_backbone_loaded(self) -> None:
        """Start the teacher from the incoming weights (backbone and head copied into the EMA)."""
        self.sync_teacher()

    @torch.no_grad()
    def sync_teacher(self) -> None:
        self.teacher.module.load_state_dict(self.student.state_dict())
        self.teacher.steps.zero_()   # mmengine's EMA copies (not averages) on its first update

    # -- schedules --------------------------------------------------------------------------------------------
    def current_teacher_temp(self) -> float:
        """The teacher's temperature this epoch: linear from ``warmup_teacher_temp`` to ``teacher_temp`` over the
        warm-up epochs, then constant."""
        warmup = self.warmup_teacher_temp_epochs
        if self.epoch >= warmup:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * self.epoch / warmup

    def last_layers(self) -> list[nn.Module]:
        """The heads' last (prototype) layers, frozen for the first ``freeze_last_layer`` epochs."""
        return [self.head.last_layer]

    def set_last_layer_trainable(self) -> None:
        trainable = self.epoch >= self.freeze_last_layer
        for layer in self.last_layers():
            for name, parameter in layer.named_parameters():
                # the weight norm's gain stays fixed when the last layer is normalised (norm_last_layer)
                if name == GAIN and bool(self.cfg('norm_last_layer', self.defaults['norm_last_layer'])):
                    continue
                parameter.requires_grad_(trainable)

    # -- training ---------------------------------------------------------------------------------------------
    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The two global crops, then the local crops of every image."""
        x = to_float_nchw(images)
        s = self.color_strength
        crops = [dino_view(x, self.image_size, generator, self.global_scale, s, 1.0, 0.0, 224),
                 dino_view(x, self.image_size, generator, self.global_scale, s, 0.1, 0.2, 224)]
        crops += [dino_view(x, self.local_size, generator, self.local_scale, s, 0.5, 0.0, 96)
                  for _ in range(self.local_crops)]
        return crops

    def student_outputs(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's head outputs of every crop, one backbone pass per crop size (global, local)."""
        outputs = list(self.student(torch.cat(crops[:2])).chunk(2))
        if len(crops) > 2:
            outputs += list(self.student(torch.cat(crops[2:])).chunk(len(crops) - 2))
        return outputs

    def teacher_outputs(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(self.teacher(torch.cat(crops[:2])).chunk(2))

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        self.set_last_layer_trainable()
        momentum = self.teacher.current_tau()
        self.teacher.update_parameters(self.student)   # after the previous step's update, before this forward
        temperature = self.current_teacher_temp()
        crops = self.make_inputs(images, generator)
        loss = self.loss_fn(self.teacher_outputs(crops), self.student_outputs(crops), teacher_temp=temperature)
        return {'loss': loss, 'teacher_momentum': torch.tensor(momentum, dtype=torch.float64),
                'teacher_temp': torch.tensor(temperature, dtype=torch.float64)}

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The DINO loss of the batch with the modules in eval mode; neither the teacher nor the centre moves."""
        was_training = self.training
        self.eval()
        try:
            with kept_buffers(self.loss_fn):
                crops = self.make_inputs(images, generator)
                return self.loss_fn(self.teacher_outputs(crops), self.student_outputs(crops),
                                    teacher_temp=self.current_teacher_temp())
        finally:
            self.train(was_training)
