"""Calibration metrics: Brier score, NLL, binned calibration errors (ECE, MCE, Kumar et al.'s debiased
L2), reliability bins, the logistic calibration intercept and slope, and the calibration block with CIs.

Definitions (binning, references, bias-shifted intervals) are in :mod:`pipeline.evaluate.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit

from pipeline.evaluate.bootstrap import Bootstrap, mean_stat
from pipeline.evaluate.discrimination import _binary_view
from pipeline.evaluate.intervals import _num, bias_shifted_ci, value_ci, wilson_ci

_EPS = 1e-15


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
        "uniform": _binned_stat(conf, correct, n_bins, "uniform"),
        "quantile": _binned_stat(conf, correct, n_bins, "quantile"),
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
    uni = stats["uniform"](ones)[0]
    qua = stats["quantile"](ones)[0]
    out: dict[str, Any] = {"reference": reference, "n_bins": n_bins}
    out["brier"] = value_ci(float(np.mean(brier_cases)), bootstrap.ci(boot["brier"]), bmethod)
    out["nll"] = value_ci(float(np.mean(_nll_per_case(probs, y))), bootstrap.ci(boot["nll"]), bmethod)
    shifted = bmethod + "_bias_shifted"

    def sci(point: float, samples: np.ndarray) -> tuple[float, float]:
        return bias_shifted_ci(point, samples, bootstrap.ci_level)

    out["ece"] = value_ci(uni[0], sci(uni[0], boot["uniform"][:, 0]), shifted, bins="equal_width")
    out["ece_equal_mass"] = value_ci(qua[0], sci(qua[0], boot["quantile"][:, 0]), shifted, bins="equal_mass")
    out["mce"] = value_ci(uni[1], sci(uni[1], boot["uniform"][:, 1]), shifted, bins="equal_width")
    out["l2_ce_debiased"] = value_ci(
        qua[2], sci(qua[2], boot["quantile"][:, 2]), shifted, bins="equal_mass", estimator="kumar2019"
    )
    if binary_fit:
        nan = np.full(bootstrap.n_resamples, np.nan)
        out["calibration_intercept"] = value_ci(a0[0], bootstrap.ci(boot.get("intercept", nan)), bmethod)
        out["calibration_slope"] = value_ci(ab[1], bootstrap.ci(boot.get("slope", nan)), bmethod)
    out["reliability"] = {
        "equal_width": reliability_bins(conf, correct, n_bins, "uniform", bootstrap.ci_level),
        "equal_mass": reliability_bins(conf, correct, n_bins, "quantile", bootstrap.ci_level),
    }
    return out
