"""k-means for ODC's memory initialisation (and anything else that needs a partition of feature vectors).

:func:`kmeans` runs FAISS (``faiss.Kmeans``; on a GPU when FAISS sees one, else on the CPU) with a fixed seed and
without FAISS's silent subsampling of large-enough datasets. :func:`torch_kmeans` is a plain, chunked torch
implementation (k-means++ or random initialisation) kept as a reference for tests and as a fallback where FAISS is
unavailable; it also runs on whatever device the features are on.

Both take ``features`` of shape ``(N, D)`` (float numpy array or torch tensor) and return
``(centroids (k, D) float32, assignments (N,) int64)`` as the same kind of object that came in (numpy in → numpy
out, torch in → torch out on the input's device). With ``spherical=True`` the features are L2-normalised first and
the centroids are kept on the unit sphere, i.e. cosine k-means.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def _check(n: int, k: int) -> None:
    if k < 1:
        raise ValueError(f'k-means needs k >= 1, got k={k}')
    if n < k:
        raise ValueError(f'k-means with k={k} clusters needs at least {k} points, got {n} '
                         f'(reduce the number of clusters)')


def _to_numpy(features: Any) -> np.ndarray:
    if torch.is_tensor(features):
        features = features.detach().float().cpu().numpy()
    return np.ascontiguousarray(np.asarray(features, dtype=np.float32))


def _faiss_gpu_available(use_gpu: bool | str) -> bool:
    if use_gpu is False or use_gpu == 'never':
        return False
    import faiss
    try:
        available = faiss.get_num_gpus() > 0
    except AttributeError:  # a faiss-cpu build
        available = False
    if use_gpu is True and not available:
        raise ValueError('kmeans(use_gpu=True): FAISS sees no GPU (faiss.get_num_gpus() == 0)')
    return available


def kmeans(features: np.ndarray | torch.Tensor, k: int, iters: int = 20, seed: int = 0,
           use_gpu: bool | str = 'auto', spherical: bool = False, init: str = 'auto',
           max_points_per_centroid: int | None = None, nredo: int = 1, verbose: bool = False):
    """FAISS k-means. ``use_gpu``: 'auto' (a GPU index when ``faiss.get_num_gpus() > 0``), True or False.

    ``init``: 'k-means++' (seeds computed in torch, then handed to FAISS: FAISS's own random seeding often merges
    two well-separated clusters and splits another, and Lloyd iterations rarely undo that), 'random' (FAISS's own
    seeding; ``nredo`` restarts keep the best objective — only used with 'random') or 'auto': k-means++ while
    ``N * k <= 5e6`` (k sequential passes over the data cost about as much as the k-means itself beyond that, and
    with many clusters one merged pair matters little), else random.

    ``max_points_per_centroid``: FAISS trains on a random subsample of ``k * max_points_per_centroid`` points
    when there are more (its default, 256, silently subsamples); the default here is ``ceil(N / k)``, i.e. every
    point is used. Pass a number to subsample on purpose. Raises ValueError when ``N < k``.
    """
    import faiss

    as_torch = torch.is_tensor(features)
    device = features.device if as_torch else None
    x = _to_numpy(features)
    if x.ndim != 2:
        raise ValueError(f'k-means expects features of shape (N, D), got {x.shape}')
    n, dim = x.shape
    _check(n, k)
    if not np.isfinite(x).all():
        raise ValueError('k-means: features contain NaN or infinite values')
    if spherical:
        x = x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
    if max_points_per_centroid is None:
        max_points_per_centroid = max(1, math.ceil(n / k))
    gpu = _faiss_gpu_available(use_gpu)
    clus = faiss.Kmeans(dim, int(k), niter=int(iters), nredo=int(nredo), verbose=verbose, spherical=spherical,
                        seed=int(seed), min_points_per_centroid=1,
                        max_points_per_centroid=int(max_points_per_centroid), gpu=1 if gpu else False)
    if init == 'auto':
        init = 'k-means++' if n * k <= 5e6 else 'random'
    if init == 'k-means++':
        generator = torch.Generator().manual_seed(int(seed))
        seeds = _kmeans_pp(torch.from_numpy(x), int(k), generator).numpy()
        clus.cp.nredo = 1
        clus.train(x, init_centroids=np.ascontiguousarray(seeds, dtype=np.float32))
    elif init == 'random':
        clus.train(x)
    else:
        raise ValueError(f"kmeans: init must be 'k-means++' or 'random', got {init!r}")
    centroids = np.ascontiguousarray(clus.centroids, dtype=np.float32).reshape(k, dim)
    _, assignment = clus.index.search(x, 1)
    assignment = assignment.reshape(-1).astype(np.int64)
    if as_torch:
        return torch.from_numpy(centroids).to(device), torch.from_numpy(assignment).to(device)
    return centroids, assignment


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (squared L2) for every row of ``x``, in chunks: (labels, squared distances)."""
    c_sq = (centroids * centroids).sum(1)
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start:start + chunk_size]
        d = (chunk * chunk).sum(1, keepdim=True) - 2 * chunk @ centroids.T + c_sq
        best, idx = d.min(dim=1)
        labels.append(idx)
        dists.append(best.clamp_(min=0))
    return torch.cat(labels), torch.cat(dists)


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D² sampling): k sequential passes over the data, one matrix-vector product each."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    chosen = [first]
    closest = (x_sq - 2 * (x @ x[first]) + x_sq[first]).clamp_(min=0)
    for _ in range(1, k):
        total = closest.sum()
        if float(total) <= 0:  # every point already coincides with a centroid: pick any
            choice = int(torch.randint(n, (1,), generator=generator, device=x.device))
        else:
            choice = int(torch.multinomial(closest / total, 1, generator=generator))
        chosen.append(choice)
        torch.minimum(closest, (x_sq - 2 * (x @ x[choice]) + x_sq[choice]).clamp_(min=0), out=closest)
    return x[torch.tensor(chosen, device=x.device)].clone()


