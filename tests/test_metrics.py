"""Hand-computed checks of benchmarks.metrics (balanced accuracy, F1, kappa, AUC, multi-label, bootstrap)."""
import math

import numpy as np
import pytest

from benchmarks.metrics import (binary_auc, bootstrap_ci, classification_metrics, cohen_kappa, compute_metrics,
                                headline_metric, mean_t_interval, midranks, multilabel_metrics, t_quantile)


def one_hot_scores(pred, k):
    scores = np.full((len(pred), k), 0.1)
    scores[np.arange(len(pred)), pred] = 0.9
    return scores


def test_balanced_accuracy_skips_absent_class():
    # class 3 (like ISIC's UNK) has no sample; predictions never use it either
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, one_hot_scores(pred, 4), num_classes=4)
    assert m['balanced_accuracy'] == pytest.approx((3 / 4 + 1 + 1 / 2) / 3)
    assert m['accuracy'] == pytest.approx(6 / 8)
    # F1 per present class: c0 tp3 fp1 fn1 -> 6/8, c1 tp2 fp1 fn0 -> 4/5, c2 tp1 fp0 fn1 -> 2/3
    assert m['macro_f1'] == pytest.approx((6 / 8 + 4 / 5 + 2 / 3) / 3)
    assert all(np.isfinite(v) for v in m.values())


def test_absent_class_predicted_counts_as_error_not_as_a_class():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])        # class 2 predicted though absent
    m = classification_metrics(y, one_hot_scores(pred, 3), 3)
    assert m['balanced_accuracy'] == pytest.approx((0.5 + 1.0) / 2)


def test_kappa_known_confusion_matrix():
    # classic example: po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5 -> kappa = 0.4
    confusion = np.array([[20, 5], [10, 15]])
    assert cohen_kappa(confusion) == pytest.approx(0.4)
    y = np.repeat([0, 0, 1, 1], [20, 5, 10, 15])
    pred = np.repeat([0, 1, 0, 1], [20, 5, 10, 15])
    assert classification_metrics(y, one_hot_scores(pred, 2))['kappa'] == pytest.approx(0.4)
    assert math.isnan(cohen_kappa(np.array([[5, 0], [0, 0]])))


def test_auc_ties_perfect_and_single_class():
    assert binary_auc(np.array([1, 0, 1, 0]), np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert binary_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert binary_auc(np.array([0, 0, 1, 1]), np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert math.isnan(binary_auc(np.array([1, 1]), np.array([0.1, 0.2])))
    np.testing.assert_allclose(midranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    y = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y] * 0.8 + 0.1
    assert classification_metrics(y, perfect)['auc'] == 1.0
    one_class = classification_metrics(np.zeros(4, int), np.full((4, 3), 1 / 3))
    assert math.isnan(one_class['auc']) and one_class['balanced_accuracy'] == 1.0


def test_auc_matches_brute_force_pairs():
    rng = np.random.RandomState(0)
    for _ in range(5):
        positive = rng.rand(60) < 0.4
        scores = rng.randint(0, 8, size=60) / 8.0       # many ties
        pos, neg = scores[positive], scores[~positive]
        diff = pos[:, None] - neg[None, :]
        brute = ((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size
        assert binary_auc(positive, scores) == pytest.approx(brute)
    y = rng.randint(0, 4, size=80)
    scores = rng.dirichlet(np.ones(4), size=80)
    macro = np.mean([binary_auc(y == c, scores[:, c]) for c in range(4)])
    assert classification_metrics(y, scores)['auc'] == pytest.approx(macro)


def test_multilabel_ignores_nan_targets():
    nan = np.nan
    y = np.array([[1, 0], [0, nan], [1, 1], [0, 0], [nan, 1]], dtype=np.float32)
    s = np.array([[0.9, 0.2], [0.1, 0.9], [0.8, 0.4], [0.3, 0.1], [0.0, 0.7]])
    m = multilabel_metrics(y, s)
    # label 0 on rows 0-3: perfect ranking; label 1 on rows 0,2,3,4: pos {0.4, 0.7} vs neg {0.2, 0.1} -> 1.0
    assert m['auc'] == 1.0
    # label 0 at 0.5: all correct -> 1.0; label 1: pos recall 1/2 (0.4 missed), neg recall 1 -> 0.75
    assert m['balanced_accuracy'] == pytest.approx((1.0 + 0.75) / 2)
    assert m['accuracy'] == pytest.approx(7 / 8)          # 8 known entries, one wrong
    assert m['macro_f1'] == pytest.approx((1.0 + 2 / 3) / 2)
    # a label whose known targets are all one value has no AUC but does not break the average
    y2 = y.copy()
    y2[:, 1] = [nan, nan, 1, 1, nan]
    assert multilabel_metrics(y2, s)['auc'] == 1.0
    assert compute_metrics(y, s, multilabel=True) == m
    assert headline_metric(True) == 'auc' and headline_metric(False) == 'balanced_accuracy'


def test_bootstrap_ci_brackets_point_estimate_and_is_seeded():
    rng = np.random.RandomState(1)
    y = rng.randint(0, 3, size=200)
    scores = np.eye(3)[y] * 0.5 + rng.rand(200, 3)

    def fn(t, s):
        return classification_metrics(t, s, 3)['balanced_accuracy']

    point = fn(y, scores)
    low, high = bootstrap_ci(y, scores, fn, n=200, seed=0)
    assert low <= point <= high and high - low < 0.3
    assert bootstrap_ci(y, scores, fn, n=200, seed=0) == (low, high)


def test_test_metrics_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_images():
    from benchmarks.metrics import test_metrics

    rng = np.random.RandomState(0)

    def report(count):
        y = rng.randint(0, 3, size=count)
        scores = rng.rand(count, 3)
        scores[np.arange(count), y] += 0.6  # a decent but imperfect classifier
        return test_metrics(y, scores, multilabel=False, n_bootstrap=300)

    small, large = report(100), report(3000)
    for result in (small, large):
        low, high = result['balanced_accuracy_ci']
        assert low <= result['balanced_accuracy'] <= high
    assert (large['balanced_accuracy_ci'][1] - large['balanced_accuracy_ci'][0]) < \
        0.5 * (small['balanced_accuracy_ci'][1] - small['balanced_accuracy_ci'][0])


# published two-sided 95 % Student-t quantiles (any statistics table)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 5: 2.571, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 21: 2.080, 22: 2.074,
        24: 2.064, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


@pytest.mark.parametrize('df', sorted(T975))
def test_t_quantile_matches_the_table_at_every_df(df):
    # a table rounded to the next listed df (21 → 25) gave 2.060 at df 21: an interval about 1 % too narrow
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=1.5e-3)


def test_mean_t_interval_over_seeds_and_the_leaderboard_use_the_exact_quantile():
    from curriculum.leaderboard import Row

    values = [0.5 + 0.01 * (i % 5) for i in range(22)]            # df = 21
    mean, low, high = mean_t_interval(values + [None, float('nan')])
    half = 2.080 * float(np.std(values, ddof=1)) / math.sqrt(22)
    assert mean == pytest.approx(np.mean(values)) and high - mean == pytest.approx(half, rel=1e-3)
    assert mean - low == pytest.approx(half, rel=1e-3)
    row = Row(label='moco', order=('moco',), baseline=False, values={'balanced_accuracy': values})
    assert row.interval('balanced_accuracy')[:2] == pytest.approx((low, high))
    assert math.isnan(mean_t_interval([0.3])[1]) and math.isnan(mean_t_interval([])[0])
