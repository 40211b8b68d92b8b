"""Speed measurements of the engine: the device's FLOP ceiling, our pretext training steps, k-means.

Used by ``tools/benchmark.py`` (which also measures mmpretrain's own MoCo/SwAV pipelines with
:mod:`curriculum.perf.speed_peer`, a lightly user's MoCo/SwAV loop with :mod:`curriculum.perf.speed_lightly`, the
downstream protocols with :mod:`curriculum.perf.speed_downstream` and the sweep cache / LR-search cost with
:mod:`curriculum.perf.speed_sweep`).

What "our training step" means here: a DataLoader over :class:`pretext_tasks.data.IndexedImages` built by the stage
runner's own ``curriculum.stage._loader``, the task built by ``curriculum.stage.build_stage_task`` in the precision
``resolve_precision(amp, device)`` gives (``curriculum/precision.py``: autocast of the backbone, channels_last with
it), the optimiser wrapper built by mmengine from the stage runner's ``_optim_wrapper`` config, ``set_progress``
before every step and the task's own hooks called at the Runner's points with a minimal stand-in for the Runner.
Batch loading, augmentation, forward, backward, the optimiser step and the hooks are all inside the timed loop;
one-off set-up (building the model, a hook's ``before_train`` such as ODC's memory initialisation) is timed
separately. :func:`measure_task` times the default step (``amp='auto'``), the same step in fp32 and in bf16, and
any peers in alternating blocks.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products, forward and
backward; element-wise work is not counted), so "fraction of the ceiling" is ``counted FLOPs per second / measured
large-matmul FLOPs per second`` of the dtype the step computes in (fp32 or bf16, both measured by :func:`ceiling`).
"""
from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from types import SimpleNamespace

import numpy as np
import torch

from curriculum.precision import cpu_model

IMAGE_SIZE = 64
BATCH_SIZE = 64
#: conv / matrix-product kernels: the operations FlopCounterMode counts (forward and backward)
FLOP_KERNEL_PATTERN = re.compile(r'conv|(^|::|_)(mm|addmm|bmm|matmul|linear|baddbmm)($|_|\b)|einsum', re.I)


# ----------------------------------------------------------------------------------------------------------------
# bookkeeping
# ----------------------------------------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec='seconds')


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: str = 'cpu') -> dict:
    """Platform, CPU count, torch threads (and the GPU name on CUDA)."""
    info = {
        'platform': platform.platform(),
        'processor': cpu_model(),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(),
        'torch_interop_threads': torch.get_num_interop_threads(),
        'omp_num_threads_env': os.environ.get('OMP_NUM_THREADS'),
        'device': device,
    }
    if device == 'cuda' and torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def entry_meta(command: str, device: str, quick: bool) -> dict:
    """What every JSON entry records: the command, the date, the machine, the load average, the quick flag."""
    return {'command': command, 'date': now_iso(), 'machine': machine_info(device), 'load_average': load_average(),
            'quick': bool(quick)}


