"""Tests of the fast DeLong AUROC variance, CI and paired test (pipeline.evaluate.delong)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from pipeline.evaluate.delong import delong_ci, delong_roc_covariance, delong_roc_test, delong_roc_variance
from pipeline.stats.bootstrap import Bootstrap, auroc_stat


def _naive_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent O(m n) DeLong et al. (1988) structural components, straight from the definition."""
    y = y.astype(bool)
    aucs, v10s, v01s = [], [], []
    for s in np.atleast_2d(scores):
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    v10, v01 = np.array(v10s), np.array(v01s)
    m, n = v10.shape[1], v01.shape[1]
    return np.array(aucs), np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n


def _hanley_mcneil_1982() -> tuple[np.ndarray, np.ndarray]:
    """Table 1 of Hanley & McNeil (1982), Radiology 143:29-36: CT ratings (1 = definitely normal ...
    5 = definitely abnormal) of 58 truly normal and 51 truly abnormal patients."""
    normal = [33, 6, 6, 11, 2]
    abnormal = [3, 2, 2, 11, 33]
    ratings = np.arange(1, 6)
    y = np.r_[np.zeros(sum(normal), int), np.ones(sum(abnormal), int)]
    s = np.r_[np.repeat(ratings, normal), np.repeat(ratings, abnormal)].astype(float)
    return y, s


def test_published_worked_example_hanley_mcneil() -> None:
    # Published: area 0.893 with standard error 0.032 (Hanley & McNeil 1982, Table 1 / text). Their SE
    # uses the exponential approximation; DeLong's nonparametric SE estimates the same quantity.
    y, s = _hanley_mcneil_1982()
    auc, var = delong_roc_variance(y, s)
    assert auc == pytest.approx(0.893, abs=5e-4)
    assert np.sqrt(var) == pytest.approx(0.032, abs=0.004)
    auc2, lo, hi = delong_ci(y, s)
    assert lo < auc2 < hi
    assert hi - lo == pytest.approx(2 * norm.ppf(0.975) * np.sqrt(var))


def test_matches_naive_structural_components_with_ties() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.35
    scores = np.round(np.vstack([rng.normal(size=300) + y, rng.normal(size=300) + 0.5 * y]), 1)
    aucs, cov = delong_roc_covariance(y, scores)
    ref_aucs, ref_cov = _naive_delong(y, scores)
    np.testing.assert_allclose(aucs, ref_aucs, rtol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10)
    np.testing.assert_allclose(aucs, [roc_auc_score(y, s) for s in scores])


def test_variance_agrees_with_bootstrap() -> None:
    rng = np.random.default_rng(11)
    n = 2000
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 1.2 * y
    _, var = delong_roc_variance(y, s)
    boot = Bootstrap(n, 2000, seed=5).run({"auc": auroc_stat(s, y)})["auc"]
    assert np.std(boot) == pytest.approx(np.sqrt(var), rel=0.1)


def test_ci_coverage_on_binormal_data() -> None:
    # True AUC of N(d, 1) vs N(0, 1) is Phi(d / sqrt(2)).
    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(7)
    hits = 0
    reps = 400
    for _ in range(reps):
        y = np.r_[np.ones(80, bool), np.zeros(120, bool)]
        s = rng.normal(size=200) + d * y
        _, lo, hi = delong_ci(y, s)
        hits += lo <= true_auc <= hi
    assert 0.91 <= hits / reps <= 0.98


def test_paired_test_identical_and_different_models() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.4
    good = rng.normal(size=500) + 1.5 * y
    res = delong_roc_test(y, good, good)
    assert res.difference == 0 and res.p_value == 1.0
    bad = good + rng.normal(size=500) * 3
    res = delong_roc_test(y, good, bad)
    assert res.difference > 0 and res.p_value < 0.01
    assert res.ci[0] < res.difference < res.ci[1]
    aucs, cov = _naive_delong(y, np.vstack([good, bad]))
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res.se == pytest.approx(se, rel=1e-10)
    assert res.z == pytest.approx((aucs[0] - aucs[1]) / se, rel=1e-10)


def test_paired_test_size_under_null() -> None:
    # Two different but equally good models: the test should reject about 5% of the time.
    rng = np.random.default_rng(2024)
    rejections = 0
    reps = 300
    for _ in range(reps):
        y = rng.random(200) < 0.5
        s1 = rng.normal(size=200) + y
        s2 = rng.normal(size=200) + y
        rejections += delong_roc_test(y, s1, s2).p_value < 0.05
    assert 0.02 <= rejections / reps <= 0.09


def test_rejects_single_class_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="one class"):
        delong_roc_variance(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="shape"):
        delong_roc_variance(np.array([0, 1, 1]), np.arange(4.0))
    with pytest.raises(ValueError, match="binary"):
        delong_roc_variance(np.array([0, 1, 2]), np.arange(3.0))


def test_obuchowski_variance_equals_delong_without_clusters_and_the_cluster_bootstrap_with_them() -> None:
    """Known answers: one case per patient gives DeLong's variance exactly; with correlated cases of a
    patient (shared label, patient effect half the score variance) it matches the patient-cluster bootstrap
    variance and exceeds the case-level DeLong variance, which treats the cases as independent."""
    from pipeline.evaluate.delong import delong_roc_variance, obuchowski_variance
    from pipeline.stats.bootstrap import Bootstrap, auroc_stat

    rng = np.random.default_rng(3)
    y = rng.random(120) < 0.3
    s = rng.normal(size=120) + 1.5 * y
    assert obuchowski_variance(y, s, np.arange(120)) == pytest.approx(delong_roc_variance(y, s), rel=1e-12)

    sizes = rng.choice([1, 2, 3, 4], size=200, p=[0.4, 0.3, 0.2, 0.1])
    patient = np.repeat(np.arange(200), sizes)
    d = rng.random(200) < 0.3
    score = 1.8 * d[patient] + rng.normal(0, 0.7, 200)[patient] + rng.normal(0, 0.7, len(patient))
    yc = d[patient]
    auc, var = obuchowski_variance(yc, score, patient)
    boot = Bootstrap(len(yc), 4000, seed=0, clusters=patient).run({"a": auroc_stat(score, yc)})["a"]
    assert var == pytest.approx(np.var(boot), rel=0.15)
    assert var > 1.3 * delong_roc_variance(yc, score)[1]


def test_auroc_logit_t_interval_is_asymmetric_inside_0_1_and_wider_with_few_patients() -> None:
    from pipeline.evaluate.delong import auroc_logit_ci, delong_ci

    rng = np.random.default_rng(4)
    y = rng.random(150) < 0.3
    s = rng.normal(size=150) + 1.8 * y
    auc, lo, hi, dof = auroc_logit_ci(y, s)
    _, dlo, dhi = delong_ci(y, s)
    assert dof == min(y.sum(), (~y).sum()) - 1
    assert 0 < lo < auc < hi < 1 and (auc - lo) > (hi - auc)  # longer towards 0.5 near AUC 0.9
    assert hi - lo > dhi - dlo  # t quantile and logit scale: never narrower than plain DeLong here
    few = np.concatenate([np.arange(150) // 10])  # 15 patients of 10 cases: few degrees of freedom
    assert auroc_logit_ci(y, s, few)[3] < 15
