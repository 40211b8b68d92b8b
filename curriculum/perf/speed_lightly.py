"""A second peer: MoCo v2 and SwAV written the way a lightly user writes them, for speed comparison.

lightly (https://github.com/lightly-ai/lightly) ships building blocks, not a trainer: projection heads, prototypes,
losses, momentum helpers and torchvision-based view transforms, assembled by the user in a plain PyTorch loop
(lightly's own examples do exactly that). This module is that user's code, sized like our task:

* data: a torch ``Dataset`` over the SAME uint8 images our task trains on, each image converted to a PIL image and
  passed through lightly's ``MoCoV2Transform`` / ``SwaVTransform``; a torch ``DataLoader`` with shuffling,
  ``drop_last``, default collation and ``num_workers`` = CPU count (persistent workers);
* model: torchvision's ResNet-18 without its ``fc`` (``nn.Sequential(*children[:-1])``, as in lightly's examples)
  with lightly's ``MoCoProjectionHead`` (+ a momentum copy made with ``deactivate_requires_grad`` and updated with
  ``update_momentum``) or ``SwaVProjectionHead`` + ``SwaVPrototypes``;
* loss: ``NTXentLoss(memory_bank_size=(queue length, feature dim))`` (lightly's MoCo) or ``SwaVLoss`` with
  prototypes normalised before every step and each crop forwarded on its own (lightly's SwaV example);
* precision: ``torch.autocast('cpu'|'cuda', bfloat16)`` around the forward and the loss when our resolved
  precision is bf16 (fp16 with a GradScaler where ours resolves to fp16, fp32 otherwise), channels_last model and
  inputs when ours uses channels_last: what a user who follows PyTorch's AMP recipe gets on this device; recorded
  in the JSON;
* sizes from our task: image size, batch, crop sizes and area ranges, view / crop counts, colour-jitter strength,
  blur sigma scaled by ``image_size / 224`` (as ours), queue length (MoCo), prototype count, Sinkhorn settings,
  prototype freezing (SwAV), feature dims, temperature, key-encoder momentum, SGD with our lr / momentum /
  weight decay. SwAV's queue is off on both sides: ours starts it at epoch ``epoch_queue_starts`` and the
  benchmark's steps are in epoch 0.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn

from .speed_peer import LoaderCycle, peer_side_result, process_cpu_seconds


class UInt8Images(torch.utils.data.Dataset):
    """``(N, H, W, C)`` uint8 images as PIL images through ``transform`` (a lightly multi-view transform)."""

    def __init__(self, images: np.ndarray, transform):
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        from PIL import Image

        image = self.images[index]
        if image.shape[-1] == 1:
            pil = Image.fromarray(np.ascontiguousarray(image[..., 0])).convert('RGB')
        else:
            pil = Image.fromarray(np.ascontiguousarray(image))
        return self.transform(pil)


def lightly_version() -> str:
    import lightly

    return getattr(lightly, '__version__', 'unknown')


def trunk() -> nn.Module:
    """torchvision's ResNet-18 without its classifier (output ``(N, 512, 1, 1)``), as lightly's examples."""
    import torchvision

    resnet = torchvision.models.resnet18()
    return nn.Sequential(*list(resnet.children())[:-1])


class LightlyMoCo(nn.Module):
    """lightly's MoCo v2 model: trunk + MoCoProjectionHead, and their momentum copies."""

    def __init__(self, feature_dim: int, hidden_dim: int, out_dim: int):
        from lightly.models.modules.heads import MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        self.backbone = trunk()
        self.projection_head = MoCoProjectionHead(feature_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head(self.backbone(x).flatten(start_dim=1))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


class LightlySwaV(nn.Module):
    """lightly's SwaV model: trunk + SwaVProjectionHead + SwaVPrototypes."""

    def __init__(self, feature_dim: int, hidden_dim: int, out_dim: int, prototypes: int, frozen_steps: int):
        from lightly.models.modules.heads import SwaVProjectionHead, SwaVPrototypes

        super().__init__()
        self.backbone = trunk()
        self.projection_head = SwaVProjectionHead(feature_dim, hidden_dim, out_dim)
        self.prototypes = SwaVPrototypes(out_dim, n_prototypes=prototypes, n_steps_frozen_prototypes=frozen_steps)

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        x = self.projection_head(self.backbone(x).flatten(start_dim=1))
        x = nn.functional.normalize(x, dim=1, p=2)
        return self.prototypes(x, step)


def lightly_transform(kind: str, task):
    """lightly's view transform for ``kind``, sized like our task; and its settings (for the JSON)."""
    from lightly.transforms import MoCoV2Transform, SwaVTransform

    sigmas = (0.1 * task.image_size / 224, 2.0 * task.image_size / 224)  # blur sigma scaled as ours
    if kind == 'moco':
        settings = dict(input_size=task.image_size, min_scale=float(task.crop_scale[0]),
                        cj_strength=float(task.color_strength), sigmas=sigmas)
        return MoCoV2Transform(**settings), {'transform': 'lightly.transforms.MoCoV2Transform', **settings,
                                             'views': 2}
    sizes = (task.image_size, task.local_size) if task.local_crops else (task.image_size,)
    counts = (task.global_crops, task.local_crops) if task.local_crops else (task.global_crops,)
    scales = (task.global_scale, task.local_scale) if task.local_crops else (task.global_scale,)
    settings = dict(crop_sizes=tuple(int(x) for x in sizes), crop_counts=tuple(int(x) for x in counts),
                    crop_min_scales=tuple(float(s[0]) for s in scales),
                    crop_max_scales=tuple(float(s[1]) for s in scales),
                    cj_strength=float(task.color_strength), sigmas=sigmas)
    return SwaVTransform(**settings), {'transform': 'lightly.transforms.SwaVTransform', **settings}


class LightlyTraining(LoaderCycle):
    """A lightly user's MoCo v2 / SwAV training loop for one algorithm, stepped by hand; sized from our
    :class:`curriculum.perf.speed.OurTraining` ``ours`` (its task, recipe and resolved precision)."""

    def __init__(self, kind: str, ours, images: np.ndarray, batch_size: int, device: str = 'cpu', seed: int = 0,
                 num_workers: int | None = None):
        from lightly.loss import NTXentLoss, SwaVLoss

        task, cfg = ours.task, ours.cfg
        self.kind, self.device, self.batch_size = kind, device, int(batch_size)
        self.precision = ours.precision
        self.autocast_dtype = torch.bfloat16 if self.precision.used == 'bf16' else (
            torch.float16 if self.precision.used == 'fp16' else None)
        self.channels_last = bool(self.precision.channels_last)
        transform, self.transform_settings = lightly_transform(kind, task)
        self.dataset = UInt8Images(images, transform)
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
        torch.manual_seed(seed)
        hidden = int(task.cfg('neck_hid_channels') or task.feature_dim)
        if kind == 'moco':
            self.model = LightlyMoCo(task.feature_dim, hidden, task.feat_dim)
            self.criterion = NTXentLoss(temperature=float(task.cfg('temperature', 0.2)),
                                        memory_bank_size=(task.queue_len, task.feat_dim))
            self.momentum = float(task.cfg('momentum', 0.999))
            self.sizes = {'memory_bank_size': task.queue_len, 'feat_dim': task.feat_dim, 'hidden_dim': hidden,
                          'temperature': float(task.cfg('temperature', 0.2)), 'momentum': self.momentum}
        else:
            self.model = LightlySwaV(task.feature_dim, hidden, task.feat_dim, task.num_prototypes,
                                     task.freeze_prototypes_iters)
            self.criterion = SwaVLoss(temperature=float(task.cfg('temperature', 0.1)),
                                      sinkhorn_iterations=int(task.cfg('sinkhorn_iterations', 3)),
                                      sinkhorn_epsilon=float(task.cfg('epsilon', 0.05)))
            self.global_crops = task.global_crops
            self.sizes = {'n_prototypes': task.num_prototypes, 'feat_dim': task.feat_dim, 'hidden_dim': hidden,
                          'n_steps_frozen_prototypes': task.freeze_prototypes_iters,
                          'temperature': float(task.cfg('temperature', 0.1)),
                          'sinkhorn_iterations': int(task.cfg('sinkhorn_iterations', 3)),
                          'queue': f'off (ours starts its queue at epoch {task.epoch_queue_starts}; the benchmark '
                                   f'steps are in epoch 0)'}
        self.model.to(device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.model.train()
        optimizer = dict(cfg['optimizer'])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=float(cfg['lr']),
                                         momentum=float(optimizer.get('momentum', 0.9)),
                                         weight_decay=float(optimizer.get('weight_decay', 0.0)))
        generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=generator,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
            pin_memory=device == 'cuda')
        # fp16 (a GPU without bf16) needs loss scaling, as PyTorch's AMP recipe does it
        self.scaler = torch.amp.GradScaler('cuda') if self.autocast_dtype is torch.float16 else None
        self._iterator = None
        self.iteration = 0

    def _autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def _loss(self, views: list[torch.Tensor]) -> torch.Tensor:
        from lightly.models.utils import update_momentum

        model = self.model
        if self.kind == 'moco':
            update_momentum(model.backbone, model.backbone_momentum, m=self.momentum)
            update_momentum(model.projection_head, model.projection_head_momentum, m=self.momentum)
            x_query, x_key = views
            with self._autocast():
                query = model(x_query)
                key = model.forward_momentum(x_key)
                return self.criterion(query, key)
        model.prototypes.normalize()
        with self._autocast():
            outputs = [model(view, step=self.iteration) for view in views]
            return self.criterion(outputs[:self.global_crops], outputs[self.global_crops:])

    def step(self) -> dict:
        views = [view.to(self.device, non_blocking=True) for view in self._next()]
        if self.channels_last:
            views = [view.contiguous(memory_format=torch.channels_last) for view in views]
        loss = self._loss(views)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad()
        self.iteration += 1
        return {'loss': float(loss.detach())}

    def worker_cpu_seconds(self) -> float:
        """CPU seconds used so far by the loader's worker processes (from /proc; 0 where unavailable)."""
        workers = getattr(self._iterator, '_workers', None) or []
        return sum(process_cpu_seconds(worker.pid) for worker in workers)

    def result(self, flops_per_step: float, timing: dict, steps: int, warmup: int, rates, profiled) -> dict:
        used = self.precision.used
        return peer_side_result(self, flops_per_step, timing, steps, warmup, rates, profiled, used=used, extra={
            'lightly_version': lightly_version(),
            'autocast': None if self.autocast_dtype is None else str(self.autocast_dtype).replace('torch.', ''),
            'channels_last_model': self.channels_last,
            'precision_rule': f'{used}, as ours ({self.precision.reason})',
            'backbone': 'torchvision resnet18 without fc',
            'loss': 'lightly.loss.NTXentLoss (memory bank)' if self.kind == 'moco' else 'lightly.loss.SwaVLoss',
            'sizes': self.sizes,
            'pipeline_changes': self.transform_settings,
            'loader': 'torch DataLoader, shuffle, drop_last, default collate, persistent workers',
        })

    def close(self) -> None:
        self._iterator = None
        self.loader = None


def lightly_factory(kind: str, images: np.ndarray, batch_size: int, device: str = 'cpu', seed: int = 0):
    """A :func:`curriculum.perf.speed.measure_task` peer factory for the lightly user's loop (import errors surface
    when it is called, so the benchmark records them and goes on without this peer)."""
    def build(ours):
        return LightlyTraining(kind, ours, images, batch_size, device, seed)
    return build
