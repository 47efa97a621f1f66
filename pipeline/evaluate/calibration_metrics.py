"""Calibration metrics: Brier score, NLL, binned calibration errors (ECE, MCE, Kumar et al.'s debiased
L2), reliability bins, the logistic calibration intercept and slope, and the calibration block with CIs.

Definitions (binning, references) are in :mod:`pipeline.evaluate.metrics`; the intervals of the binned
calibration errors are explained in ``binned_error_ci``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit

from pipeline.evaluate.discrimination import _binary_view
from pipeline.evaluate.intervals import _num, inverted_ci, value_ci, wilson_ci
from pipeline.stats.bootstrap import Bootstrap, mean_stat

_EPS = 1e-15
#: Why the MCE is reported without an interval (``ci: null``).
MCE_CI_NOTE = (
    "no interval: the population MCE is the largest error over bins, set by sparsely populated bins that "
    "a test set rarely samples; no interval reached nominal coverage in bench/coverage.py"
)


# ------------------------------------------------------------------------------ calibration: point values
def brier_score(probs: np.ndarray, y: np.ndarray) -> float:
    """Brier score of probabilities (N, K) against labels (N,); see module docstring for the definition."""
    return float(np.mean(_brier_per_case(probs, y)))


def _brier_per_case(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    if probs.shape[1] == 2:
        return (probs[:, 1] - (y == 1)) ** 2
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(y)), y] = 1.0
    return np.sum((probs - onehot) ** 2, axis=1)


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood (log-loss) of probabilities (N, K), clipped at 1e-15."""
    return float(np.mean(_nll_per_case(probs, y)))


def _nll_per_case(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(probs[np.arange(len(y)), y], _EPS, 1.0))


def _bin_edges(conf: np.ndarray, n_bins: int, strategy: str) -> np.ndarray:
    if strategy == "uniform":
        return np.linspace(0.0, 1.0, n_bins + 1)
    if strategy == "quantile":
        return np.percentile(conf, np.linspace(0.0, 100.0, n_bins + 1))
    raise ValueError(
        f"strategy: expected 'uniform' (equal width) or 'quantile' (equal mass), got {strategy!r}"
    )


def binned_calibration(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = 15, strategy: str = "uniform"
) -> dict:
    """Per-bin counts, mean confidence and observed frequency.

    Args:
        conf: Predicted probability per case (positive-class or top-label), shape (N,).
        correct: Outcome per case (1 if positive / arg-max correct), shape (N,).
        n_bins: Number of bins.
        strategy: "uniform" (equal width) or "quantile" (equal mass).

    Returns:
        Dict with ``edges`` (n_bins + 1,), ``bin_ids`` (N,), and per bin (n_bins,) ``count``,
        ``sum_conf``, ``sum_correct``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins: expected >= 1, got {n_bins}")
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = _bin_edges(conf, n_bins, strategy)
    ids = np.searchsorted(edges[1:-1], conf)
    return {
        "edges": edges,
        "bin_ids": ids,
        "count": np.bincount(ids, minlength=n_bins).astype(np.float64),
        "sum_conf": np.bincount(ids, weights=conf, minlength=n_bins),
        "sum_correct": np.bincount(ids, weights=correct, minlength=n_bins),
    }


def _ece_from_sums(cnt: np.ndarray, sc: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """ECE, MCE and debiased L2 error from per-bin weighted sums, each of shape (b, M)."""
    total = cnt.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(sy - sc)
        ece_v = gap.sum(axis=-1) / total
        nonempty = cnt > 0
        freq = np.where(nonempty, sy / np.where(nonempty, cnt, 1), 0.0)
        confm = np.where(nonempty, sc / np.where(nonempty, cnt, 1), 0.0)
        mce_v = np.max(np.where(nonempty, np.abs(freq - confm), 0.0), axis=-1)
        big = cnt > 1
        var = np.where(big, freq * (1 - freq) / np.where(big, cnt - 1, 1), 0.0)
        term = np.where(big, (freq - confm) ** 2 - var, 0.0)
        l2 = np.sqrt(np.maximum(np.sum(cnt * term, axis=-1) / total, 0.0))
    return np.stack([ece_v, mce_v, l2], axis=-1)


def ece(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Expected calibration error ``sum_b (n_b / N) |freq_b - conf_b|`` (see module docstring)."""
    b = binned_calibration(conf, correct, n_bins, strategy)
    return float(_ece_from_sums(b["count"][None], b["sum_conf"][None], b["sum_correct"][None])[0, 0])


