"""DDP helpers for ``torchrun --nproc_per_node=K tools/run_curriculum.py ...``: start the process group from
torchrun's environment (gloo on CPU, NCCL on CUDA) and share rank 0's decisions with the other ranks."""
from __future__ import annotations

import logging
import os
import sys

from mmengine.dist import broadcast_object_list, get_rank, init_dist, is_distributed


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


def finish(code: int) -> int:
    """End this rank's process group and return the exit status ``code`` (unchanged without torchrun). Ranks
    other than 0 then leave at once (``os._exit`` after flushing their output), skipping the interpreter's
    finalisation: a gloo worker thread may still be releasing the tensors of the last collective, which takes the
    GIL, and a thread that takes it during finalisation is killed inside that C++ destructor, so the process
    aborts (SIGABRT, "terminate called without an active exception"; core dump of rank 1 in
    tests/test_curriculum.py's torchrun test: ProcessGroupGloo::runLoop in ~AsyncBroadcastWork, main thread in
    Py_FinalizeEx). Those ranks record nothing (rank 0 evaluates and writes every result), so nothing is lost;
    rank 0 evaluates for a while after its last collective and exits normally."""
    if not is_distributed():
        return code
    import torch.distributed as dist

    rank = get_rank()
    dist.destroy_process_group()
    if rank == 0:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def from_rank0(value):
    """``value`` as rank 0 has it, on every rank (``value`` itself when not distributed)."""
    if not is_distributed():
        return value
    box = [value]
    broadcast_object_list(box, src=0)
    return box[0]
