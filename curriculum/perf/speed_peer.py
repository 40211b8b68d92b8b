"""The peer baseline: mmpretrain's OWN MoCo v2 and SwAV training pipelines, sized like ours, for speed comparison.

Everything that makes a step is mmpretrain's/mmcv's/mmengine's: the view pipelines are read from mmpretrain's
packaged configs (``configs/mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py`` and
``configs/swav/swav_resnet50_8xb32-mcrop-coslr-200e_in1k-224px-96px.py``: ``LoadImageFromFile`` → ``MultiView`` of
per-image mmcv/PIL transforms → ``PackInputs``), the dataset is mmpretrain's ``CustomDataset`` over PNG files of
the SAME images our tasks train on, the loader is a torch DataLoader with mmengine's ``DefaultSampler`` and
``num_workers`` = CPU count (persistent workers, as the configs), the model is mmpretrain's ``MoCo`` / ``SwAV``
with its ``SelfSupDataPreprocessor`` and ``train_step``.

Changes to the configs, so that both sides do the same work (all recorded in the JSON):

* ResNet-18 (BN, not SyncBN) with necks/heads sized for its 512-d feature (hidden 512, output 128), MoCo's queue
  length and SwAV's prototype count taken from our task at the same number of images;
* crop sizes and crop area ranges as our task's (64 px; SwAV's local crops at our local size), the number of
  views/crops as ours, and the blur sigma range scaled by ``image_size / 224`` as ours;
* the collate function is the configs' ``default_collate`` (mmengine's): ``SelfSupDataPreprocessor`` stacks the
  views and asserts a dict, which ``pseudo_collate``'s per-sample lists do not give (checked in
  :func:`collate_check`).
"""
from __future__ import annotations

import copy
import os
import tempfile
import time

import numpy as np
import torch

from .speed import add_profile, block_result, measure_task, rate_for

MOCO_CONFIG = 'mocov2/mocov2_resnet50_8xb32-coslr-200e_in1k.py'
SWAV_CONFIG = 'swav/swav_resnet50_8xb32-mcrop-coslr-200e_in1k-224px-96px.py'
MEAN = [123.675, 116.28, 103.53]
STD = [58.395, 57.12, 57.375]


def mmpretrain_config_path(relative: str) -> str:
    """A config file shipped inside the mmpretrain package (``mmpretrain/.mim/configs``)."""
    import mmpretrain

    root = os.path.join(os.path.dirname(mmpretrain.__file__), '.mim', 'configs')
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'mmpretrain config {relative} not found under {root}')
    return path


