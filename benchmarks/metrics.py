"""Classification metrics for the downstream benchmarks (numpy only).

Written by hand rather than taken from mmpretrain's evaluators: those have no Cohen's kappa and no ROC AUC, and
their macro recall / F1 average over *all* classes, so a class absent from the test set (ISIC-2019's UNK, a rare
class of a small label fraction) enters as a zero. Here every per-class average runs over the classes *present*
in ``y_true``.

* :func:`classification_metrics` – single-label, ``scores`` are ``(N, K)`` class probabilities.
* :func:`multilabel_metrics` – ``(N, C)`` targets in {0, 1} with NaN = unknown (ignored), ``scores`` are
  per-label probabilities (threshold 0.5).
* :func:`bootstrap_ci` – 95 % percentile bootstrap interval over test images.
* :func:`t_quantile`, :func:`mean_t_interval` – Student-t intervals over seeds or images (the one copy the
  leaderboard, the study report and the attention benchmark share).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

HEADLINE_SINGLE = 'balanced_accuracy'
HEADLINE_MULTILABEL = 'auc'


def headline_metric(multilabel: bool) -> str:
    """Name of the metric used for model selection and reported first."""
    return HEADLINE_MULTILABEL if multilabel else HEADLINE_SINGLE


def midranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of ``values`` where tied values share the mean of their ranks."""
    values = np.asarray(values)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    return (last_rank - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the Mann–Whitney U statistic (ties count one half); NaN when one class is missing."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float('nan')
    ranks = midranks(np.asarray(scores, dtype=np.float64))
    u_stat = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u_stat / (n_pos * n_neg))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts, rows = true class, columns = predicted class."""
    flat = np.asarray(y_true, dtype=np.int64) * num_classes + np.asarray(y_pred, dtype=np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def cohen_kappa(confusion: np.ndarray) -> float:
    """Unweighted Cohen's kappa of a confusion matrix; NaN when chance agreement is 1 (degenerate)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum()
    if total == 0:
        return float('nan')
    observed = np.trace(confusion) / total
    expected = float((confusion.sum(0) * confusion.sum(1)).sum() / total ** 2)
    if expected >= 1.0 - 1e-12:
        return float('nan')
    return float((observed - expected) / (1.0 - expected))


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, num_classes: int | None = None) -> dict:
    """Single-label metrics from ``(N,)`` int labels and ``(N, K)`` scores (prediction = argmax).

    balanced_accuracy and macro_f1 average over classes present in ``y_true``; auc is the macro one-vs-rest ROC AUC
    over present classes (NaN only when fewer than two are present); kappa is unweighted Cohen's kappa.
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or len(scores) != len(y_true):
        raise ValueError(f'scores must be (N, K) with N = {len(y_true)}, got {scores.shape}')
    num_classes = scores.shape[1] if num_classes is None else int(num_classes)
    if len(y_true) == 0:
        raise ValueError('classification_metrics needs at least one sample')
    if y_true.min() < 0 or y_true.max() >= num_classes or scores.shape[1] > num_classes:
        raise ValueError(f'labels must lie in [0, {num_classes}) and scores have at most {num_classes} columns')
    y_pred = scores.argmax(1)
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    support = confusion.sum(1)
    present = np.flatnonzero(support > 0)
    true_pos = np.diag(confusion)[present].astype(np.float64)
    recall = true_pos / support[present]
    predicted = confusion.sum(0)[present]
    f1 = 2.0 * true_pos / (support[present] + predicted)  # 2TP / (2TP + FP + FN); denominator > 0 (support > 0)
    if len(present) >= 2:
        auc = float(np.mean([binary_auc(y_true == c, scores[:, c]) for c in present]))
    else:
        auc = float('nan')
    return {
        'balanced_accuracy': float(recall.mean()),
        'accuracy': float((y_pred == y_true).mean()),
        'macro_f1': float(f1.mean()),
        'auc': auc,
        'kappa': cohen_kappa(confusion),
    }


def _nanmean(values: list[float]) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float('nan')


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """Multi-label metrics from ``(N, C)`` targets (NaN = ignored) and ``(N, C)`` probabilities.

    auc (headline): macro over labels whose known targets hold both values; balanced_accuracy: mean over labels of
    the per-label balanced accuracy at threshold 0.5 (over the values present); accuracy: element-wise over known
    targets; macro_f1: mean positive-class F1 over labels with at least one positive; kappa: mean per-label kappa.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.ndim != 2 or y_true.shape != scores.shape:
        raise ValueError(f'y_true and scores must both be (N, C), got {y_true.shape} and {scores.shape}')
    known = ~np.isnan(y_true)
    if not known.any():
        raise ValueError('multilabel_metrics: every target is NaN')
    aucs, balanced, f1s, kappas = [], [], [], []
    for label in range(y_true.shape[1]):
        mask = known[:, label]
        if not mask.any():
            continue
        truth = y_true[mask, label] > 0.5
        score = scores[mask, label]
        pred = score >= 0.5
        aucs.append(binary_auc(truth, score))
        recalls = [(pred[truth == value] == value).mean() for value in (True, False) if (truth == value).any()]
        balanced.append(float(np.mean(recalls)))
        if truth.any():
            tp = float((pred & truth).sum())
            f1s.append(2.0 * tp / (truth.sum() + pred.sum()))
        kappas.append(cohen_kappa(confusion_matrix(truth, pred, 2)))
    correct = (scores >= 0.5) == (y_true > 0.5)
    return {
        'auc': _nanmean(aucs),
        'balanced_accuracy': _nanmean(balanced),
        'accuracy': float(correct[known].mean()),
        'macro_f1': _nanmean(f1s),
        'kappa': _nanmean(kappas),
    }


