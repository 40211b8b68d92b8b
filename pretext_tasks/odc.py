"""ODC: Online Deep Clustering (Zhan et al., CVPR 2020, https://arxiv.org/abs/2006.10645), task name ``odc``.

Written here because mmpretrain (the OpenMMLab successor this project builds on) has no ODC, and mmselfsup's (which
is frozen and needs an old mmcv) only runs distributed on CUDA and hard-codes ImageNet sizes (``length=1281167``,
10,000 clusters), and crashes when a cluster count does not suit the data (its issues #302, #704).

Model: backbone → pooled features → neck (fc-BN-ReLU-[dropout]-fc-ReLU, ODC's ``ODCNeck``; dropout off by default:
with few iterations its noise relabels most memory rows at every visit) → linear head over the clusters.
State: the online cluster memory (:class:`pretext_tasks.cluster_memory.ClusterMemory`, ``self.memory``: one
L2-normalised neck feature and one pseudo-label per training image, unit-norm centroids, an ``initialised`` flag),
all registered buffers, saved under the keys they always had (``memory_features``, ``memory_labels``,
``centroids``, ``initialised``) and readable as attributes of the task.

Life cycle:

1. :meth:`ODC.initialise_memory` (called by the task's hook in ``before_train``, after any backbone weights are
   loaded): neck features of every training image (clean views, batch-norm on batch statistics as in training,
   running statistics left untouched, no dropout), FAISS k-means (spherical), memory filled, centroids =
   normalised per-label means, small/empty clusters repaired, head re-initialised (``head_init``: ``random`` as
   ODC, or ``centroids``).
2. Every step (:meth:`ODC.compute_loss`): one augmented view per image; loss = cross-entropy of the head against the
   memory labels of the batch's dataset indices, with class weights ``count ** -reweight_pow`` normalised to sum 1
   (a weighted mean, so the loss reads like a plain CE: about ``log k`` at chance). Then, without gradients, the
   memory rows of the batch (all-gathered over ranks) are updated, ``f ← normalise(m·f_old + (1−m)·f_new)``, and
   re-labelled to their nearest centroid. Logged: ``pretext_acc`` (head vs pseudo-labels — the labels are the
   model's own, so this is not comparable to 1/k chance), ``changed_ratio`` (share of the batch whose label
   changed) and ``nonempty_clusters``.
3. Every ``centroid_update_interval`` iterations (:meth:`ODC.update_clusters`, from the hook): centroids =
   normalised per-label means; members of clusters smaller than the effective ``min_cluster_size`` go to their
   nearest remaining centroid; every cluster emptied that way (or already empty) is re-seeded by splitting the
   currently largest cluster in two (2-means on its memory features, a random half when that fails); the head rows
   of re-seeded clusters are re-initialised (and their SGD momentum cleared when the runner's optimiser is
   reachable).

Sizing from the data (never ImageNet constants): memory length = number of training images;
``k = min(num_clusters, max(2, num_images // images_per_cluster))`` (``images_per_cluster`` default 40 — on
1,200 synthetic_derm images k=30 gave a better kNN after a short run than k=120, and ImageNet's 10,000 stays
unchanged; a one-line warning says when the configured count was reduced); effective minimal cluster size
``min(min_cluster_size, max(1, num_images // (4 k)))``: at most a quarter of the mean cluster size, so
redistribution cannot keep emptying clusters that the repair just refilled (ImageNet's 20 with 10,000 clusters is
unchanged by this rule).

Distributed: memory updates all-gather (index, feature) pairs first, so every rank holds the same memory; cluster
updates run on every rank from the same seeded generator and rank 0's result is then broadcast. In one process
without ``torch.distributed`` these are no-ops.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dist import broadcast, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log

from . import augment
from .base import PretextTask, check_crop_scale, check_probabilities, config_number, config_positive, pool_last
from .cluster_memory import ClusterMemory, flat_checkpoint_keys
from .errors import PretextConfigError
from .registry import register_task

#: warnings already written by this process (each is still kept in every task's ``notes``)
_LOGGED_NOTES: set[str] = set()


def cluster_count(num_images: int, configured: int, images_per_cluster: int = 40) -> tuple[int, str | None]:
    """``min(configured, max(2, num_images // images_per_cluster))`` (never more than ``num_images``), and a
    one-line message when that is fewer clusters than configured."""
    configured = int(configured)
    if configured < 2:
        raise PretextConfigError(f'odc: num_clusters must be at least 2, got {configured}')
    per = max(1, int(images_per_cluster))
    limit = min(int(num_images), max(2, int(num_images) // per))
    if configured <= limit:
        return configured, None
    return limit, (f'odc: {num_images} training images support at most {limit} clusters '
                   f'({per} images per cluster); using k={limit} instead of the configured {configured}')


def effective_min_cluster_size(num_images: int, k: int, configured: int) -> int:
    """At most a quarter of the mean cluster size (and at least 1, i.e. only empty clusters are repaired)."""
    return max(1, min(int(configured), int(num_images) // (4 * int(k))))


class ODCNeck(nn.Module):
    """fc-BN-ReLU-dropout-fc-ReLU as in ODC (``hidden=0``: a single fc). The memory stores its L2-normalised
    output; the head classifies the un-normalised output."""

    def __init__(self, in_channels: int, hidden: int = 512, out_channels: int = 256, dropout: float = 0.0,
                 out_relu: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden > 0:
            layers += [nn.Linear(in_channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers.append(nn.Linear(hidden, out_channels))
        else:
            layers.append(nn.Linear(in_channels, out_channels))
        if out_relu:
            layers.append(nn.ReLU(inplace=True))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _from_memory(name: str) -> property:
    """A read-only attribute of the task that is its cluster memory's ``name``."""
    return property(lambda task: getattr(task.memory, name), doc=f"the cluster memory's ``{name}``")


@register_task
class ODC(PretextTask):
    """Online Deep Clustering (see the module docstring)."""

    name = 'odc'

    @classmethod
    def check_config(cls, task_cfg: dict, image_size: int) -> None:
        super().check_config(task_cfg, image_size)
        if config_number('odc', task_cfg, 'num_clusters', 10000, int) < 2:
            raise PretextConfigError(f'odc: num_clusters must be at least 2, got {task_cfg.get("num_clusters")}')
        memory_momentum = config_number('odc', task_cfg, 'memory_momentum', 0.5)
        if not 0.0 <= memory_momentum < 1.0:
            raise PretextConfigError(f'odc: memory_momentum must be in [0, 1), got {memory_momentum}')
        config_positive('odc', task_cfg, 'centroid_update_interval', 10, int)
        head_init = task_cfg.get('head_init', 'random')
        if head_init not in ('random', 'centroids'):
            raise PretextConfigError(f"odc: head_init must be 'random' or 'centroids', got {head_init!r}")
        for key, default in (('images_per_cluster', 40), ('min_cluster_size', 20), ('kmeans_iters', 20)):
            config_positive('odc', task_cfg, key, default, int)
        for key, default in (('reweight_pow', 0.5), ('head_init_scale', 10.0)):
            config_number('odc', task_cfg, key, default)
        check_crop_scale('odc', task_cfg, (0.2, 1.0))
        check_probabilities('odc', task_cfg, {'jitter_p': 0.8, 'grayscale_p': 0.2}, 'jitter_p', 'grayscale_p')

    def __init__(self, backbone: dict | None, task_cfg: dict, num_images: int, image_size: int, seed: int = 0):
        super().__init__(backbone, task_cfg, num_images, image_size, seed)
        self.notes: list[str] = []
        k, note = cluster_count(self.num_images, self.cfg('num_clusters', 10000), self.cfg('images_per_cluster', 40))
        if note:
            self._note(note)
        self.num_clusters = k
        self.reweight_pow = float(self.cfg('reweight_pow', 0.5))
        self.centroid_update_interval = int(self.cfg('centroid_update_interval', 10))
        self.kmeans_iters = int(self.cfg('kmeans_iters', 20))
        self.head_init = str(self.cfg('head_init', 'random'))
        self.head_init_scale = float(self.cfg('head_init_scale', 10.0))

        out_dim = int(self.cfg('neck_out', 256))
        self.neck = ODCNeck(self.feature_dim, int(self.cfg('neck_hidden', 512)), out_dim,
                            float(self.cfg('neck_dropout', 0.0)), bool(self.cfg('neck_out_relu', True)))
        self.head = nn.Linear(out_dim, k)
        self.memory_dim = out_dim
        self.memory = ClusterMemory(
            self.num_images, out_dim, k,
            min_cluster_size=effective_min_cluster_size(self.num_images, k, self.cfg('min_cluster_size', 20)),
            momentum=float(self.cfg('memory_momentum', 0.5)), task='odc')
        flat_checkpoint_keys(self, 'memory')
        self._feature_norm = 1.0
        self.reset_head(scale=0.0)

    # the memory's state, read as attributes of the task
    memory_features = _from_memory('memory_features')
    memory_labels = _from_memory('memory_labels')
    centroids = _from_memory('centroids')
    initialised = _from_memory('initialised')
    min_cluster_size = _from_memory('min_cluster_size')

    # -- helpers ------------------------------------------------------------------------------------------------
    def _note(self, message: str) -> None:
        """A one-line warning: kept in ``self.notes`` and written to the current mmengine log once per process
        (an LR search builds the same task for every trial; the message would repeat word for word)."""
        self.notes.append(message)
        if message not in _LOGGED_NOTES:
            _LOGGED_NOTES.add(message)
            print_log(message, logger='current', level=logging.WARNING)

    def _cluster_generator(self, salt: int) -> torch.Generator:
        generator = torch.Generator(device=self.centroids.device)
        generator.manual_seed((self.seed * 1_000_003 + self.iteration * 104_729 + salt) % (2 ** 63 - 1))
        return generator

    @torch.no_grad()
    def reset_head(self, rows: torch.Tensor | list[int] | None = None, scale: float | None = None) -> None:
        """Re-initialise the head (all rows, or only ``rows``), bias 0. ``head_init: random`` — weights
        N(0, 0.01²) as ODC's ClsHead; ``centroids`` — each row is its cluster's centroid times ``scale`` (default:
        the mean norm of the rows kept), so the fresh head already predicts the memory's nearest-centroid labels."""
        weight, bias = self.head.weight, self.head.bias
        if rows is None:
            rows = torch.arange(self.num_clusters, device=weight.device)
        rows = torch.as_tensor(rows, dtype=torch.long, device=weight.device)
        if rows.numel() == 0:
            return
        if self.head_init == 'centroids':
            if scale is None:
                kept = torch.ones(self.num_clusters, dtype=torch.bool, device=weight.device)
                kept[rows] = False
                scale = float(weight[kept].norm(dim=1).mean()) if bool(kept.any()) else 1.0
            weight[rows] = (self.centroids[rows] * scale).to(weight.dtype)
        else:
            generator = self._cluster_generator(salt=17)
            fresh = torch.randn(rows.numel(), weight.shape[1], generator=generator, device=weight.device) * 0.01
            weight[rows] = fresh.to(weight.dtype)
        bias[rows] = 0

    def make_inputs(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One training view: random resized crop + flip, colour jitter, random grayscale, normalisation."""
        x = augment.to_float_nchw(images)
        scale = tuple(self.cfg('crop_scale', (0.2, 1.0)))
        x = augment.random_resized_crop(x, self.image_size, generator, scale=scale)
        jitter = tuple(self.cfg('color_jitter', (0.4, 0.4, 0.4, 0.1)))
        x = augment.color_jitter(x, generator, *jitter, p=float(self.cfg('jitter_p', 0.8)))
        x = augment.random_grayscale(x, generator, p=float(self.cfg('grayscale_p', 0.2)))
        return augment.normalize(x)

    def _clean(self, images: torch.Tensor) -> torch.Tensor:
        x = augment.to_float_nchw(images)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode='bilinear', align_corners=False,
                              antialias=True)
        return augment.normalize(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(pool_last(self.backbone(x)))

    def class_weights(self) -> torch.Tensor:
        """ODC's loss re-weighting: ``max(count, 1) ** -reweight_pow``, normalised to sum 1."""
        return self.memory.class_weights(self.reweight_pow)

    def cluster_sizes(self) -> torch.Tensor:
        return self.memory.cluster_sizes()

    def _require_initialised(self) -> None:
        if not bool(self.initialised):
            raise PretextConfigError('odc: the memory is not initialised; train with the hooks from task.hooks() '
                                     '(or call task.initialise_memory(images) before the first step)')

    # -- memory initialisation ------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract_memory_features(self, images, batch_size: int = 256) -> torch.Tensor:
        """L2-normalised neck features of clean views of ``images`` (uint8 NHWC), computed as the training steps
        compute them (batch-norm on batch statistics) but without dropout and without touching any running
        statistic: a freshly initialised network's running statistics (mean 0, variance 1) describe nothing yet,
        and memory rows extracted in eval mode would all be relabelled by the first training-mode update."""
        device = self.memory_features.device
        images = images if torch.is_tensor(images) else torch.as_tensor(images)
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
        was_training = self.training
        self.train()
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        try:
            # no chunk of one image: batch-norm on batch statistics needs two
            bounds = list(range(0, len(images), batch_size)) + [len(images)]
            if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
                bounds[-2] -= 1
            out = [self._embed(self._clean(images[a:b].to(device))).float() for a, b in zip(bounds[:-1], bounds[1:])]
        finally:
            for module, state in zip(norms, saved):
                module.load_state_dict(state)
            self.train(was_training)
        out = torch.cat(out)
        self._feature_norm = float(out.norm(dim=1).mean().clamp(min=1e-6))
        return F.normalize(out, dim=1)

    @torch.no_grad()
    def initialise_memory(self, images, batch_size: int = 256) -> None:
        """Fill the memory from k-means on the features of all training images (uint8 NHWC, in dataset order)."""
        if len(images) != self.num_images:
            raise PretextConfigError(f'odc: the task was built for {self.num_images} images but initialise_memory '
                                     f'got {len(images)}')
        features = self.extract_memory_features(images, batch_size)
        k = self.num_clusters
        # clusters k-means leaves empty are re-seeded by update_clusters below
        self.memory.fill(features, self.kmeans_iters, self.seed)
        self.update_clusters()
        self.reset_head(scale=self.head_init_scale / self._feature_norm)
        self._broadcast_clusters()
        self.initialised.fill_(True)
        sizes = self.cluster_sizes()
        print_log(f'odc: memory initialised: {self.num_images} images, k={k}, cluster sizes '
                  f'{int(sizes.min())}..{int(sizes.max())}, min_cluster_size {self.min_cluster_size}',
                  logger='current')

    # -- per-step ----------------------------------------------------------------------------------------------
    def compute_loss(self, images, indices, generator):
        self._require_initialised()
        indices = indices.to(self.memory_labels.device, torch.long)
        z = self._embed(self.make_inputs(images, generator))
        logits = self.head(z).float()
        targets = self.memory_labels[indices]
        loss = F.cross_entropy(logits, targets, weight=self.class_weights())
        changed = self.update_memory(indices, z.detach())
        with torch.no_grad():
            acc = (logits.argmax(1) == targets).float().mean()
            nonempty = (self.cluster_sizes() > 0).sum().float()
        return {'loss': loss, 'pretext_acc': acc, 'changed_ratio': changed, 'nonempty_clusters': nonempty}

    def update_memory(self, indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Momentum update of the memory rows ``indices`` and their labels (:meth:`ClusterMemory.update`); returns
        the share of those rows whose label changed."""
        return self.memory.update(indices, features)

    # -- cluster maintenance ------------------------------------------------------------------------------------
    def update_centroids(self) -> None:
        """Centroids = L2-normalised per-label means of the memory (empty clusters keep theirs)."""
        self.memory.update_centroids()

    def repair_empty_clusters(self) -> list[int]:
        """Re-seed every empty cluster by splitting the currently largest one in two; returns their ids."""
        return self.memory.repair_empty_clusters(self._cluster_generator(salt=29), self._note)

    @torch.no_grad()
    def update_clusters(self) -> list[int]:
        """Periodic maintenance: centroids from the memory, small-cluster redistribution, empty-cluster repair,
        head rows of re-seeded clusters re-initialised. Returns the re-seeded cluster ids (rank 0's)."""
        self.memory.update_centroids()
        reseeded = self.memory.redistribute_small_clusters(self._cluster_generator(salt=29), self._note)
        if reseeded:
            self.reset_head(reseeded)
        self._broadcast_clusters()
        if get_world_size() > 1:
            holder = [reseeded]
            from mmengine.dist import broadcast_object_list
            broadcast_object_list(holder, 0)
            reseeded = holder[0]
        return reseeded

    def _broadcast_clusters(self) -> None:
        self.memory.broadcast_clusters()
        for tensor in (self.head.weight.data, self.head.bias.data):
            broadcast(tensor, 0)

    # -- validation ---------------------------------------------------------------------------------------------
    def evaluation_loss(self, images, generator):
        """Weighted CE of the head on a fixed augmented view against the nearest centroid of the image's clean
        view, with the training class weights. Nothing is updated. Before the memory exists: ``log k``."""
        if not bool(self.initialised):
            return torch.tensor(math.log(self.num_clusters))
        with torch.no_grad():
            clean = F.normalize(self._embed(self._clean(images)).float(), dim=1)
            targets = self.memory.nearest_centroid(clean)
            logits = self.head(self._embed(self.make_inputs(images, generator))).float()
            return F.cross_entropy(logits, targets, weight=self.class_weights())

    # -- hooks --------------------------------------------------------------------------------------------------
    def hooks(self) -> list:
        return [ODCHook(self)]


class ODCHook(Hook):
    """Initialises ODC's memory before training (unless a resume restored it), runs the periodic cluster update,
    and logs cluster statistics once per epoch."""

    priority = 'NORMAL'

    def __init__(self, task: ODC):
        self.task = task

    def before_train(self, runner) -> None:
        if bool(self.task.initialised):
            return
        loader = getattr(runner, 'train_dataloader', None)
        images = getattr(getattr(loader, 'dataset', None), 'images', None)
        if images is None:
            raise PretextConfigError('odc: the training dataset has no .images tensor to initialise the memory from')
        self.task.initialise_memory(images)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.task.centroid_update_interval):
            return
        reseeded = self.task.update_clusters()
        if reseeded:
            self._clear_head_momentum(runner, reseeded)

    def _clear_head_momentum(self, runner, rows: list[int]) -> None:
        wrapper = getattr(runner, 'optim_wrapper', None)
        optimizer = getattr(wrapper, 'optimizer', None)
        if optimizer is None or not hasattr(optimizer, 'state'):
            return
        for param in (self.task.head.weight, self.task.head.bias):
            state = optimizer.state.get(param, {})
            for key in ('momentum_buffer', 'exp_avg', 'exp_avg_sq'):
                buffer = state.get(key)
                if torch.is_tensor(buffer) and buffer.shape[:1] == param.shape[:1]:
                    buffer[rows] = 0

    def after_train_epoch(self, runner) -> None:
        sizes = self.task.cluster_sizes()
        message = (f'odc: epoch {runner.epoch + 1}: {int((sizes > 0).sum())}/{self.task.num_clusters} clusters '
                   f'non-empty, sizes {int(sizes.min())}..{int(sizes.max())}')
        log = getattr(runner, 'logger', None)
        if log is not None:
            log.info(message)