def write_pngs(images: np.ndarray, folder: str) -> list[str]:
    """One PNG per image (RGB), the files the peer's ``LoadImageFromFile`` reads."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f'{index:06d}.png')
        array = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(np.ascontiguousarray(array)).save(path)
        paths.append(path)
    return paths


def _adapt_views(view_pipelines: list[list[dict]], sizes: list[int], scales: list[tuple], image_size: int) -> list:
    out = []
    for pipeline, size, scale in zip(view_pipelines, sizes, scales):
        pipeline = copy.deepcopy(pipeline)
        for transform in pipeline:
            if transform['type'] == 'RandomResizedCrop':
                transform['scale'] = int(size)
                transform['crop_ratio_range'] = tuple(float(s) for s in scale)
            elif transform['type'] == 'GaussianBlur' and transform.get('magnitude_range'):
                low, high = transform['magnitude_range']
                factor = image_size / 224
                transform['magnitude_range'] = (low * factor, high * factor)
        out.append(pipeline)
    return out


def peer_train_pipeline(kind: str, task) -> tuple[list[dict], dict]:
    """mmpretrain's training pipeline for ``kind`` ('moco' or 'swav') adapted to our task's views; also returns
    a description of what was changed."""
    from mmengine.config import Config

    path = mmpretrain_config_path(MOCO_CONFIG if kind == 'moco' else SWAV_CONFIG)
    cfg = Config.fromfile(path)
    pipeline = copy.deepcopy(cfg.to_dict()['train_pipeline'])
    multi = next(t for t in pipeline if t['type'] == 'MultiView')
    if kind == 'moco':
        sizes, scales, views = [task.image_size], [task.crop_scale], 2
        multi['transforms'] = _adapt_views(multi['transforms'], sizes, scales, task.image_size)
        multi['num_views'] = views
    else:
        sizes = [task.image_size] + ([task.local_size] if task.local_crops else [])
        scales = [task.global_scale] + ([task.local_scale] if task.local_crops else [])
        transforms = multi['transforms'][:len(sizes)]
        multi['transforms'] = _adapt_views(transforms, sizes, scales, task.image_size)
        multi['num_views'] = [task.global_crops] + ([task.local_crops] if task.local_crops else [])
    changes = {'config': os.path.relpath(path, os.path.dirname(os.path.dirname(path))),
               'crop_sizes': sizes, 'crop_area_ranges': [list(s) for s in scales],
               'num_views': multi['num_views'], 'blur_sigma_scale': task.image_size / 224,
               'original_num_views': cfg.get('num_crops', 2)}
    return pipeline, changes


def peer_model(kind: str, task):
    """mmpretrain's MoCo / SwAV with a ResNet-18 and necks/heads sized for it (queue/prototypes as our task's)."""
    from mmpretrain.registry import MODELS
    import mmpretrain.models  # noqa: F401

    preprocessor = dict(type='SelfSupDataPreprocessor', mean=MEAN, std=STD, to_rgb=True)
    if kind == 'moco':
        cfg = dict(type='MoCo', queue_len=task.queue_len, feat_dim=128, momentum=0.001,
                   backbone=dict(type='ResNet', depth=18, norm_cfg=dict(type='BN'), zero_init_residual=False),
                   neck=dict(type='MoCoV2Neck', in_channels=512, hid_channels=512, out_channels=128,
                             with_avg_pool=True),
                   head=dict(type='ContrastiveHead', loss=dict(type='CrossEntropyLoss'), temperature=0.2),
                   data_preprocessor=preprocessor)
    else:
        num_crops = [task.global_crops] + ([task.local_crops] if task.local_crops else [])
        cfg = dict(type='SwAV', data_preprocessor=preprocessor,
                   backbone=dict(type='ResNet', depth=18, norm_cfg=dict(type='BN'), zero_init_residual=True),
                   neck=dict(type='SwAVNeck', in_channels=512, hid_channels=512, out_channels=128,
                             with_avg_pool=True, norm_cfg=dict(type='BN1d')),
                   head=dict(type='SwAVHead', loss=dict(type='SwAVLoss', feat_dim=128, epsilon=0.05,
                                                        temperature=0.1, num_crops=num_crops,
                                                        num_prototypes=task.num_prototypes)))
    return MODELS.build(cfg)


def collate_check(dataset) -> str:
    """Why ``default_collate``: try ``pseudo_collate`` through SelfSupDataPreprocessor on two samples."""
    from mmengine.dataset import pseudo_collate
    from mmpretrain.models.utils import SelfSupDataPreprocessor

    preprocessor = SelfSupDataPreprocessor(mean=MEAN, std=STD, to_rgb=True)
    try:
        preprocessor(pseudo_collate([dataset[0], dataset[1]]), True)
        return 'pseudo_collate works with SelfSupDataPreprocessor'
    except Exception as exc:  # the documented assertion / a list where a tensor is needed
        return f'pseudo_collate fails in SelfSupDataPreprocessor: {type(exc).__name__}: {str(exc)[:120]}'


class LoaderCycle:
    """An endless pass over ``self.loader`` (a torch DataLoader whose workers start on the first batch)."""

    loader = None
    _iterator = None

    def start(self) -> None:
        """Start the loader workers (fork them) now, before any side's warm-up."""
        if self._iterator is None:
            self._iterator = iter(self.loader)

    def _next(self):
        while True:
            if self._iterator is None:
                self._iterator = iter(self.loader)
            try:
                return next(self._iterator)
            except StopIteration:
                self._iterator = None


class PeerTraining(LoaderCycle):
    """mmpretrain's pipeline + model for one algorithm, stepped by hand (``model.train_step``)."""

    def __init__(self, kind: str, task, png_dir: str, batch_size: int, device: str = 'cpu', seed: int = 0,
                 num_workers: int | None = None, lr: float = 0.05):
        from curriculum.compat import patch_mmcv_adjust_hue
        from mmengine.dataset import DefaultSampler, default_collate
        from mmengine.optim import OptimWrapper
        from mmpretrain.datasets import CustomDataset
        import mmpretrain.datasets  # noqa: F401  (registers the transforms)
        from mmpretrain.utils import register_all_modules
        from torch.utils.data import DataLoader

        register_all_modules(init_default_scope=True)
        patch_mmcv_adjust_hue()
        self.kind, self.device, self.batch_size = kind, device, int(batch_size)
        self.pipeline, self.changes = peer_train_pipeline(kind, task)
        self.dataset = CustomDataset(data_root=png_dir, with_label=False, pipeline=self.pipeline)
        self.collate_note = collate_check(self.dataset)
        self.num_workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
        torch.manual_seed(seed)
        self.model = peer_model(kind, task).to(device)
        self.model.train()
        self.optim_wrapper = OptimWrapper(torch.optim.SGD(self.model.parameters(), lr=float(lr),
                                                          momentum=0.9, weight_decay=1e-4))
        self.loader = DataLoader(self.dataset, batch_size=self.batch_size,
                                 sampler=DefaultSampler(self.dataset, shuffle=True, seed=seed),
                                 num_workers=self.num_workers, collate_fn=default_collate, drop_last=True,
                                 persistent_workers=self.num_workers > 0)
        self._iterator = None

    def step(self) -> dict:
        log = self.model.train_step(self._next(), self.optim_wrapper)
        return {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in log.items()}

    def worker_cpu_seconds(self) -> float:
        """CPU seconds used so far by the loader's worker processes (from /proc; 0 where unavailable)."""
        workers = getattr(self._iterator, '_workers', None) or []
        return sum(process_cpu_seconds(worker.pid) for worker in workers)

    def result(self, flops_per_step: float, timing: dict, steps: int, warmup: int, rates, profiled) -> dict:
        """This side's numbers from its blocks of :func:`curriculum.perf.speed.alternating_blocks` (fp32: the configs
        train without autocast)."""
        return peer_side_result(self, flops_per_step, timing, steps, warmup, rates, profiled, used='fp32', extra={
            'collate': 'mmengine default_collate (as the config)',
            'collate_note': self.collate_note,
            'pipeline_changes': self.changes,
            'pipeline': [t['type'] for t in self.pipeline],
        })

    def close(self) -> None:
        self._iterator = None
        self.loader = None


