"""Split conformal prediction sets from (calibrated) class probabilities.

``SplitConformal`` follows the scikit-learn estimator contract: ``fit(probs, y)`` on the calibration
split stores the conformal quantile ``qhat_``; ``predict_sets(probs)`` returns a boolean membership matrix.
Under exchangeability of calibration and test cases, ``P(y in set) >= 1 - alpha`` (marginal coverage).

Score functions (all use the calibration quantile ``qhat`` = the ``ceil((n + 1)(1 - alpha))``-th smallest
calibration score; when that rank exceeds n, i.e. ``n < 1/alpha - 1``, ``qhat = inf`` and every set holds
all classes):

* ``lac`` (least ambiguous set-valued classifier, Sadinle et al. 2019): score ``1 - p_y``; the set is
  ``{k : 1 - p_k <= qhat}``. Smallest average sets; may be empty for ambiguous cases.
* ``aps`` (adaptive prediction sets, Romano, Sesia & Candes 2020), classes sorted by decreasing
  probability (ties by class index), ``C_k`` = total probability of the classes ranked before k:

  - non-randomised (``randomized=False``, the default): score ``C_y + p_y``; the set is the exact
    conformal set of that score, ``{k : C_k + p_k <= qhat}`` (classes in decreasing order while the
    cumulative mass stays within ``qhat``, as in Angelopoulos & Bates' "gentle introduction" code), plus
    the top-1 class so that no set is empty (adding a class can only raise coverage). Coverage >= 1 - alpha.
    This is tighter than MAPIE's ``include_last_label=True``, which also adds the class that crosses
    ``qhat``.
  - randomised (``randomized=True``): score ``C_y + U p_y`` with ``U ~ Uniform(0, 1)`` drawn per case,
    the set ``{k : C_k + U p_k <= qhat}`` with a fresh ``U`` per test case; coverage is exactly
    1 - alpha in expectation and sets are smaller, but two runs on the same case can differ and a set
    may be empty. The random draws come from ``numpy.random.default_rng(random_state)``.

Axis order: probabilities (N, K) (cases, classes); labels (N,); sets (N, K) boolean.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator

from pipeline.evaluate.metrics import wilson_ci

__all__ = ["SplitConformal", "coverage_report", "min_calibration_size"]

_METHODS = ("lac", "aps")


def min_calibration_size(alpha: float) -> int:
    """Smallest calibration size for which sets are not trivially all classes: ``ceil(1/alpha - 1)``."""
    return math.ceil(1.0 / alpha - 1.0 - 1e-9)


def _check_probs(probs: Any, name: str, n_classes: int | None = None) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"{name}: expected probabilities of shape (N, K) with K >= 2, got shape {p.shape}")
    if n_classes is not None and p.shape[1] != n_classes:
        raise ValueError(f"{name}: expected {n_classes} columns (fitted classes), got {p.shape[1]}")
    if not np.all(np.isfinite(p)) or p.min() < -1e-9 or p.max() > 1 + 1e-9:
        raise ValueError(f"{name}: expected finite probabilities in [0, 1]")
    if not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError(
            f"{name}: expected rows summing to 1, got row sums in "
            f"[{p.sum(axis=1).min():.4f}, {p.sum(axis=1).max():.4f}]"
        )
    return p


def _mass_before(p: np.ndarray) -> np.ndarray:
    """Probability mass of the classes ranked before each class (decreasing probability, stable)."""
    order = np.argsort(-p, axis=1, kind="stable")
    sorted_p = np.take_along_axis(p, order, axis=1)
    before_sorted = np.cumsum(sorted_p, axis=1) - sorted_p
    before = np.empty_like(p)
    np.put_along_axis(before, order, before_sorted, axis=1)
    return before


class SplitConformal(BaseEstimator):
    """Split conformal classifier on probabilities.

    Args:
        alpha: Target miscoverage; sets cover the true class with probability >= 1 - alpha.
        method: "lac" or "aps".
        randomized: Randomised APS (ignored for LAC).
        random_state: Seed for randomised APS.
        class_conditional: Mondrian (class-conditional) sets (Vovk 2005): one quantile per class, from the
            calibration cases of that class, so that ``P(y in set | y = k) >= 1 - alpha`` for every class k,
            not only on average (a rare positive class is otherwise under-covered).

    Attributes:
        qhat_: Conformal quantile of the calibration scores (``inf`` when too few calibration cases); for
            Mondrian sets the largest of ``class_qhat_``.
        class_qhat_: Mondrian only: quantile per class (K,) (``inf`` for a class with fewer than
            ``1/alpha - 1`` calibration cases: that class is then in every set).
        n_calibration_: Number of calibration cases.
        n_classes_: Number of classes K.
    """

    def __init__(
        self,
        alpha: float = 0.1,
        method: str = "lac",
        randomized: bool = False,
        random_state: int = 0,
        class_conditional: bool = False,
    ) -> None:
        self.alpha = alpha
        self.method = method
        self.randomized = randomized
        self.random_state = random_state
        self.class_conditional = class_conditional

    def _scores(self, p: np.ndarray, y: np.ndarray, u: np.ndarray | None) -> np.ndarray:
        rows = np.arange(len(y))
        if self.method == "lac":
            return 1.0 - p[rows, y]
        before = _mass_before(p)[rows, y]
        py = p[rows, y]
        return before + (u * py if u is not None else py)

    def fit(self, probs: Any, y: Any) -> SplitConformal:
        """Compute the conformal quantile on calibration probabilities (N, K) and labels (N,)."""
        if self.method not in _METHODS:
            raise ValueError(f"method: got {self.method!r}, expected one of {', '.join(_METHODS)}")
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha: expected a miscoverage level in (0, 1), got {self.alpha!r}")
        p = _check_probs(probs, "probs")
        y_arr = np.asarray(y)
        if y_arr.shape != (p.shape[0],) or y_arr.dtype.kind not in "iu":
            raise ValueError(
                f"y: expected integer labels of shape ({p.shape[0]},), got {y_arr.dtype} {y_arr.shape}"
            )
        if y_arr.min() < 0 or y_arr.max() >= p.shape[1]:
            raise ValueError(
                f"y: expected class indices in [0, {p.shape[1] - 1}], got [{y_arr.min()}, {y_arr.max()}]"
            )
        rng = np.random.default_rng(self.random_state)
        u = rng.random(len(y_arr)) if (self.method == "aps" and self.randomized) else None
        scores = self._scores(p, y_arr.astype(np.int64), u)
        n = len(scores)
        self.qhat_ = _quantile(scores, self.alpha)
        if self.class_conditional:
            self.class_qhat_ = np.array([_quantile(scores[y_arr == k], self.alpha) for k in range(p.shape[1])])
            self.qhat_ = float(self.class_qhat_.max())
        self.n_calibration_ = n
        self.n_classes_ = p.shape[1]
        self.calibration_scores_ = scores
        self.rng_ = np.random.default_rng([self.random_state, 1])
        return self

    def predict_sets(self, probs: Any, rng: np.random.Generator | None = None) -> np.ndarray:
        """Prediction sets.

        Args:
            probs: Probabilities, shape (N, K).
            rng: Generator for randomised APS draws (default: one owned by the fitted object, seeded
                from ``random_state``).

        Returns:
            Boolean membership matrix of shape (N, K) (cases, classes).
        """
        if not hasattr(self, "qhat_"):
            raise RuntimeError("SplitConformal is not fitted yet: call fit(probs, y) first")
        p = _check_probs(probs, "probs", self.n_classes_)
        # (K,) per-class thresholds for Mondrian sets, else one scalar
        q = self.class_qhat_[None, :] if self.class_conditional else self.qhat_
        if np.all(np.isinf(q)):
            return np.ones(p.shape, dtype=bool)
        if self.method == "lac":
            return (1.0 - p) <= q
        before = _mass_before(p)
        if self.randomized:
            g = rng if rng is not None else self.rng_
            u = g.random(p.shape[0])[:, None]
            return before + u * p <= q
        sets = before + p <= q
        sets[np.arange(p.shape[0]), p.argmax(axis=1)] = True
        return sets


def _quantile(scores: np.ndarray, alpha: float) -> float:
    """The conformal quantile: the ceil((n + 1)(1 - alpha))-th smallest score (``inf`` if n is too small)."""
    n = len(scores)
    rank = math.ceil((n + 1) * (1.0 - alpha))
    return float(np.sort(scores)[rank - 1]) if rank <= n else float("inf")


def coverage_report(sets: np.ndarray, y: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Empirical coverage and set size, overall and per true class.

    Args:
        sets: Boolean membership, shape (N, K).
        y: True labels, shape (N,).
        class_names: Optional K names for the per-class keys.

    Returns:
        ``{"coverage", "coverage_ci", "mean_set_size", "empty_fraction", "set_size_histogram",
        "per_class": {name: {"n", "coverage", "coverage_ci", "mean_set_size"}}}``; ``coverage_ci`` is the
        95% Wilson interval of the covered share (``None`` for a class with no case).
    """
    sets = np.asarray(sets, dtype=bool)
    y = np.asarray(y, dtype=np.int64)
    k = sets.shape[1]
    names = class_names if class_names is not None else [str(i) for i in range(k)]
    covered = sets[np.arange(len(y)), y]
    size = sets.sum(axis=1)
    per_class = {}
    for j in range(k):
        m = y == j
        per_class[names[j]] = {
            "n": int(m.sum()),
            "coverage": float(covered[m].mean()) if m.any() else None,
            "coverage_ci": list(wilson_ci(int(covered[m].sum()), int(m.sum()))) if m.any() else None,
            "mean_set_size": float(size[m].mean()) if m.any() else None,
        }
    return {
        "coverage": float(covered.mean()),
        "coverage_ci": list(wilson_ci(int(covered.sum()), len(y))) if len(y) else None,
        "mean_set_size": float(size.mean()),
        "empty_fraction": float(np.mean(size == 0)),
        "set_size_histogram": np.bincount(size, minlength=k + 1).tolist(),
        "per_class": per_class,
    }
