"""An online cluster memory: one L2-normalised feature and one pseudo-label per training image, and spherical
cluster centres, kept up to date while a network trains (ODC's memory, composed by :class:`pretext_tasks.odc.ODC`).

Not a task (nothing here registers one): the owner computes the features and decides when to call what.
State, all registered buffers (so checkpoints carry them and a resume restores them):

* ``memory_features (num_images, D)``: one L2-normalised feature per training image;
* ``memory_labels (num_images,)``: the image's pseudo-label (cluster);
* ``centroids (k, D)``: unit-norm cluster centres (spherical: labels are the argmax of cosine similarity);
* ``initialised``: set by the owner once the memory has been filled.

What it does: fill itself from spherical FAISS k-means (:meth:`ClusterMemory.fill`); momentum-update rows and
re-label them to their nearest centroid (:meth:`ClusterMemory.update`); recompute centroids as normalised per-label
means; move the members of clusters smaller than ``min_cluster_size`` to their nearest other centroid; re-seed
every empty cluster by splitting the currently largest one in two.

Distributed: :meth:`ClusterMemory.update` all-gathers (index, feature) pairs first, so every rank holds the same
memory; :meth:`ClusterMemory.broadcast_clusters` copies rank 0's labels and centroids to every rank. In one process
without ``torch.distributed`` these are no-ops.

:func:`flat_checkpoint_keys` lets an owner keep these buffers' checkpoint keys at its own level (``memory_features``
rather than ``memory.memory_features``), as they were when ODC held the buffers itself.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.dist import all_gather, broadcast, get_world_size

from .clustering import kmeans, torch_kmeans


def gather_rows(indices: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (index, feature) rows from every rank (batches may differ in size); a no-op in one process."""
    if get_world_size() == 1:
        return indices, features
    count = torch.tensor([indices.shape[0]], device=features.device)
    counts = [int(c) for c in all_gather(count)]
    longest = max(counts)
    pad = longest - indices.shape[0]
    if pad:
        indices = torch.cat([indices, indices.new_zeros(pad)])
        features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    gathered_idx = all_gather(indices)
    gathered_feat = all_gather(features)
    return (torch.cat([g[:c] for g, c in zip(gathered_idx, counts)]),
            torch.cat([g[:c] for g, c in zip(gathered_feat, counts)]))


