"""Tests of the bootstrap kernels and the discrimination / calibration metrics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit, logit, softmax
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    cohen_kappa_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pipeline.evaluate.metrics import (
    auroc_with_ci,
    brier_score,
    calibration_block,
    calibration_intercept_slope,
    confusion_metrics,
    debiased_l2_calibration_error,
    discrimination_block,
    ece,
    mce,
    nll,
    paired_auroc_difference,
    reliability_bins,
    roc_points,
    wilson_ci,
)
from pipeline.stats.bootstrap import (
    Bootstrap,
    auroc_stat,
    average_precision_stat,
    mean_stat,
    percentile_ci,
    weighted_auroc,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def _binary(rng: np.random.Generator, n: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    y = rng.random(n) < 0.3
    s = np.round(rng.normal(size=n) + shift * y, 2)  # rounding creates ties
    return s, y


# ------------------------------------------------------------------------------------ bootstrap kernels
def test_weighted_kernels_match_sklearn_on_expanded_data(rng: np.random.Generator) -> None:
    s, y = _binary(rng, 400)
    w = rng.integers(0, 4, size=(5, 400)).astype(float)
    aucs = weighted_auroc(s, y, w)
    aps = average_precision_stat(s, y)(w)
    for i in range(5):
        idx = np.repeat(np.arange(400), w[i].astype(int))  # the resample the counts stand for
        assert aucs[i] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
        assert aps[i] == pytest.approx(average_precision_score(y[idx], s[idx]), abs=1e-12)
    ones = np.ones((1, 400))
    assert weighted_auroc(s, y, ones)[0] == pytest.approx(roc_auc_score(y, s))


def test_bootstrap_counts_case_and_cluster(rng: np.random.Generator) -> None:
    n = 60
    bs = Bootstrap(n, 300, seed=3)
    w = np.concatenate(list(bs.counts()))
    assert w.shape == (300, n) and np.all(w.sum(axis=1) == n)
    patients = np.repeat(np.arange(20), 3).astype(str)
    cb = Bootstrap(n, 300, seed=3, clusters=patients)
    assert cb.clustered and cb.n_clusters == 20
    wc = np.concatenate(list(cb.counts()))
    per_patient = wc.reshape(300, 20, 3)
    assert np.all(per_patient == per_patient[:, :, :1])  # all cases of a patient drawn together
    assert np.all(per_patient[:, :, 0].sum(axis=1) == 20)  # 20 patient draws per resample
    # Same seed -> same resamples (paired statistics across run() calls).
    np.testing.assert_array_equal(np.concatenate(list(cb.counts())), wc)


def test_bootstrap_is_fast_enough() -> None:
    import time

    rng = np.random.default_rng(0)
    s, y = _binary(rng, 10_000)
    bs = Bootstrap(10_000, 2000, seed=0)
    t0 = time.perf_counter()
    bs.run({"auc": auroc_stat(s, y)})
    # Target is < 2 s (see bench/bootstrap_speed.py); the test allows slack for a busy shared machine.
    assert time.perf_counter() - t0 < 8.0


def test_cluster_bootstrap_is_wider_with_correlated_cases(rng: np.random.Generator) -> None:
    # 100 patients with 5 near-identical images each: the case bootstrap pretends n = 500.
    base_s, base_y = _binary(rng, 100)
    s = np.repeat(base_s, 5) + rng.normal(scale=0.01, size=500)
    y = np.repeat(base_y, 5)
    patients = np.repeat([f"p{i}" for i in range(100)], 5)
    case = auroc_with_ci(s, y, Bootstrap(500, 1000, seed=1))
    clus = auroc_with_ci(s, y, Bootstrap(500, 1000, seed=1, clusters=patients))
    assert clus["ci_method"] == "obuchowski_logit_t" and case["ci_method"] == "delong_logit_t"
    assert (clus["ci"][1] - clus["ci"][0]) > 1.7 * (case["ci"][1] - case["ci"][0])
    cb, db = clus["ci_bootstrap"], case["ci_bootstrap"]  # the percentile intervals kept beside it agree
    assert (cb[1] - cb[0]) > 1.7 * (db[1] - db[0])


def test_cis_contain_point_and_shrink_with_more_data(rng: np.random.Generator) -> None:
    widths = []
    for n in (200, 5000):
        s, y = _binary(rng, n)
        res = auroc_with_ci(s, y, Bootstrap(n, 1000, seed=2))
        for key in ("ci", "ci_bootstrap", "ci_delong"):
            assert res[key][0] <= res["value"] <= res[key][1]
        widths.append(res["ci"][1] - res["ci"][0])
    assert widths[1] < widths[0] / 3


def test_percentile_ci_ignores_nan_and_flags_mostly_invalid() -> None:
    s = np.r_[np.linspace(0, 1, 101), [np.nan] * 10]
    lo, hi = percentile_ci(s, 0.9)
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.95)
    assert np.isnan(percentile_ci(np.r_[np.ones(3), [np.nan] * 10])[0])


def test_paired_bootstrap_difference_matches_delong_scale(rng: np.random.Generator) -> None:
    from pipeline.evaluate.delong import delong_roc_test

    y = rng.random(800) < 0.4
    s1 = rng.normal(size=800) + 1.5 * y
    s2 = s1 + rng.normal(size=800) * 2
    res = paired_auroc_difference(y, s1, s2, Bootstrap(800, 2000, seed=4))
    dl = delong_roc_test(y, s1, s2)
    assert res["value"] == pytest.approx(dl.difference)
    assert res["ci"][0] < res["value"] < res["ci"][1]
    assert (res["ci"][1] - res["ci"][0]) == pytest.approx(dl.ci[1] - dl.ci[0], rel=0.15)
    assert res["p_value"] < 0.01


# ------------------------------------------------------------------------------------ calibration metrics
def test_ece_matches_sklearn_calibration_curve(rng: np.random.Generator) -> None:
    p = rng.beta(2, 3, size=3000)
    y = rng.random(3000) < p**1.5
    for strategy in ("uniform", "quantile"):
        prob_true, prob_pred = calibration_curve(y, p, n_bins=15, strategy=strategy)
        # Bin weights: counts per non-empty bin, with the bin edges calibration_curve uses.
        edges = np.linspace(0, 1, 16) if strategy == "uniform" else np.percentile(p, np.linspace(0, 100, 16))
        counts = np.bincount(np.searchsorted(edges[1:-1], p), minlength=15)
        counts = counts[counts > 0]
        ref = np.sum(counts / len(p) * np.abs(prob_true - prob_pred))
        assert ece(p, y, 15, strategy) == pytest.approx(ref, abs=1e-12)
        assert mce(p, y, 15, strategy) == pytest.approx(np.max(np.abs(prob_true - prob_pred)), abs=1e-12)


def test_brier_and_nll_match_sklearn(rng: np.random.Generator) -> None:
    probs = softmax(rng.normal(size=(500, 2)) * 2, axis=1)
    y = rng.integers(0, 2, 500)
    assert brier_score(probs, y) == pytest.approx(brier_score_loss(y, probs[:, 1]))
    assert nll(probs, y) == pytest.approx(log_loss(y, probs))
    probs3 = softmax(rng.normal(size=(500, 4)) * 2, axis=1)
    y3 = rng.integers(0, 4, 500)
    assert brier_score(probs3, y3) == pytest.approx(brier_score_loss(y3, probs3, labels=range(4)))
    assert nll(probs3, y3) == pytest.approx(log_loss(y3, probs3, labels=range(4)))


def test_perfect_calibration_gives_small_errors_and_debiasing_helps() -> None:
    rng = np.random.default_rng(8)
    p = rng.random(50_000)
    y = rng.random(50_000) < p
    assert ece(p, y) < 0.01
    assert debiased_l2_calibration_error(p, y) < 0.01
    # Small n: the plug-in L2 error is biased upwards; the Kumar et al. estimate is closer to the truth 0.
    plug, debiased = [], []
    for seed in range(200):
        r = np.random.default_rng(seed)
        p = r.random(200)
        y = r.random(200) < p
        edges = np.percentile(p, np.linspace(0, 100, 16))
        ids = np.searchsorted(edges[1:-1], p)
        cnt = np.bincount(ids, minlength=15)
        gap = (np.bincount(ids, weights=y, minlength=15) - np.bincount(ids, weights=p, minlength=15)) / cnt
        plug.append(np.sqrt(np.sum(cnt / 200 * gap**2)))
        debiased.append(debiased_l2_calibration_error(p, y))
    assert np.mean(debiased) < 0.5 * np.mean(plug)


def test_debiased_estimate_tracks_a_known_miscalibration() -> None:
    # y ~ Bernoulli(q) with q = p**2: the true L2 calibration error is sqrt(E[(p - p^2)^2]) = sqrt(1/30).
    truth = np.sqrt(1 / 30)
    vals = []
    for seed in range(50):
        r = np.random.default_rng(seed)
        p = r.random(2000)
        vals.append(debiased_l2_calibration_error(p, r.random(2000) < p**2))
    assert np.mean(vals) == pytest.approx(truth, rel=0.08)


def test_calibration_intercept_and_slope_recover_known_values() -> None:
    rng = np.random.default_rng(21)
    p = rng.uniform(0.02, 0.98, 20_000)
    y = rng.random(20_000) < p
    a, b = calibration_intercept_slope(p, y)
    assert a == pytest.approx(0.0, abs=0.05) and b == pytest.approx(1.0, abs=0.05)
    # True outcome model logit q = 0.5 + 0.6 logit p -> slope 0.6 (over-confident model).
    q = expit(0.5 + 0.6 * logit(p))
    y2 = rng.random(20_000) < q
    _, b2 = calibration_intercept_slope(p, y2)
    assert b2 == pytest.approx(0.6, abs=0.05)


def test_reliability_bins_are_consistent(rng: np.random.Generator) -> None:
    p = rng.random(1000)
    y = rng.random(1000) < p
    bins = reliability_bins(p, y, 10, "uniform")
    assert sum(b["count"] for b in bins) == 1000
    for b in bins:
        assert b["lower"] <= b["mean_confidence"] <= b["upper"]
        assert b["observed_ci"][0] <= b["observed_frequency"] <= b["observed_ci"][1]


def test_wilson_ci_closed_form() -> None:
    k, n, z = 81, 263, norm.ppf(0.975)
    ph = k / n
    centre = (ph + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n))
    assert wilson_ci(k, n) == pytest.approx((centre - half, centre + half), rel=1e-9)


# ------------------------------------------------------------------------------------ discrimination
def test_confusion_metrics_match_sklearn(rng: np.random.Generator) -> None:
    y = rng.integers(0, 4, 700)
    pred = np.where(rng.random(700) < 0.6, y, rng.integers(0, 4, 700))
    cm = np.zeros((4, 4))
    np.add.at(cm, (y, pred), 1)
    m = {k: v[0] for k, v in confusion_metrics(cm[None]).items()}
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["kappa_quadratic"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    yb, pb = (y > 1).astype(int), (pred > 1).astype(int)
    cmb = np.zeros((2, 2))
    np.add.at(cmb, (yb, pb), 1)
    for pos in (0, 1):
        mb = {k: v[0] for k, v in confusion_metrics(cmb[None], positive_index=pos).items()}
        assert mb["sensitivity"] == pytest.approx(recall_score(yb, pb, pos_label=pos))
        assert mb["specificity"] == pytest.approx(recall_score(yb, pb, pos_label=1 - pos))
        assert mb["ppv"] == pytest.approx(precision_score(yb, pb, pos_label=pos))
        assert mb["f1"] == pytest.approx(f1_score(yb, pb, pos_label=pos))


def test_discrimination_block_binary_positive_column_zero(rng: np.random.Generator) -> None:
    # BreastMNIST-like: column 0 is the positive (malignant) class.
    n = 600
    y = (rng.random(n) < 0.7).astype(int)  # 30% are class 0 (malignant)
    logits = np.column_stack([rng.normal(size=n) + 1.5 * (y == 0), np.zeros(n)])
    probs = softmax(logits, axis=1)
    out = discrimination_block(probs, y, "binary", ["malignant", "benign"], 0, Bootstrap(n, 500, seed=0))
    assert out["positive_class"] == "malignant"
    assert out["auroc"]["value"] == pytest.approx(roc_auc_score(y == 0, probs[:, 0]))
    assert out["auroc"]["value"] > 0.75
    assert out["auprc"]["value"] == pytest.approx(average_precision_score(y == 0, probs[:, 0]))
    pred_pos = probs[:, 0] >= 0.5
    assert out["sensitivity"]["value"] == pytest.approx(recall_score(y == 0, pred_pos))
    assert out["ppv"]["ci_method"] == "wilson"
    for key in (
        "accuracy",
        "balanced_accuracy",
        "auroc",
        "auprc",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
    ):
        lo, hi = out[key]["ci"]
        assert lo <= out[key]["value"] <= hi, key


def test_discrimination_block_multiclass_and_ordinal(rng: np.random.Generator) -> None:
    n = 900
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    probs = softmax(logits, axis=1)
    out = discrimination_block(probs, y, "ordinal", ["a", "b", "c"], None, Bootstrap(n, 500, seed=0))
    assert out["macro_auroc"]["value"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr"))
    assert out["kappa_quadratic"]["value"] == pytest.approx(
        cohen_kappa_score(y, probs.argmax(1), weights="quadratic")
    )
    assert out["per_class"]["b"]["auroc"]["value"] == pytest.approx(roc_auc_score(y == 1, probs[:, 1]))
    lo, hi = out["macro_auroc"]["ci"]
    assert lo < out["macro_auroc"]["value"] < hi
    assert np.sum(out["confusion_matrix"]["rows_true_cols_pred"]) == n


def test_calibration_block_binary_contains_point_estimates(rng: np.random.Generator) -> None:
    n = 1000
    p = rng.uniform(0.05, 0.95, n)
    y = (rng.random(n) < p).astype(int)
    probs = np.column_stack([1 - p, p])
    out = calibration_block(probs, y, "binary", 1, Bootstrap(n, 500, seed=0))
    assert out["reference"] == "positive_class"
    for key in (
        "brier",
        "nll",
        "ece",
        "ece_equal_mass",
        "l2_ce_debiased",
        "calibration_intercept",
        "calibration_slope",
    ):
        lo, hi = out[key]["ci"]
        assert lo <= out[key]["value"] <= hi, key
    assert out["calibration_slope"]["ci"][0] < 1.0 < out["calibration_slope"]["ci"][1]
    assert out["brier"]["value"] == pytest.approx(brier_score_loss(y, p))


def test_mean_stat_is_weighted_mean(rng: np.random.Generator) -> None:
    v = rng.random(50)
    w = rng.integers(0, 3, (4, 50)).astype(float)
    np.testing.assert_allclose(mean_stat(v)(w), (w * v).sum(1) / w.sum(1))


def test_roc_points_thinned_and_monotone(rng: np.random.Generator) -> None:
    s, y = _binary(rng, 5000)
    s = s + rng.normal(scale=1e-6, size=5000)
    pts = roc_points(s, y, max_points=200)
    assert 2 <= len(pts["fpr"]) <= 200
    assert pts["fpr"][0] == 0.0 and pts["fpr"][-1] == 1.0 and pts["tpr"][-1] == 1.0
    assert np.all(np.diff(pts["fpr"]) >= 0) and np.all(np.diff(pts["tpr"]) >= 0)


def test_inverted_ci_recovers_a_normal_location_interval() -> None:
    from pipeline.evaluate.intervals import inverted_ci

    z = np.random.default_rng(0).normal(size=20_000)

    def world(u: float):  # statistic |N(theta, 1)| with theta = u: far from 0 the interval is obs +- 1.96
        return np.array([u]), np.abs(u + z)[:, None]

    ((lo, hi),) = inverted_ci(np.array([5.0]), world, 0.95)
    assert lo == pytest.approx(5.0 - 1.96, abs=0.03) and hi == pytest.approx(5.0 + 1.96, abs=0.03)
    # at theta = 0 the test is one-sided: |z| <= 1.96 with probability 0.95 keeps 0 in the interval
    ((lo, hi),) = inverted_ci(np.array([1.8]), world, 0.95)
    assert lo == 0.0 and hi > 1.8
    ((lo, hi),) = inverted_ci(np.array([2.2]), world, 0.95)
    assert 0.0 < lo < 0.5 and hi > 2.2
    assert inverted_ci(np.array([np.nan]), world)[0] != inverted_ci(np.array([np.nan]), world)[0]  # nan


def test_ece_interval_reaches_zero_when_calibrated_and_excludes_it_when_not() -> None:
    rng = np.random.default_rng(31)
    n = 400
    p = rng.random(n)
    y = (rng.random(n) < p).astype(int)
    out = calibration_block(np.column_stack([1 - p, p]), y, "binary", 1, Bootstrap(n, 1000, seed=0))
    e = out["ece"]
    assert e["ci_method"] == "parametric_bootstrap_inversion"
    assert e["ci"][0] == 0.0 < e["value"] < 0.1
    assert 0.0 < e["ci"][1] < 0.15
    assert out["mce"]["ci"] is None and "no interval" in out["mce"]["ci_note"]
    # over-confident model: true ECE of logit q = 2.5 logit p, computed on a large sample
    q = expit(2.5 * logit(p))
    big = rng.random(200_000)
    true_ece = ece(expit(2.5 * logit(big)), rng.random(200_000) < big)
    out = calibration_block(np.column_stack([1 - q, q]), y, "binary", 1, Bootstrap(n, 1000, seed=0))
    lo, hi = out["ece"]["ci"]
    assert 0.0 < lo < true_ece < hi
    for key in ("ece_equal_mass", "l2_ce_debiased"):
        assert 0.0 < out[key]["ci"][0] < out[key]["ci"][1]
    # the same seed gives the same interval
    again = calibration_block(np.column_stack([1 - q, q]), y, "binary", 1, Bootstrap(n, 1000, seed=0))
    assert again["ece"]["ci"] == out["ece"]["ci"]


def test_macro_f1_averages_over_all_classes_like_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)  # class 3 never occurs in y
    pred = np.where(rng.random(60) < 0.7, y, rng.integers(0, 4, 60))
    pred[:2] = 3  # but is predicted
    probs = np.full((60, 4), 0.1)
    probs[np.arange(60), pred] = 0.7
    out = discrimination_block(probs, y, "multiclass", list("abcd"), None, Bootstrap(60, 200, seed=0))
    ref = f1_score(y, pred, average="macro", labels=range(4), zero_division=0)
    assert out["macro_f1"]["value"] == pytest.approx(ref)
    cm = np.zeros((1, 4, 4))
    np.add.at(cm[0], (y, pred), 1.0)
    assert confusion_metrics(cm)["macro_f1"][0] == pytest.approx(ref)
    assert confusion_metrics(cm, labels=np.unique(y))["macro_f1"][0] == pytest.approx(ref)


def test_clustered_split_uses_patient_level_intervals_for_every_metric(rng: np.random.Generator) -> None:
    n_pat = 150
    y = np.repeat(rng.integers(0, 3, n_pat), 2)
    probs = softmax(rng.normal(size=(2 * n_pat, 3)) + 1.5 * np.eye(3)[y], axis=1)
    bs = Bootstrap(2 * n_pat, 300, seed=0, clusters=np.repeat(np.arange(n_pat), 2))
    out = discrimination_block(probs, y, "multiclass", ["a", "b", "c"], None, bs)
    methods = {e["ci_method"] for _, e in _walk(out)}
    # every interval is patient-level: the cluster bootstrap, the design-effect Wilson interval of the
    # proportions and Obuchowski's clustered AUROC variance
    assert methods == {"cluster_bootstrap", "cluster_wilson_t", "obuchowski_logit_t"}
    yb = (y == 0).astype(int)
    pb = np.column_stack([probs[:, 1:].sum(1), probs[:, 0]])
    outb = discrimination_block(pb, yb, "binary", ["rest", "a"], 1, bs)
    assert {e["ci_method"] for _, e in _walk(outb)} == {
        "cluster_bootstrap", "cluster_bootstrap_bca", "cluster_wilson_t", "obuchowski_logit_t"
    }


def _walk(obj, path=""):
    if isinstance(obj, dict):
        if "value" in obj and "ci_method" in obj:
            yield path, obj
        for key, val in obj.items():
            yield from _walk(val, f"{path}.{key}")


def test_bca_interval_known_answers(rng: np.random.Generator) -> None:
    """BCa on the bootstrap count rows: a mean (no bias, little skew) gives the expanded percentile
    interval; leaving one cluster out is what the jackknife rows do (checked against a loop)."""
    from pipeline.stats.bootstrap import expanded_level, mean_stat, percentile_ci

    v = rng.normal(size=300)
    bs = Bootstrap(300, 4000, seed=2)
    st = mean_stat(v)
    smp = bs.run({"m": st})["m"]
    lo, hi = bs.bca_ci(smp, st, float(v.mean()))
    plo, phi = percentile_ci(smp, expanded_level(0.95, 300))
    assert lo == pytest.approx(plo, abs=0.01) and hi == pytest.approx(phi, abs=0.01)
    skewed = rng.exponential(size=60) ** 2  # a skewed mean: BCa moves the interval up
    bs2 = Bootstrap(60, 4000, seed=3)
    st2 = mean_stat(skewed)
    s2 = bs2.run({"m": st2})["m"]
    blo, bhi = bs2.bca_ci(s2, st2, float(skewed.mean()))
    qlo, qhi = percentile_ci(s2, expanded_level(0.95, 60))
    assert blo > qlo and bhi > qhi


def test_cluster_wilson_ci_known_answers() -> None:
    """One case per patient: Wilson with the t quantile and deff = G/(G-1); perfectly correlated pairs of
    identical cases: the design effect is 2 and the interval is the one of half the cases."""
    from scipy.stats import t as t_dist

    from pipeline.evaluate.intervals import cluster_wilson_ci, wilson_ci

    y = np.r_[np.ones(30), np.zeros(70)]
    lo, hi, info = cluster_wilson_ci(y, np.ones(100), np.arange(100), 0.95)
    q = t_dist.ppf(0.975, 99)
    n_eff, p = 100 / (100 / 99), 0.3
    centre = (p + q * q / (2 * n_eff)) / (1 + q * q / n_eff)
    half = q / (1 + q * q / n_eff) * np.sqrt(p * (1 - p) / n_eff + q * q / (4 * n_eff**2))
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert info == {"n": 100, "clusters": 100, "deff": pytest.approx(100 / 99, abs=1e-4)}
    assert hi - lo == pytest.approx(np.diff(wilson_ci(30, 100))[0], rel=0.03)  # close to plain Wilson
    # every patient twice with the same outcome: deff 2, as wide as 100 independent cases
    lo2, hi2, info2 = cluster_wilson_ci(np.r_[y, y], np.ones(200), np.r_[np.arange(100), np.arange(100)])
    assert info2["deff"] == pytest.approx(2 * 100 / 99, abs=1e-3)
    assert (lo2, hi2) == pytest.approx((lo, hi), abs=1e-9)
    # the denominator picks the cases: sensitivity of 8/10 positives
    num, den = np.r_[np.ones(8), np.zeros(2), np.ones(5)], np.r_[np.ones(10), np.zeros(5)]
    lo3, hi3, info3 = cluster_wilson_ci(num, den, np.arange(15))
    assert info3["n"] == 10 and info3["clusters"] == 10 and lo3 < 0.8 < hi3
    assert cluster_wilson_ci(np.zeros(3), np.zeros(3), np.arange(3))[2]["n"] == 0


def test_clustered_discrimination_uses_cluster_wilson(rng: np.random.Generator) -> None:
    """With patients holding several cases the proportions get the design-effect Wilson interval, wider
    than the case-level one when a patient's cases agree."""
    y = np.repeat(rng.integers(0, 2, 60), 2)
    p = np.clip(np.repeat(rng.random(60), 2) * 0.6 + 0.4 * y, 0, 1)
    probs = np.column_stack([1 - p, p])
    pats = np.repeat(np.arange(60), 2)
    clustered = discrimination_block(probs, y, "binary", ["n", "p"], 1, Bootstrap(120, 200, 0, clusters=pats))
    flat = discrimination_block(probs, y, "binary", ["n", "p"], 1, Bootstrap(120, 200, 0))
    for name in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "prevalence"):
        e = clustered[name]
        assert e["ci_method"] == "cluster_wilson_t" and e["deff"] > 1.5, name
        assert e["ci"][1] - e["ci"][0] > flat[name]["ci"][1] - flat[name]["ci"][0], name
        assert e["ci"][0] <= e["value"] <= e["ci"][1]