def peer_side_result(side, flops_per_step: float, timing: dict, steps: int, warmup: int, rates, profiled,
                     used: str, extra: dict) -> dict:
    """A peer's result: throughput against the matmul rate of precision ``used``, its per-round images/s, its
    data pipeline's CPU cost per image (measured in this process) and its loader workers' CPU seconds."""
    timed = steps * len(timing['walls'])
    result = block_result(flops_per_step, timing, steps, side.batch_size, rates, used)
    pipeline_s = pipeline_seconds_per_image(side.dataset)
    result.update({
        'precision': used,
        'warmup_steps': warmup,
        'build_seconds': getattr(side, 'build_seconds', None),
        'num_workers': side.num_workers,
        'num_images': len(side.dataset),
        **extra,
        'pipeline_cpu_seconds_per_image': pipeline_s,
        'pipeline_cpu_seconds_per_batch': pipeline_s * side.batch_size,
        'pipeline_share_of_step': pipeline_s * side.batch_size / (sum(timing['walls']) / timed),
        'worker_cpu_seconds_per_step': timing.get('worker_cpu', 0.0) / timed,
        'refill_wait_seconds_per_step': timing.get('refill_wait_seconds', 0.0) / timed,
        'cpu_seconds_note': ('cpu_seconds_per_step: main process; worker_cpu_seconds_per_step: the loader workers '
                             '(all their CPU time while the blocks ran, the waits between blocks included, per step '
                             'of this side). The workers finish prefetching between blocks (refill_wait_seconds_per_'
                             'step: the untimed wait after this side\'s blocks), so part of their work is in the CPU '
                             'ratio but not in images/s'),
    })
    add_profile(result, profiled, flops_per_step, rate_for(rates, used)[0])
    return result


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process from ``/proc/<pid>/stat`` (0 when it cannot be read)."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')
    except (OSError, ValueError, IndexError):
        return 0.0


def pipeline_seconds_per_image(dataset, count: int = 32) -> float:
    """CPU seconds per image of the peer's data pipeline (PNG decode, the views, packing), in this process."""
    count = min(count, len(dataset))
    started = time.process_time()
    for index in range(count):
        dataset[index]
    return (time.process_time() - started) / max(1, count)


def compare_with_peer(kind: str, images: np.ndarray, png_dir: str, matmul_flops_per_s, device: str = 'cpu',
                      batch_size: int = 64, warmup: int = 2, steps: int = 4, rounds: int = 2, profile: int = 1,
                      seed: int = 0, variants=()) -> tuple[dict, dict]:
    """Our task and mmpretrain's own pipeline for ``kind`` ('moco' / 'swav'), measured side by side: after the
    warm-up, ``rounds`` alternating blocks of ``steps`` steps each (ours, then the peer's), so slow changes in the
    machine's load hit both alike (:func:`curriculum.perf.speed.measure_task`). Returns (ours, peer) result dicts."""
    ours, peers, errors = measure_task(kind, images, matmul_flops_per_s, device, batch_size, warmup, steps, rounds,
                                       profile, seed, variants=variants,
                                       peers={'peer': peer_factory(kind, png_dir, batch_size, device, seed)})
    if errors:
        raise RuntimeError(errors['peer'])
    return ours, peers['peer']


def peer_factory(kind: str, png_dir: str, batch_size: int, device: str = 'cpu', seed: int = 0):
    """A :func:`curriculum.perf.speed.measure_task` peer factory: mmpretrain's pipeline sized from our task."""
    def build(ours):
        return PeerTraining(kind, ours.task, png_dir, batch_size, device, seed, lr=float(ours.cfg['lr']))
    return build


def peer_png_folder(images: np.ndarray) -> str:
    folder = tempfile.mkdtemp(prefix='bench-peer-png-')
    write_pngs(images, folder)
    return folder
