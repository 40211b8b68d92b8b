"""The online cluster memory on its own (pretext_tasks.cluster_memory): filling, momentum updates, repair of empty
clusters, and ODC's checkpoint keys, unchanged since the memory moved out of the task."""
import torch
import torch.nn.functional as F

from pretext_tasks.cluster_memory import ClusterMemory, flat_checkpoint_keys
from pretext_tasks.odc import ODC
from pretext_tasks.registry import TASKS

ODC_KEYS = {'memory_features', 'memory_labels', 'centroids', 'initialised'}


def unit_rows(n, dim, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_the_memory_module_registers_no_task():
    assert set(TASKS) >= {'odc'} and not any(cls is ClusterMemory for cls in TASKS.values())


def test_fill_gives_every_image_a_label_and_centroids_that_are_label_means():
    memory = ClusterMemory(60, 8, 4)
    features = unit_rows(60, 8)
    memory.fill(features, kmeans_iters=10, seed=0)
    assert torch.equal(memory.memory_features, features) and int(memory.cluster_sizes().sum()) == 60
    for c in range(4):
        members = features[memory.memory_labels == c]
        if len(members):
            torch.testing.assert_close(memory.centroids[c], F.normalize(members.mean(0), dim=0), atol=1e-5, rtol=0)
    assert not bool(memory.initialised)                     # the owner says when the memory is ready


def test_update_mixes_by_momentum_and_relabels_to_the_nearest_centroid():
    memory = ClusterMemory(20, 8, 3, momentum=0.75)
    memory.fill(unit_rows(20, 8), kmeans_iters=5, seed=0)
    old = memory.memory_features.clone()
    new = torch.randn(2, 8)
    memory.update(torch.tensor([4, 9]), new)
    expected = F.normalize(0.75 * old[[4, 9]] + 0.25 * F.normalize(new, dim=1), dim=1)
    torch.testing.assert_close(memory.memory_features[[4, 9]], expected)
    assert torch.equal(memory.memory_labels[[4, 9]], memory.nearest_centroid(expected))


def test_repair_splits_the_largest_cluster_and_a_hopeless_repair_is_noted():
    memory = ClusterMemory(30, 8, 3)
    memory.memory_features.copy_(unit_rows(30, 8))
    memory.memory_labels.copy_(torch.arange(30) % 2)         # cluster 2 empty
    memory.update_centroids()
    notes = []
    assert memory.repair_empty_clusters(torch.Generator().manual_seed(0), notes.append) == [2]
    assert bool((memory.cluster_sizes() > 0).all()) and not notes
    tiny = ClusterMemory(2, 8, 3, task='odc')
    tiny.memory_labels.copy_(torch.tensor([0, 1]))           # largest cluster has one member: cannot split
    assert tiny.repair_empty_clusters(torch.Generator().manual_seed(0), notes.append) == []
    assert notes == ['odc: cannot re-seed empty cluster 2: the largest cluster has 1 member(s)']


def test_odc_checkpoints_keep_the_memory_keys_at_the_task_level_and_load_them_back():
    task = ODC(None, {'num_clusters': 4, 'images_per_cluster': 5}, 40, 32)
    task.memory_labels.copy_(torch.arange(40) % 4)
    task.initialised.fill_(True)
    state = task.state_dict()
    assert ODC_KEYS <= set(state) and not any(key.startswith('memory.') for key in state)
    resumed = ODC(None, {'num_clusters': 4, 'images_per_cluster': 5}, 40, 32)
    resumed.load_state_dict(state, strict=True)
    assert bool(resumed.initialised) and torch.equal(resumed.memory_labels, task.memory_labels)


def test_flat_checkpoint_keys_work_under_a_wrapper_prefix():
    owner = torch.nn.Module()
    owner.memory = ClusterMemory(5, 2, 2)
    flat_checkpoint_keys(owner, 'memory')
    outer = torch.nn.Module()
    outer.module = owner
    state = outer.state_dict()
    assert {f'module.{key}' for key in ODC_KEYS} == set(state)
    state['module.memory_labels'] = torch.tensor([1, 0, 1, 0, 1])
    fresh = torch.nn.Module()
    fresh.module = torch.nn.Module()
    fresh.module.memory = ClusterMemory(5, 2, 2)
    flat_checkpoint_keys(fresh.module, 'memory')
    fresh.load_state_dict(state, strict=True)
    assert fresh.module.memory.memory_labels.tolist() == [1, 0, 1, 0, 1]