def mce(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Maximum calibration error over non-empty bins."""
    b = binned_calibration(conf, correct, n_bins, strategy)
    return float(_ece_from_sums(b["count"][None], b["sum_conf"][None], b["sum_correct"][None])[0, 1])


def debiased_l2_calibration_error(conf: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """Kumar et al. (2019) debiased L2 calibration error on equal-mass bins (see module docstring)."""
    b = binned_calibration(conf, correct, n_bins, "quantile")
    return float(_ece_from_sums(b["count"][None], b["sum_conf"][None], b["sum_correct"][None])[0, 2])


def _binned_stat(conf: np.ndarray, correct: np.ndarray, n_bins: int, strategy: str):
    """Bootstrap statistic returning (b, 3): ECE, MCE, debiased L2 with the full-sample bin edges."""
    b = binned_calibration(conf, correct, n_bins, strategy)
    n = len(conf)
    onehot = np.zeros((n, n_bins))
    onehot[np.arange(n), b["bin_ids"]] = 1.0
    oc = onehot * np.asarray(conf, dtype=np.float64)[:, None]
    oy = onehot * np.asarray(correct, dtype=np.float64)[:, None]

    def stat(w: np.ndarray) -> np.ndarray:
        return _ece_from_sums(w @ onehot, w @ oc, w @ oy)

    return stat


#: Most resample x case elements simulated per null world of ``binned_error_ci`` (bounds memory for big N).
_WORLD_ELEMENTS = 2_000_000


def _within_cluster_dependence(resid: np.ndarray, conf: np.ndarray, codes: np.ndarray) -> float:
    """Share ``rho`` of clusters whose outcomes move together, matched to the residual cross-products.

    In the simulated worlds of ``binned_error_ci`` a cluster's outcomes come, with probability ``rho``,
    from one shared uniform draw (comonotone: ``cov(y_j, y_k) = min(p_j, p_k) - p_j p_k``), otherwise from
    independent draws. ``rho`` is the method-of-moments estimate: the sum over pairs of cases of one
    cluster of ``r_j r_k`` (``r = y - p``) over the sum of ``min(p_j, p_k) - p_j p_k``, clipped to [0, 1].
    """
    order = np.argsort(codes, kind="stable")
    c, r, p = codes[order], resid[order], conf[order]
    starts = np.flatnonzero(np.r_[True, c[1:] != c[:-1]])
    sizes = np.diff(np.r_[starts, len(c)])
    num = den = 0.0
    for a in starts[sizes > 1]:
        b = a + sizes[np.searchsorted(starts, a)]
        x, q = r[a:b], p[a:b]
        num += x.sum() ** 2 - np.sum(x * x)
        m = np.minimum.outer(q, q) - np.outer(q, q)
        den += m.sum() - np.trace(m)
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 0.0


def binned_error_ci(
    conf: np.ndarray,
    correct: np.ndarray,
    bootstrap: Bootstrap,
    n_bins: int = 15,
) -> dict[str, tuple[float, float]]:
    """Intervals of the binned calibration errors (ECE, equal-mass ECE, debiased L2) by test inversion.

    Why not a bootstrap percentile interval: the sample ECE is biased upwards (``|freq - conf|`` of a bin
    with few cases is mostly noise), by about as much as the ECE of a typical miscalibrated model, and a
    resample's ECE is biased further. The bias-shifted percentile interval used before covered the
    population ECE of a perfectly calibrated model in 0% of simulated test sets of 150 cases (its lower
    bound never reaches 0) and of miscalibrated models in 66-79% (``tests/test_coverage.py`` keeps it as
    the counter-example); near 0 no shift can fix it because the parameter sits on the boundary.

    Construction (a parametric bootstrap along a one-parameter family of worlds, inverted):

    1. The direction of miscalibration is the logistic recalibration curve fitted to the data,
       ``g_i = expit(a + b logit(p_i)) - p_i`` (Cox 1958; the same fit as the calibration slope). It is a
       smooth two-parameter estimate, so unlike the per-bin gaps it is not inflated by bin noise.
    2. World ``u >= 0`` keeps the cases' probabilities ``p_i`` and gives case i the true outcome
       probability ``pi_i(u) = clip(p_i + u g_i, 0, 1)``: ``u = 0`` is a perfectly calibrated model and
       ``u = 1`` the fitted miscalibration. Its true error ``theta(u)`` is the error of ``pi(u)`` against
       ``p`` with the same bins (for the L2 error the plain, not debiased, value).
    3. Test sets of a world are simulated: cases (patients, when the bootstrap is clustered) are drawn as
       in ``bootstrap`` (so bin masses vary as in a new sample), and every drawn copy of a case is a new
       case with the same probability: its outcome is a fresh Bernoulli draw from ``pi(u)``, so a case
       drawn ``w`` times contributes ``Binomial(w, pi)`` events and a bin's outcome variance is that of a
       new sample (a bin without events still has its binomial variance, which the nonparametric
       bootstrap misses). Clustered data: within each drawn copy of a patient, the outcomes are
       comonotone (one shared uniform) with probability ``rho`` (``_within_cluster_dependence``),
       matching the within-patient residual covariance.
    4. ``inverted_ci`` keeps every ``theta(u)`` whose world makes the observed error unsurprising (one-sided
       at ``theta = 0``), so the lower bound is 0 exactly when the data are consistent with perfect
       calibration.

    Measured coverage of the population error (same bins, true probabilities), nominal 95%, 2,000
    simulated test sets of 150 cases per scenario (``bench/coverage.py``, BENCHMARKS.md, "Coverage of the
    report's intervals"): 93.7-96.4% for the ECE, 94.1-96.3% for the equal-mass ECE and 94.5-97.3% for
    the debiased L2, for well-calibrated, over-confident and strongly under-confident models, with and
    without patient clusters. An earlier version gave all copies of a drawn case one shared outcome
    scaled by ``1 / sqrt(E[count^2])``: the same variance on average, but it under-dispersed the
    statistic of the under-confident model (coverage down to 90%). It assumes the miscalibration is
    close to a logistic recalibration of the model's probabilities (the shape temperature/Platt scaling
    fix); a strongly non-monotone miscalibration is a different direction and may be covered less often.

    Args:
        conf: Predicted probability per case (positive-class or top-label), shape (N,).
        correct: Outcome per case (0/1), shape (N,).
        bootstrap: Resampler over the N cases: its seed, resample count (at most
            ``_WORLD_ELEMENTS / N`` are simulated per world, at least 200), clusters and ``ci_level``.
        n_bins: Number of bins. Equal-width bins are fixed; equal-mass bins are the rank-based
            equal-mass bins of each simulated sample (and of the observed one: a case on a tie may fall
            in the neighbouring bin of ``binned_calibration``'s percentile edges).

    Returns:
        ``{"ece": (lo, hi), "ece_equal_mass": (lo, hi), "l2_ce_debiased": (lo, hi)}``.
    """
    conf = np.asarray(conf, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = len(conf)
    uni = binned_calibration(conf, correct, n_bins, "uniform")
    onehot = np.zeros((n, n_bins))
    onehot[np.arange(n), uni["bin_ids"]] = 1.0
    x = logit(np.clip(conf, 1e-12, 1 - 1e-12))
    a, s = _recal_point(x, correct, offset=False)
    gap = expit(a + s * x) - conf if np.isfinite(a) and np.isfinite(s) else correct - conf
    n_world = max(200, min(bootstrap.n_resamples, _WORLD_ELEMENTS // n))
    codes = bootstrap._codes if bootstrap.clustered else None
    w = np.concatenate(list(Bootstrap(n, n_world, bootstrap.seed, codes, bootstrap.ci_level).counts()))
    seed = bootstrap.seed
    seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, 7)))
    rho = _within_cluster_dependence(correct - conf, conf, codes) if codes is not None else 0.0
    g = bootstrap.n_clusters if codes is not None else n

    def copy_uniforms(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """One uniform per drawn copy (row, case); a cluster's copy shares one with probability rho."""
        u = rng.random(rows.size)
        if codes is None or rho <= 0.0:
            return u
        shared = rng.random((n_world, g))
        together = rng.random((n_world, g)) < rho
        pick = together[rows, codes[cols]]
        return np.where(pick, shared[rows, codes[cols]], u)

    # Copy k of a case drawn w >= k times is a new case with the same probability: its outcome comes from
    # its own uniform, so a bin's outcome variance is that of a new sample (sum of w Bernoulli draws).
    copies = []
    flat_w = w.ravel()
    for k in range(1, int(w.max()) + 1):
        idx = np.flatnonzero(flat_w >= k)
        copies.append((idx, idx % n, copy_uniforms(idx // n, idx % n)))
    n_star = w.sum(axis=1)
    b_rows = len(w)
    # Equal-mass bins are redrawn in every simulated sample (ranks of its cases, each drawn case placed
    # at the middle of its copies), as a new test set would have its own quantiles; row 0 of ``mass_ids``
    # is the observed sample itself (every case once).
    order = np.argsort(conf, kind="stable")
    ws = np.vstack([np.ones((1, n)), w])[:, order]
    mid = (np.cumsum(ws, axis=1) - 0.5 * ws) / ws.sum(axis=1, keepdims=True)
    mass_ids = np.empty(ws.shape, dtype=np.int64)
    mass_ids[:, order] = np.minimum((mid * n_bins).astype(np.int64), n_bins - 1)
    flat = (np.arange(b_rows + 1)[:, None] * n_bins + mass_ids).ravel()

    def mass_sums(values: np.ndarray) -> np.ndarray:
        """Per-bin sums of (rows + 1, N) values in each row's equal-mass bins: (rows + 1, n_bins)."""
        return np.bincount(flat, weights=values.ravel(), minlength=(b_rows + 1) * n_bins).reshape(-1, n_bins)

    wfull = np.vstack([np.ones((1, n)), w])
    cnt_m, conf_m = mass_sums(wfull), mass_sums(wfull * conf)
    conf_u = w @ (onehot * conf[:, None])
    cnt0_u, conf0_u = onehot.sum(axis=0), onehot.T @ conf
    obs_m = _ece_from_sums(cnt_m[:1], conf_m[:1], mass_sums(np.vstack([correct, np.zeros_like(w)]))[:1])[0]
    observed = np.array(
        [_ece_from_sums(cnt0_u[None], conf0_u[None], (onehot.T @ correct)[None])[0, 0], obs_m[0], obs_m[2]]
    )

    def world(u: float) -> tuple[np.ndarray, np.ndarray]:
        pi = np.clip(conf + u * gap, 0.0, 1.0)
        gap_u = onehot.T @ pi - conf0_u
        wy = np.zeros(w.size)
        for idx, cols, uk in copies:
            wy[idx] += uk < pi[cols]
        wy = wy.reshape(w.shape)
        sy_m = mass_sums(np.vstack([pi, wy]))
        gap_m = sy_m[0] - conf_m[0]
        nz = cnt_m[0] > 0
        l2 = np.sqrt(np.sum(np.where(nz, gap_m**2 / np.where(nz, cnt_m[0], 1), 0.0)) / n)
        theta = np.array([np.abs(gap_u).sum() / n, np.abs(gap_m).sum() / n, l2])
        ece_u = np.abs(wy @ onehot - conf_u).sum(axis=1) / n_star
        m = _ece_from_sums(cnt_m[1:], conf_m[1:], sy_m[1:])
        return theta, np.column_stack([ece_u, m[:, 0], m[:, 2]])

    bounds = inverted_ci(observed, world, bootstrap.ci_level)
    return dict(zip(("ece", "ece_equal_mass", "l2_ce_debiased"), bounds, strict=True))


def reliability_bins(
    conf: np.ndarray, correct: np.ndarray, n_bins: int = 15, strategy: str = "uniform", level: float = 0.95
) -> list[dict]:
    """Reliability-diagram data: one dict per non-empty bin.

    Keys: ``lower``, ``upper`` (bin edges), ``count``, ``mean_confidence``, ``observed_frequency`` and
    its Wilson interval ``observed_ci``.
    """
    b = binned_calibration(conf, correct, n_bins, strategy)
    out = []
    for i in range(n_bins):
        c = int(b["count"][i])
        if c == 0:
            continue
        k = int(round(b["sum_correct"][i]))
        out.append(
            {
                "lower": _num(b["edges"][i]),
                "upper": _num(b["edges"][i + 1]),
                "count": c,
                "mean_confidence": _num(b["sum_conf"][i] / c),
                "observed_frequency": _num(b["sum_correct"][i] / c),
                "observed_ci": [_num(v) for v in wilson_ci(k, c, level)],
            }
        )
    return out


def _recal_point(x: np.ndarray, t: np.ndarray, offset: bool) -> tuple[float, float]:
    """Maximum-likelihood ``(a, s)`` of ``logit P(t) = a + s * x`` (``s`` fixed at 1 with ``offset``)."""

    def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, s = theta[0], (1.0 if offset else theta[1])
        u = a + s * x
        d = expit(u) - t
        value = float(np.sum(np.logaddexp(0.0, u) - t * u))
        grad = np.array([d.sum()] if offset else [d.sum(), d @ x])
        return value, grad

    res = minimize(loss, np.zeros(1) if offset else np.array([0.0, 1.0]), jac=True, method="BFGS")
    a = float(res.x[0])
    s = 1.0 if offset else float(res.x[1])
    if not (res.success or res.status == 2) or abs(a) > 1e3 or abs(s) > 1e3:
        return float("nan"), float("nan")
    return a, s


def _logistic_recal(
    x: np.ndarray, t: np.ndarray, w: np.ndarray, offset: bool, start: tuple[float, float], iters: int = 30
) -> np.ndarray:
    """Vectorised Newton fit of ``logit P(t) = a + s * x`` (or ``a + x`` with ``offset``) per weight row.

    Starts from ``start`` (the full-sample estimate), so a few damped Newton steps suffice.

    Returns:
        (b, 2) array of ``(a, s)``; rows that did not converge (e.g. separation) are NaN.
    """
    b = w.shape[0]
    a = np.full(b, start[0])
    s = np.full(b, 1.0 if offset else start[1])
    step = np.full(b, np.inf)
    xx = x * x
    wt = w @ t
    wtx = w @ (t * x)
    active = np.arange(b)  # rows still iterating: converged rows drop out (most do within ~4 steps)
    for _ in range(iters):
        wa = w[active]
        eta = a[active, None] + (x[None, :] if offset else s[active, None] * x[None, :])
        mu = expit(eta)
        wm = wa * mu
        v = wm - wm * mu  # w * mu * (1 - mu)
        g0 = wt[active] - wm.sum(axis=1)
        h00 = v.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if offset:
                da = g0 / h00
                ds = np.zeros(len(active))
            else:
                g1 = wtx[active] - wm @ x
                h01 = v @ x
                h11 = v @ xx
                det = h00 * h11 - h01**2
                da = (h11 * g0 - h01 * g1) / det
                ds = (-h01 * g0 + h00 * g1) / det
        da = np.nan_to_num(da, nan=0.0, posinf=0.0, neginf=0.0)
        ds = np.nan_to_num(ds, nan=0.0, posinf=0.0, neginf=0.0)
        size = np.abs(da) + np.abs(ds)
        damp = np.minimum(1.0, 2.0 / np.maximum(size, 1e-300))  # cap each step at length 2
        a[active] += damp * da
        s[active] += damp * ds
        step[active] = size
        active = active[size >= 1e-7]
        if not len(active):
            break
    ok = (step < 1e-5) & (np.abs(a) < 1e3) & (np.abs(s) < 1e3)
    return np.where(ok[:, None], np.column_stack([a, s]), np.nan)


def slope_sandwich_ci(
    x: np.ndarray, t: np.ndarray, fit: np.ndarray, bootstrap: Bootstrap
) -> tuple[tuple[float, float], int]:
    """Interval of the calibration slope from the (patient-)cluster-robust sandwich variance of the
    logistic fit ``logit P(t) = a + s x``, with a t quantile on ``bootstrap.effective_n - 1`` dof.

    Why not the bootstrap percentile: the slope of a 150-case test set is skewed and its percentile
    interval covered 89-93% in ``bench/coverage.py``; this one 95-96% (BENCHMARKS.md). The sandwich
    (Huber-White, summed per cluster with the ``G / (G - 1)`` factor) is a few lines of linear algebra on
    the fit already made here; statsmodels, which has it, is not a dependency.

    Returns:
        ``((lower, upper), dof)``.
    """
    from scipy.stats import t as student_t

    a, s = float(fit[0]), float(fit[1])
    mu = expit(a + s * x)
    design = np.column_stack([np.ones_like(x), x])  # (N, 2)
    bread = np.linalg.inv((design * (mu * (1.0 - mu))[:, None]).T @ design)
    codes = bootstrap.cluster_codes
    g = int(codes.max()) + 1
    per_cluster = np.zeros((g, 2))
    np.add.at(per_cluster, codes, design * (t - mu)[:, None])  # score contributions summed per patient
    meat = per_cluster.T @ per_cluster * (g / max(g - 1, 1))
    se = float(np.sqrt(max((bread @ meat @ bread)[1, 1], 0.0)))
    dof = max(1, int(bootstrap.effective_n) - 1)
    q = float(student_t.ppf(0.5 + bootstrap.ci_level / 2.0, dof))
    return (s - q * se, s + q * se), dof


def calibration_intercept_slope(p_pos: np.ndarray, y_pos: np.ndarray) -> tuple[float, float]:
    """Calibration intercept (slope fixed at 1) and calibration slope of a binary model.

    Args:
        p_pos: Predicted probability of the positive class, shape (N,).
        y_pos: Positive label per case, shape (N,).

    Returns:
        ``(intercept, slope)``; NaN when the logistic fit does not converge (e.g. one class only).
    """
    x = logit(np.clip(np.asarray(p_pos, dtype=np.float64), 1e-12, 1 - 1e-12))
    t = np.asarray(y_pos, dtype=np.float64)
    return _recal_point(x, t, offset=True)[0], _recal_point(x, t, offset=False)[1]


def calibration_block(
    probs: np.ndarray,
    y: np.ndarray,
    kind: str,
    positive_index: int | None,
    bootstrap: Bootstrap,
    n_bins: int = 15,
) -> dict:
    """Calibration metrics with CIs for one split.

    Args:
        probs: Probabilities, shape (N, K).
        y: Integer labels, shape (N,).
        kind: "binary", "multiclass" or "ordinal".
        positive_index: Positive class column for binary tasks.
        bootstrap: Resampler over the N cases.
        n_bins: Number of ECE / reliability bins.

    Returns:
        JSON-able dict (see docs/metrics_schema.md, "calibration").
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if kind == "binary":
        conf, correct = _binary_view(probs, y, positive_index)
        reference = "positive_class"
    else:
        conf, correct = probs.max(axis=1), (probs.argmax(axis=1) == y)
        reference = "top_label"
    correct = correct.astype(np.float64)
    brier_cases = (conf - correct) ** 2 if kind == "binary" else _brier_per_case(probs, y)
    stats: dict[str, Any] = {
        "brier": mean_stat(brier_cases),
        "nll": mean_stat(_nll_per_case(probs, y)),
    }
    binary_fit = kind == "binary"
    if binary_fit:
        x = logit(np.clip(conf, 1e-12, 1 - 1e-12))
        a0 = _recal_point(x, correct, offset=True)
        ab = _recal_point(x, correct, offset=False)
        if np.all(np.isfinite(a0)):
            stats["intercept"] = lambda w: _logistic_recal(x, correct, w, True, a0)[:, 0]
        if np.all(np.isfinite(ab)):
            stats["slope"] = lambda w: _logistic_recal(x, correct, w, False, ab)[:, 1]
    boot = bootstrap.run(stats)
    bmethod = "cluster_bootstrap" if bootstrap.clustered else "bootstrap"
    ones = np.ones((1, len(y)))
    uni = _binned_stat(conf, correct, n_bins, "uniform")(ones)[0]
    qua = _binned_stat(conf, correct, n_bins, "quantile")(ones)[0]
    out: dict[str, Any] = {"reference": reference, "n_bins": n_bins}
    out["brier"] = value_ci(float(np.mean(brier_cases)), bootstrap.ci(boot["brier"]), bmethod)
    # the per-case log-loss is right-skewed (a few confident errors dominate): BCa, which corrects the
    # skew, where the expanded percentile interval covered 0.919 with patient clusters (bench/coverage.py)
    nll_point = float(np.mean(_nll_per_case(probs, y)))
    out["nll"] = value_ci(nll_point, bootstrap.bca_ci(boot["nll"], stats["nll"], nll_point), bmethod + "_bca")
    inverted = ("cluster_" if bootstrap.clustered else "") + "parametric_bootstrap_inversion"

    ici = binned_error_ci(conf, correct, bootstrap, n_bins)
    out["ece"] = value_ci(uni[0], ici["ece"], inverted, bins="equal_width")
    out["ece_equal_mass"] = value_ci(qua[0], ici["ece_equal_mass"], inverted, bins="equal_mass")
    out["mce"] = {"value": _num(uni[1]), "ci": None, "ci_note": MCE_CI_NOTE, "bins": "equal_width"}
    out["l2_ce_debiased"] = value_ci(
        qua[2], ici["l2_ce_debiased"], inverted, bins="equal_mass", estimator="kumar2019"
    )
    if binary_fit:
        nan = np.full(bootstrap.n_resamples, np.nan)
        out["calibration_intercept"] = value_ci(a0[0], bootstrap.ci(boot.get("intercept", nan)), bmethod)
        if np.all(np.isfinite(ab)):
            slope_ci, dof = slope_sandwich_ci(x, correct, ab, bootstrap)
            smethod = ("cluster_" if bootstrap.clustered else "") + "sandwich_t"
            out["calibration_slope"] = value_ci(
                ab[1],
                slope_ci,
                smethod,
                dof=dof,
                ci_bootstrap=[_num(v) for v in bootstrap.ci(boot.get("slope", nan))],
            )
        else:
            out["calibration_slope"] = value_ci(ab[1], None, None, note="logistic fit did not converge")
    out["reliability"] = {
        "equal_width": reliability_bins(conf, correct, n_bins, "uniform", bootstrap.ci_level),
        "equal_mass": reliability_bins(conf, correct, n_bins, "quantile", bootstrap.ci_level),
    }
    return out