class ClusterMemory(nn.Module):
    """Features, pseudo-labels and centroids of ``num_images`` images in ``num_clusters`` clusters (see the module
    docstring). ``task`` names the owner in the memory's messages."""

    def __init__(self, num_images: int, dim: int, num_clusters: int, min_cluster_size: int = 1,
                 momentum: float = 0.5, task: str = 'cluster memory'):
        super().__init__()
        self.num_clusters = int(num_clusters)
        self.min_cluster_size = int(min_cluster_size)
        self.momentum = float(momentum)
        self.task = task
        self.register_buffer('memory_features', torch.zeros(int(num_images), int(dim)))
        self.register_buffer('memory_labels', torch.zeros(int(num_images), dtype=torch.long))
        self.register_buffer('centroids', torch.zeros(self.num_clusters, int(dim)))
        self.register_buffer('initialised', torch.zeros((), dtype=torch.bool))

    # -- reading ------------------------------------------------------------------------------------------------
    def cluster_sizes(self) -> torch.Tensor:
        """Members per cluster, ``(k,)``."""
        return torch.bincount(self.memory_labels, minlength=self.num_clusters)

    def class_weights(self, power: float) -> torch.Tensor:
        """ODC's loss re-weighting: ``max(count, 1) ** -power``, normalised to sum 1."""
        counts = self.cluster_sizes().float()
        weights = counts.clamp(min=1).pow(-power)
        return weights / weights.sum()

    def nearest_centroid(self, features: torch.Tensor) -> torch.Tensor:
        """The label of each row of ``features`` (unit rows): its most cosine-similar centroid."""
        return (features @ self.centroids.T).argmax(dim=1)

    def _label_means(self) -> torch.Tensor:
        """Per-label mean of the memory features; rows of empty clusters are the current centroids."""
        sums = torch.zeros_like(self.centroids).index_add_(0, self.memory_labels, self.memory_features)
        counts = self.cluster_sizes()
        means = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        return torch.where((counts > 0).unsqueeze(1), means, self.centroids)

    # -- filling and updating -----------------------------------------------------------------------------------
    @torch.no_grad()
    def fill(self, features: torch.Tensor, kmeans_iters: int, seed: int) -> None:
        """Every row from ``features`` (unit rows, one per image, on the memory's device), labels from spherical
        k-means, both then broadcast from rank 0; centroids = normalised per-label means (clusters k-means left
        empty keep their old centroid until the owner repairs them)."""
        _, labels = kmeans(features.cpu(), self.num_clusters, iters=kmeans_iters, seed=seed, spherical=True)
        self.memory_features.copy_(features)
        self.memory_labels.copy_(labels.to(self.memory_labels.device))
        broadcast(self.memory_features, 0)
        broadcast(self.memory_labels, 0)
        self.centroids.copy_(F.normalize(self._label_means(), dim=1))

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Momentum update of the memory rows ``indices`` (gathered over ranks), ``f ← normalise(m·f_old +
        (1−m)·normalise(f_new))``, and their nearest-centroid labels; returns the share of those rows whose label
        changed."""
        indices = indices.to(self.memory_features.device, torch.long)
        new = F.normalize(features.float().to(self.memory_features.device), dim=1)
        indices, new = gather_rows(indices, new)
        m = self.momentum
        mixed = F.normalize(m * self.memory_features[indices] + (1 - m) * new, dim=1)
        self.memory_features[indices] = mixed
        labels = self.nearest_centroid(mixed)
        changed = (labels != self.memory_labels[indices]).float().mean()
        self.memory_labels[indices] = labels
        return changed

    # -- cluster maintenance ------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_centroids(self) -> None:
        """Centroids = L2-normalised per-label means of the memory (empty clusters keep theirs)."""
        self.centroids.copy_(F.normalize(self._label_means(), dim=1))

    @torch.no_grad()
    def redistribute_small_clusters(self, generator: torch.Generator, note: Callable[[str], None]) -> list[int]:
        """Move the members of clusters smaller than ``min_cluster_size`` to their nearest other centroid and
        re-seed every cluster left empty (:meth:`repair_empty_clusters`). Returns the re-seeded cluster ids."""
        sizes = self.cluster_sizes()
        small = torch.nonzero(sizes < self.min_cluster_size).flatten()
        if small.numel() == 0:
            return []
        if small.numel() == self.num_clusters:  # cannot happen with ODC's sizing rules; keep the largest anyway
            small = small[small != int(sizes.argmax())]
        members = torch.isin(self.memory_labels, small)
        if bool(members.any()):
            sims = self.memory_features[members] @ self.centroids.T
            sims[:, small] = -float('inf')
            self.memory_labels[members] = sims.argmax(dim=1)
        return self.repair_empty_clusters(generator, note)

    @torch.no_grad()
    def repair_empty_clusters(self, generator: torch.Generator, note: Callable[[str], None]) -> list[int]:
        """Re-seed every empty cluster by splitting the currently largest one in two; returns their ids. When the
        largest cluster has fewer than two members, ``note`` gets a one-line message and the repair stops."""
        sizes = self.cluster_sizes()
        empty = torch.nonzero(sizes == 0).flatten().tolist()
        repaired = []
        for cluster in empty:
            biggest = int(sizes.argmax())
            members = torch.nonzero(self.memory_labels == biggest).flatten()
            if members.numel() < 2:
                note(f'{self.task}: cannot re-seed empty cluster {cluster}: the largest cluster has '
                     f'{members.numel()} member(s)')
                break
            part = self._split(members, generator)
            self.memory_labels[part] = cluster
            sizes[biggest] -= part.numel()
            sizes[cluster] = part.numel()
            for c in (biggest, cluster):
                self.centroids[c] = F.normalize(self.memory_features[self.memory_labels == c].mean(0), dim=0)
            repaired.append(cluster)
        return repaired

    def _split(self, members: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The members that go to the new cluster: one side of a 2-means split, or a random half if it fails."""
        feats = self.memory_features[members]
        try:
            _, side = torch_kmeans(feats, 2, iters=10, seed=int(torch.randint(2 ** 31 - 1, (1,),
                                   generator=generator, device=generator.device)), spherical=True)
        except ValueError:
            side = torch.zeros(members.numel(), dtype=torch.long, device=members.device)
        count = int(side.sum())
        if count == 0 or count == members.numel():
            order = torch.randperm(members.numel(), generator=generator, device=generator.device)
            return members[order.to(members.device)[:members.numel() // 2]]
        return members[side == 1]

    def broadcast_clusters(self) -> None:
        """Rank 0's labels and centroids to every rank (a no-op in one process)."""
        for tensor in (self.memory_labels, self.centroids):
            broadcast(tensor, 0)


# -- checkpoint keys --------------------------------------------------------------------------------------------
def flat_checkpoint_keys(owner: nn.Module, child_name: str) -> None:
    """Save the buffers of ``owner.<child_name>`` under the owner's own names (``memory_features``, not
    ``memory.memory_features``) and load them from there, so checkpoints keep the keys they had before the buffers
    moved into the child module."""
    owner.register_state_dict_post_hook(functools.partial(_lift_child_keys, child_name))
    owner.register_load_state_dict_pre_hook(functools.partial(_lower_child_keys, child_name))


def _lift_child_keys(child_name: str, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: ``<prefix><child>.<name>`` → ``<prefix><name>``."""
    inner = f'{prefix}{child_name}.'
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _lower_child_keys(child_name: str, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Load pre-hook: ``<prefix><name>`` → ``<prefix><child>.<name>`` for each buffer of the child."""
    for name, _ in getattr(module, child_name).named_buffers(recurse=False):
        if prefix + name in state_dict:
            state_dict[f'{prefix}{child_name}.{name}'] = state_dict.pop(prefix + name)
