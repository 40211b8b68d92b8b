"""In-memory unlabeled image dataset feeding pretext training.

Images are held once as a uint8 tensor; ``__getitems__`` returns a whole batch with a single indexing op (no
per-image Python work, no worker processes needed), in the format the tasks expect:
``{'inputs': {'images': uint8 (B, H, W, C), 'indices': int64 (B,)}}``.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class IndexedImages(Dataset):
    #: mmengine's Runner and visualiser read a dataset's metainfo; unlabeled images have no classes
    metainfo = {'labels': None}

    def __init__(self, images: np.ndarray | torch.Tensor):
        self.images = torch.as_tensor(np.ascontiguousarray(images)) if not torch.is_tensor(images) else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices):
        index = torch.as_tensor(indices, dtype=torch.long)
        return {'inputs': {'images': self.images[index], 'indices': index}}


def collate_batch(batch):
    """``__getitems__`` already returns a collated batch."""
    return batch
