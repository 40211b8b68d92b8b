"""DDP helpers for ``torchrun --nproc_per_node=K tools/run_curriculum.py ...``: start the process group from
torchrun's environment (gloo on CPU, NCCL on CUDA) and share rank 0's decisions with the other ranks."""
from __future__ import annotations

import os

from mmengine.dist import broadcast_object_list, init_dist, is_distributed


def launched_by_torchrun() -> bool:
    return int(os.environ.get('WORLD_SIZE', '1')) > 1 and 'RANK' in os.environ


def init_from_env(device: str) -> None:
    """Start the default process group when torchrun launched several processes (no-op otherwise)."""
    if not launched_by_torchrun() or is_distributed():
        return
    if device == 'cuda':
        init_dist('pytorch', backend='nccl')  # also binds each rank to its LOCAL_RANK GPU
    else:
        # mmengine's init_dist always calls torch.cuda.set_device, which fails without a GPU
        import torch.distributed as dist

        dist.init_process_group(backend='gloo', init_method='env://')


def from_rank0(value):
    """``value`` as rank 0 has it, on every rank (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    broadcast_object_list(box, src=0)
    return box[0]