def compute_metrics(y_true: np.ndarray, scores: np.ndarray, multilabel: bool) -> dict:
    """:func:`multilabel_metrics` or :func:`classification_metrics` according to ``multilabel``."""
    if multilabel:
        return multilabel_metrics(y_true, scores)
    return classification_metrics(y_true, scores, np.asarray(scores).shape[1])


def bootstrap_ci(y_true: np.ndarray, scores: np.ndarray, metric_fn: Callable[[np.ndarray, np.ndarray], float],
                 n: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``metric_fn(y_true, scores)`` resampling test images with replacement.

    Resamples where the metric is undefined (NaN, e.g. a single class drawn) are left out; (NaN, NaN) when all are.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    rng = np.random.RandomState(seed)
    count = len(y_true)
    values = np.empty(n, dtype=np.float64)
    for i in range(n):
        pick = rng.randint(0, count, size=count)
        values[i] = float(metric_fn(y_true[pick], scores[pick]))
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float('nan'), float('nan')
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def test_metrics(y_true: np.ndarray, scores: np.ndarray, multilabel: bool, n_bootstrap: int = 1000,
                 seed: int = 0) -> dict:
    """Test-split metrics plus a 95 % percentile-bootstrap interval (over test images) of the headline metric,
    stored as ``'<headline>_ci': [low, high]``: the confidence interval a single-seed result is reported with."""
    result = compute_metrics(y_true, scores, multilabel)
    headline = headline_metric(multilabel)

    def headline_of(y, s):
        return compute_metrics(y, s, multilabel)[headline] if multilabel else \
            classification_metrics(y, s, np.asarray(s).shape[1])[headline]

    if n_bootstrap > 0:
        result[f'{headline}_ci'] = list(bootstrap_ci(y_true, scores, headline_of, n=n_bootstrap, seed=seed))
    return result


def _t_central_mass(t: float, df: float, steps: int = 2000) -> float:
    """P(0 < T < t) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density; no SciPy)."""
    x = np.linspace(0.0, t, steps + 1)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(log_norm - (df + 1) / 2 * np.log1p(x * x / df))
    h = t / steps
    return float(h / 3 * (pdf[0] + pdf[-1] + 4 * pdf[1:-1:2].sum() + 2 * pdf[2:-1:2].sum()))


def t_quantile(probability: float, df: float) -> float:
    """Quantile of Student's t for ``probability`` in (0.5, 1), any real ``df`` > 0, by bisection on the CDF
    (exact to about 1e-4; a table with rounded degrees of freedom would make some intervals too narrow)."""
    if not 0.5 < probability < 1.0 or not df > 0:
        raise ValueError(f't_quantile: need 0.5 < probability < 1 and df > 0, got {probability}, {df}')
    target = probability - 0.5
    low, high = 0.0, 16.0
    while _t_central_mass(high, df) < target:
        high *= 2
    for _ in range(60):
        middle = (low + high) / 2
        if _t_central_mass(middle, df) < target:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def mean_t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t ``confidence`` interval of the finite ``values`` (None and NaN dropped):
    ``(mean, low, high)``; NaN bounds for fewer than two values, all NaN for none."""
    finite = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(finite) == 0:
        return float('nan'), float('nan'), float('nan')
    mean = float(finite.mean())
    if len(finite) < 2:
        return mean, float('nan'), float('nan')
    half = t_quantile(0.5 + confidence / 2, len(finite) - 1) * float(finite.std(ddof=1)) / math.sqrt(len(finite))
    return mean, mean - half, mean + half


def percent_with_ci(mean, low=None, high=None) -> str:
    """A proportion and its interval in percent, two decimals: ``'41.16 [36.69, 45.94]'``; the bare mean when the
    interval is missing or not finite (one seed, no bootstrap), ``'-'`` when the mean is."""
    def finite(value) -> bool:
        return value is not None and math.isfinite(value)

    if not finite(mean):
        return '-'
    text = f'{mean * 100:.2f}'
    return f'{text} [{low * 100:.2f}, {high * 100:.2f}]' if finite(low) and finite(high) else text