def torch_kmeans(features: np.ndarray | torch.Tensor, k: int, iters: int = 20, seed: int = 0,
                 init: str = 'k-means++', spherical: bool = False, chunk_size: int = 8192):
    """Plain Lloyd k-means in torch (reference / fallback). ``init``: 'k-means++' or 'random'.

    An empty cluster is re-seeded with the point farthest from its centroid. Raises ValueError when ``N < k``.
    """
    as_torch = torch.is_tensor(features)
    x = features.detach().float() if as_torch else torch.from_numpy(_to_numpy(features))
    if x.ndim != 2:
        raise ValueError(f'k-means expects features of shape (N, D), got {tuple(x.shape)}')
    n = x.shape[0]
    _check(n, k)
    if spherical:
        x = F.normalize(x, dim=1)
    generator = torch.Generator(device=x.device)
    generator.manual_seed(int(seed))
    if init == 'k-means++':
        centroids = _kmeans_pp(x, k, generator)
    elif init == 'random':
        centroids = x[torch.randperm(n, generator=generator, device=x.device)[:k]].clone()
    else:
        raise ValueError(f"torch_kmeans: init must be 'k-means++' or 'random', got {init!r}")
    labels, dists = _assign(x, centroids, chunk_size)
    for _ in range(int(iters)):
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k)
        nonempty = counts > 0
        centroids = torch.where(nonempty[:, None], sums / counts.clamp(min=1)[:, None].to(x.dtype), centroids)
        empty = torch.nonzero(~nonempty).flatten().tolist()
        if empty:  # re-seed empty clusters with the worst-fitted points
            far = dists.argsort(descending=True)[:len(empty)]
            centroids[empty] = x[far]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
        new_labels, dists = _assign(x, centroids, chunk_size)
        if torch.equal(new_labels, labels) and not empty:
            labels = new_labels
            break
        labels = new_labels
    if as_torch:
        return centroids, labels
    return centroids.numpy(), labels.numpy()
