"""In-memory unlabeled image dataset feeding pretext training.

Images are held once as a uint8 tensor; ``__getitems__`` returns a whole batch with a single indexing op (no
per-image Python work, no worker processes needed), in the format the tasks expect:
``{'inputs': {'images': uint8 (B, H, W, C), 'indices': int64 (B,)}}``.

Group ids (lesion or patient; never a diagnosis label) are optional. A task that declares
``needs_groups = True`` (:class:`pretext_tasks.base.PretextTask`) gets a dataset built with the training split's
int64 group array, and every batch then also holds, per image, its ``groups`` id and a *group partner*
(:class:`GroupPartners`): ``partners`` uint8 ``(B, H, W, C)`` and ``partner_indices`` int64 ``(B,)``. The partner
is drawn here, where the pixels are, because it is usually not in the batch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


def group_codes(groups) -> np.ndarray:
    """Any group ids (strings or numbers) as int64 codes ``0..G-1`` (equal ids → equal codes)."""
    return np.unique(np.asarray(groups), return_inverse=True)[1].astype(np.int64).reshape(-1)


class GroupPartners:
    """Draws one partner per image: another image of the same group, uniformly among the group's other images,
    when the group has two images or more; else the image itself (MICLe's rule, Azizi et al. 2021).

    ``groups`` are int64 ids aligned with the images the indices point into (one split: a partner is never drawn
    from outside it). Draws are vectorised and come from the generator given to :meth:`draw`, so the same
    generator state gives the same partners."""

    def __init__(self, groups: np.ndarray):
        groups = np.asarray(groups)
        if groups.ndim != 1 or not np.issubdtype(groups.dtype, np.integer):
            raise ValueError(f'group ids must be a 1-D integer array, got {groups.dtype} {groups.shape}')
        codes = group_codes(groups)
        order = np.argsort(codes, kind='stable')                 # images sorted by group
        sizes = np.bincount(codes)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        rank = np.empty(len(codes), dtype=np.int64)              # position of each image inside its group
        rank[order] = np.arange(len(codes)) - starts[codes[order]]
        self.groups = torch.as_tensor(groups.astype(np.int64))
        self._order = torch.as_tensor(order.astype(np.int64))
        self._start = torch.as_tensor(starts[codes].astype(np.int64))   # per image: its group's first slot
        self._size = torch.as_tensor(sizes[codes].astype(np.int64))     # per image: its group's size
        self._rank = torch.as_tensor(rank)

    def __len__(self) -> int:
        return len(self.groups)

    def group_size(self, indices: torch.Tensor) -> torch.Tensor:
        """Images in the group of each index (1: the image has no partner but itself)."""
        return self._size[indices]

    def shared_fraction(self) -> float:
        """The fraction of images whose group has another image (their partner is never themselves)."""
        return float((self._size > 1).float().mean()) if len(self) else 0.0

    def draw(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A partner index for every index of ``indices`` (int64, CPU)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        size, rank = self._size[indices], self._rank[indices]
        # one of the size - 1 other slots of the group: draw in [0, size - 1), skip over the image's own slot
        slot = (torch.rand(len(indices), generator=generator, dtype=torch.float64) * (size - 1).clamp(min=1)).long()
        slot = torch.minimum(slot, (size - 2).clamp(min=0))
        slot = slot + (slot >= rank).long()
        partner = self._order[self._start[indices] + slot.clamp(max=size - 1)]
        return torch.where(size > 1, partner, indices)


def batch_seed(seed: int, indices: torch.Tensor) -> int:
    """A seed from the run seed and a batch's indices: the same batch (a resumed epoch replays its batches) draws
    the same partners; different batches draw independently."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *torch.as_tensor(indices).tolist()]).generate_state(2)
    return int((int(state[0]) << 31) ^ int(state[1])) % (2 ** 63 - 1)


class IndexedImages(Dataset):
    #: mmengine's Runner and visualiser read a dataset's metainfo; unlabeled images have no classes
    metainfo = {'labels': None}

    def __init__(self, images: np.ndarray | torch.Tensor, groups: np.ndarray | None = None, seed: int = 0):
        self.images = torch.as_tensor(np.ascontiguousarray(images)) if not torch.is_tensor(images) else images
        self.seed = int(seed)
        self.partners = None
        if groups is not None:
            if len(groups) != len(self.images):
                raise ValueError(f'{len(groups)} group ids for {len(self.images)} images')
            self.partners = GroupPartners(np.asarray(groups))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        inputs = {'images': self.images[index], 'indices': index}
        if self.partners is not None:
            partner = self.partners.draw(index, torch.Generator().manual_seed(batch_seed(self.seed, index)))
            inputs.update(groups=self.partners.groups[index], partner_indices=partner, partners=self.images[partner])
        return {'inputs': inputs}


def collate_batch(batch):
    """``__getitems__`` already returns a collated batch."""
    return batch
