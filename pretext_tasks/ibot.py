"""iBOT pretext task (Zhou et al., ICLR 2022, "iBOT: Image BERT Pre-Training with Online Tokenizer",
https://arxiv.org/abs/2111.07832): DINO's self-distillation of the class token across views
(:mod:`pretext_tasks.dino`) plus masked image modelling with the teacher as online tokenizer: the student sees its
global crops with some patches masked (their patch embeddings replaced by a learnable mask token before the
transformer blocks) and predicts, at every masked position, the teacher's output for that patch of the unmasked
crop.

Loss = ``L_[CLS]`` + ``L_MIM`` (the paper's weights 1 and 1): ``L_[CLS]`` is DINO's (lightly's ``DINOLoss`` on the
class tokens through the head: both global crops and the local crops of the student against the teacher's two global
crops); ``L_MIM`` is lightly's ``IBOTPatchLoss`` (cross-entropy between the teacher's centred, sharpened patch
outputs and the student's, averaged over the masked patches of each image, then over the images of both global
crops: the paper's per-view mean, averaged over the two views). Its centre is an EMA of the teacher's outputs at the
masked positions (the paper's is over all positions; masked positions are drawn independently of the image, so this
is an unbiased estimate of the same mean). The patch outputs go through the same projection head as the class token
(``shared_head: true``, the paper's ViT-S/B choice), or through a second head of the same shape.

Masks (:func:`pretext_tasks.vit.block_masks`): per global crop and image, with probability ``mask_probability``
(0.5: the paper's prediction ratio drawn from {0, 0.3 ± 0.2}) a block-wise mask covering a share uniform in
``mask_ratio`` ([0.1, 0.5]) of the patches; ``mask_shape: random`` masks single random patches instead. The blocks'
smallest size scales BEiT's 16 of 196 patches to the patch grid (5 patches on an 8 x 8 grid).

iBOT needs a vision transformer (mmpretrain's ``VisionTransformer``): a ResNet has no patch tokens, and the run
stops when it is planned. The mask token belongs to the stage, not to the backbone that is passed on. The student's
and teacher's tokens come from :func:`pretext_tasks.vit.vit_tokens`, through the backbone's own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .base import check_probabilities
from .dino import DEFAULTS as DINO_DEFAULTS
from .dino import DINOTask, kept_buffers, projection_head
from .errors import PretextConfigError
from .registry import register_task
from .vit import MASK_SHAPES, block_masks, require_vision_transformer, vit_tokens

#: iBOT's additions to DINO's defaults (ViT-S/16 recipe: main_ibot.py), for configs/tasks/ibot.yaml to adapt
DEFAULTS = dict(DINO_DEFAULTS, local_crops=10, global_scale=(0.14, 1.0), teacher_temp=0.07,
                warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30, shared_head=True, mask_probability=0.5,
                mask_ratio=(0.1, 0.5), mask_shape='block', mask_min_block=None, patch_loss_weight=1.0)


@register_task
class IBOTTask(DINOTask):
    """iBOT (Zhou et al. 2022): DINO on the class token + masked-patch self-distillation on the patch tokens."""

    name = 'ibot'
    needs_patch_tokens = True
    defaults = DEFAULTS

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        check_probabilities(cls.name, task_cfg, DEFAULTS, 'mask_probability')
        ratio = task_cfg.get('mask_ratio', DEFAULTS['mask_ratio'])
        try:
            low, high = (float(v) for v in ratio)
        except (TypeError, ValueError):
            raise PretextConfigError(f'{cls.name}: mask_ratio must be two numbers [low, high], got {ratio!r}') \
                from None
        if not 0 <= low <= high <= 1:
            raise PretextConfigError(f'{cls.name}: mask_ratio must satisfy 0 <= low <= high <= 1, got {(low, high)}')
        if task_cfg.get('mask_shape', DEFAULTS['mask_shape']) not in MASK_SHAPES:
            raise PretextConfigError(f'{cls.name}: mask_shape must be one of {MASK_SHAPES}, got '
                                     f'{task_cfg.get("mask_shape")!r}')
        if task_cfg.get('mask_min_block') is not None:
            value = task_cfg['mask_min_block']
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PretextConfigError(f'{cls.name}: mask_min_block must be null or a positive integer, got '
                                         f'{value!r}')
        if not isinstance(task_cfg.get('shared_head', DEFAULTS['shared_head']), bool):
            raise PretextConfigError(f'{cls.name}: shared_head must be true or false, got '
                                     f'{task_cfg.get("shared_head")!r}')
        weight = task_cfg.get('patch_loss_weight', DEFAULTS['patch_loss_weight'])
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise PretextConfigError(f'{cls.name}: patch_loss_weight must be a number >= 0, got {weight!r}')

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        from lightly.loss import IBOTPatchLoss

        d = self.defaults
        vit = require_vision_transformer(self.backbone, self.name)
        self.mask_probability = float(self.cfg('mask_probability', d['mask_probability']))
        self.mask_ratio = tuple(float(v) for v in self.cfg('mask_ratio', d['mask_ratio']))
        self.mask_shape = str(self.cfg('mask_shape', d['mask_shape']))
        self.mask_min_block = self.cfg('mask_min_block', d['mask_min_block'])
        self.patch_loss_weight = float(self.cfg('patch_loss_weight', d['patch_loss_weight']))
        self.mask_token = nn.Parameter(torch.zeros(vit.embed_dims))   # iBOT's masked_embed, zero-initialised
        self.grid = self.patch_grid()
        if self.grid[0] * self.grid[1] < 4:
            raise PretextConfigError(f'{self.name}: {self.image_size} px images make a {self.grid[0]}x{self.grid[1]} '
                                     f'patch grid; masked-patch prediction needs at least 4 patches (use a smaller '
                                     f'backbone.patch_size)')
        if bool(self.cfg('shared_head', d['shared_head'])):
            self.patch_head = self.head
        else:
            self.patch_head = projection_head(self.embedding_dim(), int(self.cfg('head_hidden', d['head_hidden'])),
                                              int(self.cfg('bottleneck', d['bottleneck'])), self.out_dim,
                                              bool(self.cfg('head_batch_norm', d['head_batch_norm'])),
                                              bool(self.cfg('norm_last_layer', d['norm_last_layer'])))
            # the teacher follows both heads: rebuilt around the student with its patch head
            self.student.patch_head = self.patch_head
            self.teacher = type(self.teacher)(self.student, momentum=1.0 - self.momentum)
        self.patch_loss_fn = IBOTPatchLoss(output_dim=self.out_dim, teacher_temp=self.teacher_temp,
                                           student_temp=float(self.cfg('student_temp', d['student_temp'])),
                                           center_momentum=float(self.cfg('center_momentum', d['center_momentum'])))

    def embedding_dim(self) -> int:
        """The token width (the class token and the patch tokens share it)."""
        return int(require_vision_transformer(self.backbone, self.name).embed_dims)

    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the patch grid of an ``image_size`` px image."""
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                _, _, grid = vit_tokens(self.backbone, torch.zeros(1, 3, self.image_size, self.image_size))
        finally:
            self.backbone.train(was_training)
        return grid

    def last_layers(self) -> list[nn.Module]:
        layers = [self.head.last_layer]
        return layers if self.patch_head is self.head else layers + [self.patch_head.last_layer]

    def teacher_patch_head(self) -> nn.Module:
        module = self.teacher.module
        return module.head if self.patch_head is self.head else module.patch_head

    # -- masks and tokens ------------------------------------------------------------------------------------
    def draw_masks(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Bool ``(batch, rows, columns)`` masks of one global crop of every image."""
        return block_masks(batch, self.grid[0], self.grid[1], generator, self.mask_ratio, self.mask_probability,
                           self.mask_min_block, shape=self.mask_shape)

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator):
        """DINO's crops (two global, then the local ones) and the masks of the two global crops ``(2B, rows,
        columns)``, in the order the student's batch stacks them."""
        crops = super().make_inputs(images, generator)
        masks = torch.cat([self.draw_masks(images.shape[0], generator) for _ in range(2)])
        return crops, masks

    def losses(self, crops: list[torch.Tensor], masks: torch.Tensor) -> dict[str, torch.Tensor]:
        temperature = self.current_teacher_temp()
        student_cls, student_patches, _ = vit_tokens(self.backbone, torch.cat(crops[:2]), masks, self.mask_token)
        student_out = list(self.head(student_cls).chunk(2))
        if len(crops) > 2:
            local_cls, _, _ = vit_tokens(self.backbone, torch.cat(crops[2:]))
            student_out += list(self.head(local_cls).chunk(len(crops) - 2))
        flat = masks.flatten(1)
        with torch.no_grad():
            teacher = self.teacher.module
            teacher_cls, teacher_patches, _ = vit_tokens(teacher.backbone, torch.cat(crops[:2]))
            teacher_out = list(teacher.head(teacher_cls).chunk(2))
            teacher_masked = self.teacher_patch_head()(teacher_patches[flat])
        loss_cls = self.loss_fn(teacher_out, student_out, teacher_temp=temperature)
        if bool(flat.any()):
            student_masked = self.patch_head(student_patches[flat])
            loss_patch = self.patch_loss_fn(teacher_masked, student_masked, masks, teacher_temp=temperature)
        else:  # no patch masked in this batch: nothing to predict, and the centre is not moved by an empty mean
            loss_patch = student_patches.sum() * 0.0
        return {'loss_cls': loss_cls, 'loss_patch': self.patch_loss_weight * loss_patch,
                'masked_share': flat.float().mean().detach()}

    # -- training ---------------------------------------------------------------------------------------------
    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        self.set_last_layer_trainable()
        momentum = self.teacher.current_tau()
        self.teacher.update_parameters(self.student)
        crops, masks = self.make_inputs(images, generator)
        out = self.losses(crops, masks)
        out.update(teacher_momentum=torch.tensor(momentum, dtype=torch.float64),
                   teacher_temp=torch.tensor(self.current_teacher_temp(), dtype=torch.float64))
        return out

    @torch.no_grad()
    def evaluation_loss(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``L_[CLS] + L_MIM`` of the batch in eval mode; neither the teacher nor the centres move."""
        was_training = self.training
        self.eval()
        try:
            with kept_buffers(self.loss_fn), kept_buffers(self.patch_loss_fn):
                out = self.losses(*self.make_inputs(images, generator))
                return out['loss_cls'] + out['loss_patch']
        finally:
            self.train(was_training)
