"""Tests of split conformal prediction sets (pipeline.evaluate.conformal).

Cross-checks: LAC sets are compared set-for-set with MAPIE (``mapie`` is a test dependency; the test
fails, not skips, without it). MAPIE's non-randomised APS calibrates on randomised scores, so our
non-randomised APS is instead compared with an independent loop implementation of the same definition,
and our randomised APS with MAPIE's randomised APS in distribution (coverage and set size over seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from mapie.classification import SplitConformalClassifier
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline.evaluate.conformal import SplitConformal, coverage_report, min_calibration_size


class _Passthrough(ClassifierMixin, BaseEstimator):
    """A 'prefit classifier' whose features are already the class probabilities (for MAPIE)."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> _Passthrough:
        self.classes_ = np.arange(np.asarray(X).shape[1])
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X).argmax(axis=1)


def _exchangeable(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a (mis-specified) model and labels drawn from a different true distribution."""
    z = rng.normal(size=(n, k)) * 1.5
    true_p = softmax(z * 0.7, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(true_p, axis=1)).sum(axis=1)
    return softmax(z, axis=1), y


@pytest.mark.parametrize("k", [2, 4])
def test_lac_sets_match_mapie_exactly(k: int) -> None:
    rng = np.random.default_rng(100 + k)
    for _ in range(3):
        pc, yc = _exchangeable(rng, 400, k)
        pt, _ = _exchangeable(rng, 1000, k)
        ref = SplitConformalClassifier(
            _Passthrough().fit(pc, yc), confidence_level=0.9, conformity_score="lac", prefit=True
        ).conformalize(pc, yc)
        _, ref_sets = ref.predict_set(pt)
        ours = SplitConformal(alpha=0.1, method="lac").fit(pc, yc).predict_sets(pt)
        np.testing.assert_array_equal(ours, ref_sets[:, :, 0])


def test_randomized_aps_matches_mapie_in_distribution() -> None:
    rng = np.random.default_rng(7)
    ours, theirs = [], []
    for rep in range(15):
        pc, yc = _exchangeable(rng, 500, 4)
        pt, yt = _exchangeable(rng, 2000, 4)
        rows = np.arange(len(yt))
        ref = SplitConformalClassifier(
            _Passthrough().fit(pc, yc),
            confidence_level=0.9,
            conformity_score="aps",
            prefit=True,
            random_state=rep,
        ).conformalize(pc, yc)
        _, s = ref.predict_set(pt, conformity_score_params={"include_last_label": "randomized"})
        s = s[:, :, 0]
        a = SplitConformal(0.1, "aps", randomized=True, random_state=rep).fit(pc, yc).predict_sets(pt)
        theirs.append([s[rows, yt].mean(), s.sum(1).mean()])
        ours.append([a[rows, yt].mean(), a.sum(1).mean()])
    ours_m, theirs_m = np.mean(ours, axis=0), np.mean(theirs, axis=0)
    assert ours_m[0] == pytest.approx(theirs_m[0], abs=0.01)
    assert ours_m[1] == pytest.approx(theirs_m[1], rel=0.05)


def _loop_aps(pc: np.ndarray, yc: np.ndarray, pt: np.ndarray, alpha: float) -> np.ndarray:
    """Straightforward non-randomised APS, one case at a time (Angelopoulos & Bates, gentle intro)."""
    scores = []
    for p, y in zip(pc, yc, strict=True):
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))
        total = 0.0
        for j in order:
            total += p[j]
            if j == y:
                break
        scores.append(total)
    n = len(scores)
    qhat = sorted(scores)[math.ceil((n + 1) * (1 - alpha)) - 1]
    sets = np.zeros(pt.shape, dtype=bool)
    for i, p in enumerate(pt):
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))
        total = 0.0
        for rank, j in enumerate(order):
            total += p[j]
            if total <= qhat or rank == 0:
                sets[i, j] = True
    return sets


def test_nonrandomized_aps_matches_loop_implementation() -> None:
    rng = np.random.default_rng(3)
    pc, yc = _exchangeable(rng, 300, 5)
    pt, _ = _exchangeable(rng, 400, 5)
    ours = SplitConformal(0.1, "aps").fit(pc, yc).predict_sets(pt)
    np.testing.assert_array_equal(ours, _loop_aps(pc, yc, pt, 0.1))


@pytest.mark.parametrize(("method", "randomized"), [("lac", False), ("aps", False), ("aps", True)])
def test_marginal_coverage_over_many_seeds(method: str, randomized: bool) -> None:
    alpha = 0.1
    cov, empty = [], []
    for seed in range(150):
        rng = np.random.default_rng(seed)
        pc, yc = _exchangeable(rng, 150, 4)
        pt, yt = _exchangeable(rng, 300, 4)
        sets = SplitConformal(alpha, method, randomized, random_state=seed).fit(pc, yc).predict_sets(pt)
        rep = coverage_report(sets, yt)
        cov.append(rep["coverage"])
        empty.append(rep["empty_fraction"])
    assert np.mean(cov) >= 1 - alpha - 0.01
    assert np.mean(cov) <= 1 - alpha + 0.04  # valid but not trivially all classes
    if method == "aps" and not randomized:
        assert max(empty) == 0.0


def test_too_few_calibration_cases_gives_all_classes() -> None:
    assert min_calibration_size(0.05) == 19
    assert min_calibration_size(0.1) == 9
    rng = np.random.default_rng(0)
    pc, yc = _exchangeable(rng, 18, 3)
    conf = SplitConformal(alpha=0.05).fit(pc, yc)
    assert math.isinf(conf.qhat_)
    assert conf.predict_sets(pc).all()
    pc, yc = _exchangeable(rng, 19, 3)
    assert math.isfinite(SplitConformal(alpha=0.05).fit(pc, yc).qhat_)


def test_coverage_report_counts() -> None:
    sets = np.array([[True, False], [True, True], [False, False], [False, True]])
    y = np.array([0, 1, 0, 0])
    rep = coverage_report(sets, y, ["a", "b"])
    assert rep["coverage"] == pytest.approx(0.5)
    assert rep["mean_set_size"] == pytest.approx(1.0)
    assert rep["empty_fraction"] == pytest.approx(0.25)
    assert rep["set_size_histogram"] == [1, 2, 1]
    assert rep["per_class"]["a"] == {
        "n": 3,
        "coverage": pytest.approx(1 / 3),
        "coverage_ci": pytest.approx([0.0615, 0.7923], abs=1e-4),  # Wilson 95% interval of 1/3
        "mean_set_size": pytest.approx(2 / 3),
    }


def test_input_validation() -> None:
    p = np.array([[0.2, 0.8], [0.6, 0.4]])
    with pytest.raises(ValueError, match="method"):
        SplitConformal(method="raps").fit(p, np.array([1, 0]))
    with pytest.raises(ValueError, match="alpha"):
        SplitConformal(alpha=1.5).fit(p, np.array([1, 0]))
    with pytest.raises(ValueError, match="summing to 1"):
        SplitConformal().fit(p * 0.5, np.array([1, 0]))
    with pytest.raises(RuntimeError, match="not fitted"):
        SplitConformal().predict_sets(p)
    fitted = SplitConformal().fit(p, np.array([1, 0]))
    with pytest.raises(ValueError, match="expected 2 columns"):
        fitted.predict_sets(np.full((1, 3), 1 / 3))


def test_mondrian_sets_cover_a_rare_class() -> None:
    """At 10% prevalence a marginal LAC set under-covers the positive class; Mondrian sets cover each class."""
    from pipeline.evaluate.conformal import SplitConformal

    rng = np.random.default_rng(0)
    cov_marg, cov_mond = [], []
    for rep in range(150):
        n_cal, n_test = 400, 2000
        y = (rng.random(n_cal + n_test) < 0.1).astype(np.int64)
        s = 1.0 * y + rng.normal(0, 1, len(y))  # a weak score: the positive class is hard
        p1 = 1 / (1 + np.exp(-(s - 2.0)))
        probs = np.column_stack([1 - p1, p1])
        cal, test = slice(0, n_cal), slice(n_cal, None)
        for mondrian, out in ((False, cov_marg), (True, cov_mond)):
            cp = SplitConformal(0.1, "lac", class_conditional=mondrian).fit(probs[cal], y[cal])
            sets = cp.predict_sets(probs[test])
            pos = y[test] == 1
            out.append(sets[pos, 1].mean())
    assert np.mean(cov_marg) < 0.85  # marginal sets under-cover the rare class
    assert np.mean(cov_mond) >= 0.9 - 0.01  # class-conditional guarantee, averaged over draws
    cp = SplitConformal(0.1, "lac", class_conditional=True).fit(probs[cal], y[cal])
    assert cp.class_qhat_.shape == (2,) and cp.qhat_ == cp.class_qhat_.max()