def synchronize(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# the ceiling
# ----------------------------------------------------------------------------------------------------------------
def matmul_flops(device: str = 'cpu', size: int = 2048, repeats: int = 5, dtype=torch.float32) -> dict:
    """FLOP/s of a large square matmul in ``dtype`` (best of ``repeats``; ``2 n^3`` FLOPs each)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        synchronize(device)
        times.append(time.perf_counter() - start)
    flops = 2.0 * size ** 3
    return {'flops_per_s': flops / min(times), 'size': size, 'repeats': repeats,
            'median_flops_per_s': flops / float(np.median(times)), 'dtype': str(dtype).replace('torch.', '')}


#: the matmul dtypes of the ceiling, by the precision names of curriculum.precision (fp16 only on CUDA)
CEILING_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def matmul_rates(device: str = 'cpu', size: int = 2048, repeats: int = 5, rounds: int = 2) -> dict[str, dict]:
    """:func:`matmul_flops` of fp32 and bf16 (and fp16 on CUDA) in ``rounds`` alternating rounds, best of all, so
    that a change in the machine's load hits every dtype alike. A dtype the device cannot multiply is left out."""
    names = ['fp32', 'bf16'] + (['fp16'] if device == 'cuda' else [])
    best: dict[str, dict] = {}
    for _ in range(max(1, rounds)):
        for name in list(names):
            try:
                result = matmul_flops(device, size, repeats, CEILING_DTYPES[name])
            except RuntimeError:  # no kernel for this dtype on this device
                names.remove(name)
                continue
            if name not in best or result['flops_per_s'] > best[name]['flops_per_s']:
                best[name] = result
    for result in best.values():
        result['rounds'] = max(1, rounds)
    return best


def rate_for(rates: float | dict, used: str) -> tuple[float, str]:
    """The matmul FLOP/s a step in precision ``used`` (fp32 / bf16 / fp16) is held against, and that rate's dtype.
    ``rates`` is one fp32 rate or a ``{dtype: FLOP/s}`` map (a dtype without a measurement falls back to fp32)."""
    if not isinstance(rates, dict):
        return float(rates), 'fp32'
    if rates.get(used):
        return float(rates[used]), used
    return float(rates['fp32']), 'fp32'


def count_flops(fn) -> tuple[float, object]:
    """Total FLOPs FlopCounterMode counts while ``fn()`` runs, and ``fn``'s return value."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return float(counter.get_total_flops()), out


def backbone_forward_flops(backbone_cfg: dict | None = None, image_size: int = IMAGE_SIZE) -> float:
    """Forward conv/linear FLOPs of the backbone (ResNet-18 by default) for ONE image of ``image_size`` px."""
    from pretext_tasks.base import build_backbone

    backbone = build_backbone(backbone_cfg)
    backbone.eval()  # (mmpretrain's ResNet.train() returns None, so no chaining)
    with torch.no_grad():
        flops, _ = count_flops(lambda: backbone(torch.zeros(2, 3, image_size, image_size)))
    return flops / 2


def ceiling(device: str, quick: bool, image_size: int = IMAGE_SIZE) -> dict:
    """Measured matmul FLOP/s of fp32 and bf16 (fp16 too on CUDA), backbone FLOPs per image and the FLOP-bound
    training images/s of each."""
    rates = matmul_rates(device, size=1024 if quick else 2048, repeats=3 if quick else 5, rounds=2)
    forward = backbone_forward_flops(None, image_size)
    step = 3.0 * forward
    mm = rates['fp32']
    out = {
        'matmul_flops_per_s': mm['flops_per_s'],
        'matmul': mm,
        'fp32_gflops': mm['flops_per_s'] / 1e9,
        'backbone': 'mmpretrain ResNet-18 (out_indices=(3,), no classifier)',
        'image_size': image_size,
        'backbone_forward_flops_per_image': forward,
        'training_step_flops_per_image': step,
        'training_step_rule': 'forward x 3 (forward + backward of activations and weights)',
        'flop_bound_images_per_s': mm['flops_per_s'] / step,
        'matmul_rule': 'fp32 and bf16 matmuls measured in 2 alternating rounds, best of all repeats',
    }
    for name in ('bf16', 'fp16'):
        if name in rates:
            out[f'matmul_{name}'] = rates[name]
            out[f'{name}_gflops'] = rates[name]['flops_per_s'] / 1e9
            out[f'{name}_flop_bound_images_per_s'] = rates[name]['flops_per_s'] / step
    if 'bf16' in rates:
        out['bf16_over_fp32'] = rates['bf16']['flops_per_s'] / mm['flops_per_s']
    return out


def ceiling_rates(ceiling_entry: dict) -> dict[str, float]:
    """``{dtype: matmul FLOP/s}`` of a :func:`ceiling` entry."""
    rates = {'fp32': float(ceiling_entry['matmul_flops_per_s'])}
    for name in ('bf16', 'fp16'):
        if ceiling_entry.get(f'matmul_{name}'):
            rates[name] = float(ceiling_entry[f'matmul_{name}']['flops_per_s'])
    return rates


# ----------------------------------------------------------------------------------------------------------------
# our training step
# ----------------------------------------------------------------------------------------------------------------
def task_config(task: str, batch_size: int = BATCH_SIZE) -> tuple[dict, str]:
    """The task's recipe (``configs/tasks/<task>.yaml``) with the benchmark's batch size, and where it came from."""
    from curriculum.errors import PlanError
    from curriculum.plan import task_recipe

    try:
        cfg, source = task_recipe(task), f'configs/tasks/{task}.yaml'
    except PlanError:
        cfg, source = {}, 'task defaults (no configs/tasks recipe found)'
    cfg = dict(cfg)
    cfg['batch_size'] = int(batch_size)
    cfg.setdefault('lr', 0.05)
    cfg.setdefault('optimizer', {'type': 'SGD', 'momentum': 0.9, 'weight_decay': 1e-4})
    return cfg, source


class HookDriver:
    """Calls a task's mmengine hooks at the Runner's points, with a minimal stand-in for the Runner (the fields
    the tasks' hooks read: model, epoch, iter, max_epochs, max_iters, work_dir, logger, rank, world_size,
    train_dataloader, optim_wrapper)."""

    def __init__(self, task, loader, optim_wrapper, work_dir: str, max_iters: int):
        self.hooks = list(task.hooks())
        self.runner = SimpleNamespace(model=task, epoch=0, iter=0, max_epochs=1, max_iters=max_iters,
                                      work_dir=work_dir, logger=logging.getLogger('benchmark'), rank=0,
                                      world_size=1, train_dataloader=loader, optim_wrapper=optim_wrapper)

    def call(self, name: str, *args) -> None:
        for hook in self.hooks:
            getattr(hook, name)(self.runner, *args)


def _cycle(loader):
    epoch = 0
    while True:
        sampler = getattr(loader, 'sampler', None)
        if hasattr(sampler, 'set_epoch'):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


class OurTraining:
    """One task set up exactly as a stage trains it, stepped by hand (see the module docstring)."""

    def __init__(self, task_name: str, images: np.ndarray, device: str = 'cpu', batch_size: int = BATCH_SIZE,
                 seed: int = 0, amp: str = 'auto', work_dir: str | None = None, backbone_cfg: dict | None = None):
        from curriculum.precision import resolve_precision
        from curriculum.stage import StageInputs, _loader, _optim_wrapper, build_stage_task, stage_groups
        from mmengine.optim import build_optim_wrapper
        from pretext_tasks.base import DEFAULT_BACKBONE

        self.task_name, self.device, self.batch_size = task_name, device, int(batch_size)
        self.cfg, self.recipe_source = task_config(task_name, batch_size)
        image_size = int(images.shape[1])
        # a task that draws on group ids is timed with every image its own group (its partner is itself: the
        # batch carries the same partner images whichever image each one is)
        self.backbone_cfg = dict(backbone_cfg or DEFAULT_BACKBONE)
        inputs = StageInputs(train_images=images, val_images=images[:batch_size], image_size=image_size,
                             backbone_cfg=dict(self.backbone_cfg), seed=seed, device=device,
                             precision=resolve_precision(amp, device), train_groups=np.arange(len(images)))
        self.precision = inputs.precision
        self.channels_last = inputs.precision.channels_last
        torch.manual_seed(seed)
        started = time.perf_counter()
        self.task = build_stage_task(task_name, self.cfg, inputs, None).to(device)
        self.loader = _loader(images, self.batch_size, seed, stage_groups(task_name, inputs))
        self.optim_wrapper = build_optim_wrapper(self.task, _optim_wrapper(self.cfg, float(self.cfg['lr']), inputs))
        self._own_dir = work_dir is None
        self.work_dir = work_dir or tempfile.mkdtemp(prefix=f'bench-{task_name}-')
        self.driver = HookDriver(self.task, self.loader, self.optim_wrapper, self.work_dir, max_iters=10 ** 6)
        self.task.train()
        self.build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        self.driver.call('before_train')
        self.driver.call('before_train_epoch')
        self.before_train_seconds = time.perf_counter() - started
        self.batches = _cycle(self.loader)
        self.iteration = 0

    def step(self) -> dict:
        batch = next(self.batches)
        runner = self.driver.runner
        runner.iter = self.iteration
        self.task.set_progress(0, self.iteration)
        self.driver.call('before_train_iter', self.iteration, batch)
        log = self.task.train_step(batch, self.optim_wrapper)
        self.driver.call('after_train_iter', self.iteration, batch, log)
        values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in log.items()}  # as the Runner logs
        self.iteration += 1
        return values

    def augmentation_seconds(self, repeats: int = 2) -> float | None:
        """Seconds per batch of the task's view making alone (:meth:`PretextTask.make_inputs`, best of
        ``repeats``), or None when the task does not offer it."""
        from pretext_tasks.base import PretextTask

        if type(self.task).make_inputs is PretextTask.make_inputs:
            return None
        method = self.task.make_inputs
        images = next(self.batches)['inputs']['images'].to(self.device)
        best = float('inf')
        with torch.no_grad():
            for repeat in range(repeats):
                generator = self.task.generator(torch.device(self.device), salt=repeat)
                synchronize(self.device)
                started = time.perf_counter()
                method(images, generator)
                synchronize(self.device)
                best = min(best, time.perf_counter() - started)
        return best

    def close(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def timed_steps(step, warmup: int, steps: int, device: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) for ``steps`` calls of ``step()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - started, time.process_time() - cpu_started


def profile_steps(step, steps: int, device: str, top: int = 12) -> dict:
    """torch.profiler over ``steps`` calls of ``step()``: the top operators by self time and the share of time in
    the FLOP-counted kernels (convolutions, matrix products) versus everything else."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == 'cuda' else [])
    synchronize(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    wall = time.perf_counter() - started
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if device == 'cuda' else event.self_cpu_time_total
        rows.append((event.key, float(self_us), int(event.count)))
    total = sum(r[1] for r in rows) or 1.0
    kernel = sum(r[1] for r in rows if FLOP_KERNEL_PATTERN.search(r[0]))
    rows.sort(key=lambda r: -r[1])
    return {
        'steps': steps,
        'wall_seconds': wall,
        'profiled_op_seconds': total / 1e6,
        'flop_kernel_seconds': kernel / 1e6,
        'flop_kernel_share': kernel / total,
        'time_basis': 'self device time' if device == 'cuda' else 'self CPU time of the calling threads',
        'top': [{'op': name, 'self_ms': round(us / 1e3 / steps, 3), 'share': round(us / total, 4),
                 'calls': calls // steps} for name, us, calls in rows[:top]],
    }


def throughput(flops_per_step: float, wall: float, cpu: float, steps: int, batch_size: int,
               matmul_flops_per_s: float) -> dict:
    """Images/s, FLOPs per image, achieved FLOP/s and its fraction of the matmul rate of ``steps`` timed steps."""
    achieved = flops_per_step * steps / wall
    return {
        'images_per_s': steps * batch_size / wall,
        'seconds_per_step': wall / steps,
        'batch_size': batch_size,
        'steps_timed': steps,
        'flops_per_image_step': flops_per_step / batch_size,
        'achieved_flops_per_s': achieved,
        'fraction_of_ceiling': achieved / matmul_flops_per_s,
        'flop_bound_images_per_s': matmul_flops_per_s / (flops_per_step / batch_size),
        'cpu_seconds_per_step': cpu / steps,
        'cpu_utilisation': cpu / wall / max(1, torch.get_num_threads()),
    }


def add_profile(result: dict, profiled: dict | None, flops_per_step: float, matmul_flops_per_s: float) -> None:
    """Attach a profile and the kernel efficiency: FLOP-counted kernels run at ``kernel_efficiency`` of the
    matmul rate for ``flop_kernel_share`` of the op time; the rest (batch norm, element-wise work, augmentation,
    the optimiser, Python) does no counted FLOPs."""
    if not profiled:
        return
    kernel_s = profiled['flop_kernel_seconds'] / profiled['steps']
    if kernel_s > 0:
        profiled['kernel_efficiency'] = flops_per_step / kernel_s / matmul_flops_per_s
    result['profile'] = profiled


#: the precision variants measured next to the default step: (result name, ``amp`` requested)
PRECISION_VARIANTS = (('fp32', 'none'), ('bf16', 'bf16'))


def backbone_label(cfg: dict) -> str:
    """A short name of a backbone config: ``ResNet-18``, ``VisionTransformer deit-tiny/4`` (arch / patch size)."""
    name = str(cfg.get('type', 'backbone'))
    if 'depth' in cfg:
        return f'{name}-{cfg["depth"]}'
    arch = cfg.get('arch')
    arch = arch if isinstance(arch, str) else 'custom' if arch else None
    patch = cfg.get('patch_size')
    return ' '.join(part for part in (name, f'{arch}/{patch}' if arch and patch else arch) if part)


def precision_fields(precision) -> dict:
    """What a result records of a :class:`curriculum.precision.Precision`."""
    return {'precision': precision.used, 'precision_requested': precision.requested,
            'precision_reason': precision.reason, 'channels_last_model': bool(precision.channels_last)}


def our_result(training: OurTraining, flops_per_step: float, wall: float, cpu: float, steps: int,
               warmup: int, matmul_flops_per_s: float | dict, profiled: dict | None, augment_s: float | None) -> dict:
    """Our step's throughput; its fraction of the ceiling is held against the matmul rate of the dtype the step
    really uses (``matmul_flops_per_s``: one fp32 rate or a ``{dtype: rate}`` map, see :func:`rate_for`)."""
    rate, dtype = rate_for(matmul_flops_per_s, training.precision.used)
    result = throughput(flops_per_step, wall, cpu, steps, training.batch_size, rate)
    result.update({
        'warmup_steps': warmup,
        'image_size': int(training.loader.dataset.images.shape[1]),
        'num_images': int(len(training.loader.dataset)),
        'build_seconds': training.build_seconds,
        'before_train_seconds': training.before_train_seconds,
        **precision_fields(training.precision),
        'ceiling_dtype': dtype,
        'ceiling_flops_per_s': rate,
        'recipe': training.recipe_source,
        'backbone': backbone_label(training.backbone_cfg),
        'optimizer': dict(training.cfg['optimizer']),
        'lr': float(training.cfg['lr']),
        'hooks': [type(h).__name__ for h in training.driver.hooks],
        'augment_seconds_per_batch': augment_s,
        'augment_share_of_step': None if augment_s is None else augment_s / (wall / steps),
    })
    add_profile(result, profiled, flops_per_step, rate)
    return result


def wait_for_idle_workers(sides, interval: float = 0.05, limit: float = 10.0) -> float:
    """Wait until the loader workers of every side (those with ``worker_cpu_seconds()``) stop using CPU (no
    increase over ``interval``; at most ``limit`` seconds): their prefetching then runs in no other side's timed
    block. Returns the seconds waited."""
    meters = [side.worker_cpu_seconds for side in sides if hasattr(side, 'worker_cpu_seconds')]
    if not meters:
        return 0.0
    started = time.perf_counter()
    used = sum(meter() for meter in meters)
    while time.perf_counter() - started < limit:
        time.sleep(interval)
        now = sum(meter() for meter in meters)
        if now - used < 0.005:  # below one clock tick of /proc accounting
            break
        used = now
    return time.perf_counter() - started


def alternating_blocks(sides: dict, steps: int, rounds: int, device: str) -> dict[str, dict]:
    """``rounds`` rounds of one block of ``steps`` timed steps per side, the sides in the given order in every
    round, so that slow changes in the machine's load hit all of them alike. Before every block the sides' loader
    workers are left to finish prefetching (:func:`wait_for_idle_workers`), so that a side with workers does not
    slow down the next side's block; what a side's workers do is in its ``worker_cpu_seconds``, and the wait after
    its block in ``refill_wait_seconds``. Returns ``{name: {'walls': [seconds per block], 'cpu': process CPU
    seconds of all its blocks, 'refill_wait_seconds': seconds waited after its blocks}}``."""
    timing = {name: {'walls': [], 'cpu': 0.0, 'refill_wait_seconds': 0.0} for name in sides}
    wait_for_idle_workers(sides.values())
    for _ in range(max(1, rounds)):
        for name, side in sides.items():
            wall, cpu = timed_steps(side.step, 0, steps, device)
            timing[name]['walls'].append(wall)
            timing[name]['cpu'] += cpu
            timing[name]['refill_wait_seconds'] += wait_for_idle_workers(sides.values())
    return timing


def block_result(flops_per_step: float, timing: dict, steps: int, batch_size: int, rates: float | dict,
                 used: str) -> dict:
    """Throughput of one side of :func:`alternating_blocks` (all its blocks together) and its images/s per round,
    against the matmul rate of precision ``used``."""
    rate, dtype = rate_for(rates, used)
    timed = steps * len(timing['walls'])
    result = throughput(flops_per_step, sum(timing['walls']), timing['cpu'], timed, batch_size, rate)
    result.update(round_images_per_s=[steps * batch_size / wall for wall in timing['walls']], ceiling_dtype=dtype,
                  ceiling_flops_per_s=rate)
    return result


def _worker_cpu(side) -> float:
    method = getattr(side, 'worker_cpu_seconds', None)
    return float(method()) if method else 0.0


def measure_task(task_name: str, images: np.ndarray, matmul_flops_per_s: float | dict, device: str = 'cpu',
                 batch_size: int = BATCH_SIZE, warmup: int = 2, steps: int = 2, rounds: int = 2, profile: int = 1,
                 seed: int = 0, amp: str = 'auto', variants=PRECISION_VARIANTS,
                 peers: dict | None = None, peer_profile: int | None = None,
                 backbone_cfg: dict | None = None) -> tuple[dict, dict, dict]:
    """Our training step for one task (precision ``amp``), the same step in each precision variant (``(name,
    amp)`` pairs, default fp32 = ``amp='none'`` and bf16) and peers built from it, measured side by side: after
    the warm-up, :func:`alternating_blocks` of ``steps`` steps (ours, the variants, the peers, in that order).

    ``peers`` maps a name to a factory ``f(ours: OurTraining) -> side``; a side has ``step()``, ``close()``,
    ``result(flops_per_step, timing, steps, warmup, rates, profiled) -> dict`` and may have ``start()`` (start its
    loader workers) and ``worker_cpu_seconds()`` (their CPU seconds so far). Every peer is started before any
    side takes a step: forking loader workers makes the parent's pages copy-on-write, and the first writes after
    a fork are slow, so they belong in the warm-up (a peer started after ours' warm-up made ours' first timed step
    several times slower). A peer that cannot be built or fails its first step is left out, with its error.

    ``profile`` steps of ours and ``peer_profile`` (default: ``profile``) of each peer are profiled after the
    blocks. FLOPs are counted on the first warm-up step of ours and of each peer; the variants run the same step, so
    they share ours. Returns ``(ours, peers, errors)``: ``ours`` is :func:`our_result` plus ``round_images_per_s``
    and, per variant, ``<name>_images_per_s``, ``precision_variants[<name>]``; with an fp32 variant
    ``speedup_vs_fp32`` (ours / fp32) and ``<name>_speedup_vs_fp32``; with a bf16 variant
    ``fraction_of_ceiling_bf16_step`` (the bf16 step against the bf16 matmul rate). ``backbone_cfg``: the backbone
    of every side of ours (default ResNet-18)."""
    warmup = max(1, warmup)
    ours = OurTraining(task_name, images, device, batch_size, seed, amp, backbone_cfg=backbone_cfg)
    variant_runs: dict[str, OurTraining] = {}
    peer_runs: dict = {}
    errors: dict[str, str] = {}
    try:
        for name, requested in variants:
            variant_runs[name] = OurTraining(task_name, images, device, batch_size, seed, requested,
                                             backbone_cfg=backbone_cfg)
        for name, factory in (peers or {}).items():
            started = time.perf_counter()
            try:
                side = factory(ours)
                side.build_seconds = time.perf_counter() - started
                peer_runs[name] = side
                if hasattr(side, 'start'):
                    side.start()
            except Exception as exc:  # a peer that cannot run must not hide our numbers
                errors[name] = f'{type(exc).__name__}: {exc}'
                side = peer_runs.pop(name, None)
                if side is not None:
                    side.close()
        # every loader worker is forked by now: pages the sides write are copied (copy-on-write) in the warm-up,
        # not in a timed step
        ours_flops, _ = count_flops(ours.step)
        peer_flops = {}
        for name, side in list(peer_runs.items()):
            try:
                peer_flops[name], _ = count_flops(side.step)
            except Exception as exc:
                errors[name] = f'{type(exc).__name__}: {exc}'
                peer_runs.pop(name).close()
        for _ in range(warmup - 1):
            ours.step()
            for side in peer_runs.values():
                side.step()
        for side in variant_runs.values():
            for _ in range(warmup):
                side.step()
        sides = {'ours': ours, **{f'variant:{n}': v for n, v in variant_runs.items()},
                 **{f'peer:{n}': p for n, p in peer_runs.items()}}
        workers_before = {name: _worker_cpu(side) for name, side in peer_runs.items()}
        timing = alternating_blocks(sides, steps, rounds, device)
        for name, side in peer_runs.items():  # the workers prefetch during every side's blocks
            timing[f'peer:{name}']['worker_cpu'] = _worker_cpu(side) - workers_before[name]
        ours_profile = profile_steps(ours.step, profile, device) if profile else None
        peer_profile = profile if peer_profile is None else peer_profile
        peer_profiles = {}
        for name, side in peer_runs.items():
            wait_for_idle_workers(peer_runs.values())
            peer_profiles[name] = profile_steps(side.step, peer_profile, device) if peer_profile else None
        augment_s = ours.augmentation_seconds()
        timed = steps * max(1, rounds)
        result = our_result(ours, ours_flops, sum(timing['ours']['walls']), timing['ours']['cpu'], timed, warmup,
                            matmul_flops_per_s, ours_profile, augment_s)
        result['round_images_per_s'] = [steps * ours.batch_size / w for w in timing['ours']['walls']]
        result['timing'] = {'warmup_steps': warmup, 'steps_per_block': steps, 'rounds': max(1, rounds),
                            'order': list(sides)}
        result['precision_variants'] = {}
        for name, run in variant_runs.items():
            entry = block_result(ours_flops, timing[f'variant:{name}'], steps, ours.batch_size, matmul_flops_per_s,
                                 run.precision.used)
            entry.update(precision_fields(run.precision))
            result['precision_variants'][name] = entry
            result[f'{name}_images_per_s'] = entry['images_per_s']
        fp32 = result.get('fp32_images_per_s')
        if fp32:
            result['speedup_vs_fp32'] = result['images_per_s'] / fp32
            for name in variant_runs:
                if name != 'fp32':
                    result[f'{name}_speedup_vs_fp32'] = result[f'{name}_images_per_s'] / fp32
        if 'bf16' in variant_runs:
            result['fraction_of_ceiling_bf16_step'] = result['precision_variants']['bf16']['fraction_of_ceiling']
        peer_results = {name: side.result(peer_flops[name], timing[f'peer:{name}'], steps, warmup,
                                          matmul_flops_per_s, peer_profiles[name])
                        for name, side in peer_runs.items()}
    finally:
        for run in [ours, *variant_runs.values()]:
            run.close()
        for side in peer_runs.values():
            side.close()
    return result, peer_results, errors


def measure_pretext(task_name: str, images: np.ndarray, matmul_flops_per_s: float | dict, device: str = 'cpu',
                    batch_size: int = BATCH_SIZE, warmup: int = 2, steps: int = 8, profile: int = 1,
                    seed: int = 0, amp: str = 'auto', variants=(), rounds: int = 1) -> dict:
    """Images/s of our training step for one task, FLOPs per image actually processed, fraction of the ceiling
    and (``profile`` > 0 steps) a profile; with ``variants`` (e.g. :data:`PRECISION_VARIANTS`) also the same step
    in those precisions, in alternating blocks (:func:`measure_task`). The first warm-up step is the one whose
    FLOPs are counted."""
    result, _, _ = measure_task(task_name, images, matmul_flops_per_s, device, batch_size, warmup, steps, rounds,
                                profile, seed, amp, variants)
    return result


# ----------------------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------------------
def clustered_features(n: int, dim: int, centres: int, seed: int = 0) -> np.ndarray:
    """Gaussian blobs (features with cluster structure, like a backbone's), float32."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, dim)).astype(np.float32)
    labels = rng.integers(0, centres, n)
    return (means[labels] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)).astype(np.float32)


def measure_kmeans(n: int = 25_000, dim: int = 256, k: int = 1000, iters: int = 20, seed: int = 0) -> dict:
    """Seconds of FAISS k-means and of the plain torch k-means (both from pretext_tasks.clustering)."""
    from pretext_tasks.clustering import kmeans, torch_kmeans

    features = clustered_features(n, dim, max(2, k // 2), seed)
    out = {'n': n, 'dim': dim, 'k': k, 'iterations': iters}
    try:
        import faiss
        out['faiss_version'] = faiss.__version__
        out['faiss_gpus'] = int(faiss.get_num_gpus()) if hasattr(faiss, 'get_num_gpus') else 0
        started = time.perf_counter()
        kmeans(features, k, iters=iters, seed=seed, use_gpu='auto')
        out['faiss_seconds'] = time.perf_counter() - started
        out['faiss_init'] = 'k-means++' if n * k <= 5e6 else 'random (FAISS seeding; kmeans(init="auto"))'
    except ImportError as exc:
        out['faiss_seconds'] = None
        out['faiss_error'] = str(exc)
    started = time.perf_counter()
    torch_kmeans(torch.from_numpy(features), k, iters=iters, seed=seed, init='random')
    out['torch_seconds'] = time.perf_counter() - started
    out['torch_init'] = 'random (k-means++ timed separately below)'
    started = time.perf_counter()
    torch_kmeans(torch.from_numpy(features), k, iters=0, seed=seed, init='k-means++')
    out['torch_kmeanspp_seeding_seconds'] = time.perf_counter() - started
    out['torch_threads'] = torch.get_num_threads()
    return out


@contextmanager
def quiet_logs():
    """Silence mmengine's and optuna's INFO chatter during measurements."""
    names = ('mmengine', 'optuna', 'benchmark')
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def command_line() -> str:
    return ' '.join([os.path.relpath(sys.argv[0]) if sys.argv and sys.argv[0] else 'python'] + sys.argv[1:])
