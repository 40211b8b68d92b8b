"""MICLe pretext task: SimCLR whose positive of an image is, where possible, another image of the same patient or
lesion (Multi-Instance Contrastive Learning; Azizi et al., "Big Self-Supervised Models Advance Medical Image
Classification", ICCV 2021, https://arxiv.org/abs/2101.05224).

Everything but the positive is :class:`pretext_tasks.simclr.SimCLRTask` (projector, NT-Xent, views, recipe keys).
For each image of a batch: when its group (lesion / patient id of the layout) has more than one image in the
training split, the positive is a view of another image of that group, drawn uniformly among the group's other
training images; otherwise it is a second view of the image itself, as in SimCLR. The task declares
``needs_groups``, so the engine builds its batches with the training split's group ids
(:class:`pretext_tasks.data.IndexedImages`, whose :class:`~pretext_tasks.data.GroupPartners` draws the partner from a
generator seeded by the run seed and the batch's indices: a resumed epoch replays the same pairs) and refuses, when
the run is planned, data without group ids or with a group in two splits. Only the training split's images are
candidates, so a positive never comes from another split.

Logged per step (and kept per epoch in the stage history): ``positive_from_other``, the fraction of the batch
whose positive came from another image (about 0.46 of the images on ``synthetic_derm`` and 0.45 on HAM10000 have
another image of their lesion in the training split). Validation (LR search) scores the plain SimCLR objective on
val images, which carry no partners.
"""
from __future__ import annotations

import torch

from .errors import PretextConfigError
from .registry import register_task
from .simclr import SimCLRTask


@register_task
class MICLeTask(SimCLRTask):
    """MICLe: SimCLR with positives drawn from the image's group (see the module docstring)."""

    name = 'micle'
    needs_groups = True

    _batch: dict | None = None

    def forward(self, inputs: dict, data_samples=None, mode: str = 'loss'):
        self._batch = inputs   # the group partners the data layer drew for this batch
        try:
            return super().forward(inputs, data_samples, mode)
        finally:
            self._batch = None

    def _partner(self, key: str) -> torch.Tensor:
        if self._batch is None or key not in self._batch:
            raise PretextConfigError(f'{self.name}: the training batch holds no group partners; it needs batches '
                                     f'of pretext_tasks.data.IndexedImages built with the group ids')
        return self._batch[key]

    def positive_images(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The partner of each image: another image of its group, or itself when it is alone in its group."""
        return self._partner('partners')

    def compute_loss(self, images: torch.Tensor, indices: torch.Tensor,
                     generator: torch.Generator) -> dict[str, torch.Tensor]:
        losses = super().compute_loss(images, indices, generator)
        partners = self._partner('partner_indices')
        losses['positive_from_other'] = (partners != indices).float().mean()
        return losses
