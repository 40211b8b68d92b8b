"""pretext_tasks.clustering: FAISS k-means agrees with the torch reference, keeps every point, fails clearly.

Run ``python tests/test_clustering.py`` for the timing note (FAISS vs torch k-means at 25,000×256, k=1000).
"""
import time

import numpy as np
import pytest
import torch

from pretext_tasks.clustering import kmeans, torch_kmeans


def adjusted_rand_index(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    _, a = np.unique(a, return_inverse=True)
    _, b = np.unique(b, return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1), dtype=np.int64)
    np.add.at(table, (a, b), 1)

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(a) * (len(a) - 1) / 2
    expected = rows * cols / total
    return float((index - expected) / (0.5 * (rows + cols) - expected))


def blobs(n_per=60, k=6, dim=16, spread=0.3, seed=0):
    """Well-separated clusters: centres are scaled orthogonal directions."""
    rng = np.random.default_rng(seed)
    centres = 4.0 * np.eye(dim)[:k] + 1.0
    truth = np.repeat(np.arange(k), n_per)
    x = centres[truth] + spread * rng.normal(size=(len(truth), dim))
    order = rng.permutation(len(truth))
    return x[order].astype(np.float32), truth[order]


@pytest.mark.parametrize('spherical', [False, True])
def test_faiss_and_torch_find_the_same_partition(spherical):
    x, truth = blobs()
    _, faiss_labels = kmeans(x, 6, seed=1, spherical=spherical)
    _, torch_labels = torch_kmeans(x, 6, seed=1, spherical=spherical)
    assert adjusted_rand_index(faiss_labels, torch_labels) == pytest.approx(1.0)
    assert adjusted_rand_index(faiss_labels, truth) == pytest.approx(1.0)
    _, random_init = torch_kmeans(x, 6, seed=3, init='random', iters=50)
    assert adjusted_rand_index(random_init, truth) > 0.7   # Lloyd from random seeds: may merge two blobs


def test_centroids_are_means_of_their_points_and_types_follow_the_input():
    x, _ = blobs(seed=2)
    centroids, labels = kmeans(x, 6, seed=0)
    assert isinstance(centroids, np.ndarray) and centroids.shape == (6, 16) and centroids.dtype == np.float32
    assert labels.shape == (len(x),) and labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 6
    for c in range(6):
        np.testing.assert_allclose(centroids[c], x[labels == c].mean(0), atol=1e-4)
    t_centroids, t_labels = kmeans(torch.from_numpy(x), 6, seed=0, spherical=True)
    assert torch.is_tensor(t_centroids) and torch.is_tensor(t_labels) and t_labels.dtype == torch.int64
    torch.testing.assert_close(t_centroids.norm(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    ref_centroids, ref_labels = torch_kmeans(torch.from_numpy(x), 6, seed=0)
    assert torch.is_tensor(ref_centroids) and ref_labels.dtype == torch.int64


def test_same_seed_same_result():
    x = np.random.default_rng(5).normal(size=(400, 8)).astype(np.float32)
    assert np.array_equal(kmeans(x, 7, seed=3)[1], kmeans(x, 7, seed=3)[1])
    assert np.array_equal(torch_kmeans(x, 7, seed=3)[1], torch_kmeans(x, 7, seed=3)[1])


def test_fewer_points_than_clusters_is_a_clear_value_error():
    x = np.zeros((3, 4), dtype=np.float32)
    for fn in (kmeans, torch_kmeans):
        with pytest.raises(ValueError, match='k=5 clusters needs at least 5 points, got 3'):
            fn(x, 5)


def test_faiss_uses_every_point_unless_told_to_subsample(capfd):
    x = np.random.default_rng(0).normal(size=(3000, 8)).astype(np.float32)  # > 256 (FAISS default) per centroid
    kmeans(x, 4, iters=2, verbose=True)
    assert 'Sampling a subset' not in capfd.readouterr().out
    kmeans(x, 4, iters=2, verbose=True, max_points_per_centroid=100)
    assert 'Sampling a subset' in capfd.readouterr().out


def test_tiny_and_degenerate_inputs():
    # N == k and duplicated points must not crash either implementation
    x = np.array([[0, 0], [0, 0], [1, 1], [5, 5]], dtype=np.float32)
    for fn in (kmeans, torch_kmeans):
        centroids, labels = fn(x, 4, seed=0)
        assert centroids.shape == (4, 2) and labels.shape == (4,)
        assert labels[2] != labels[3] and labels[0] == labels[1]


def _benchmark(n=25_000, dim=256, k=1000, iters=20) -> None:
    x = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    for name, fn, kwargs in [('faiss k-means++ init', kmeans, {'init': 'k-means++'}),
                             ('faiss random init (the default at this size)', kmeans, {'init': 'random'}),
                             ('torch k-means++ init', torch_kmeans, {}),
                             ('torch random init', torch_kmeans, {'init': 'random'})]:
        start = time.perf_counter()
        fn(x, k, iters=iters, **kwargs)
        print(f'| {name} | {n}x{dim}, k={k}, {iters} iters | {time.perf_counter() - start:.1f} s |', flush=True)


if __name__ == '__main__':
    _benchmark()
