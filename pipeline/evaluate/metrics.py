"""Discrimination and calibration metrics, each with a 95% confidence interval.

Every reported number is a dict ``{"value": x, "ci": [lo, hi], "ci_method": ...}`` (non-finite values
become ``None`` so the result is JSON-able). CI methods:

* ``"wilson"``: Wilson score interval for a proportion (scipy ``binomtest(...).proportion_ci``); used for
  accuracy, sensitivity, specificity, PPV, NPV when every patient contributes one case.
* ``"bootstrap"`` / ``"cluster_bootstrap"``: percentile interval of the vectorised (patient-cluster)
  bootstrap in ``pipeline.evaluate.bootstrap``; used for everything else, and for proportions too when
  some patient has several cases (the Wilson interval would assume independent cases).
* ``"delong"``: DeLong interval of the AUROC (``pipeline.evaluate.delong``); the AUROC carries both
  ``ci_delong`` and ``ci_bootstrap`` and its ``ci`` is DeLong for independent cases, the cluster
  bootstrap otherwise.

Conventions:

* Binary tasks have a configured positive class column ``positive_index`` (may be 0). Scores are
  ``probs[:, positive_index]``; the default decision rule is ``score >= 0.5``.
* Calibration of a binary model is measured on the positive-class probability (what a reliability
  diagram of "predicted risk vs observed frequency" shows); for multi-class models on the top-label
  confidence (``max_k p_k`` vs "arg-max is correct", Guo et al. 2017).
* ECE bins follow scikit-learn's ``calibration_curve``: equal-width edges ``linspace(0, 1, B + 1)`` or
  equal-mass edges at the quantiles of the confidences, a value on an inner edge goes to the lower bin,
  empty bins are dropped. ``ECE = sum_b (n_b / N) |freq_b - conf_b|``; ``MCE = max_b |freq_b - conf_b|``.
* Debiased calibration error: Kumar, Liang & Ma (2019), "Verified uncertainty calibration", NeurIPS:
  the plug-in squared error per bin minus its sampling variance ``freq_b (1 - freq_b) / (n_b - 1)``,
  on equal-mass bins, ``sqrt(max(sum_b (n_b/N) [(freq_b - conf_b)^2 - freq_b(1-freq_b)/(n_b-1)], 0))``.
  It estimates the L2 (root-mean-square) calibration error, not the L1 ECE, so it is not numerically
  comparable to ``ece``.
* Calibration slope: ``b`` of the logistic recalibration ``logit P(y=1) = a + b * logit(p)``; calibration
  intercept (calibration-in-the-large): ``a`` of ``logit P(y=1) = a + 1 * logit(p)`` (slope fixed at one,
  Van Calster et al. 2016). Ideal: intercept 0, slope 1. Binary tasks only.
* Brier score: binary ``mean((p_pos - y_pos)^2)`` (scikit-learn's ``brier_score_loss``, range 0..1);
  multi-class ``mean(sum_k (p_k - 1[y = k])^2)`` (Brier's original, range 0..2).
* Bootstrap CIs of binned metrics keep the bin edges of the full sample. Binned calibration errors
  (ECE, MCE, debiased L2) are biased upwards and a resample's error more so, so their percentile
  interval is shifted by the bootstrap bias estimate (``ci_method`` ends in ``_bias_shifted``; see
  ``bias_shifted_ci``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, logit
from scipy.stats import binomtest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.evaluate.bootstrap import (
    Bootstrap,
    auroc_stat,
    average_precision_stat,
    confusion_stat,
    mean_stat,
    percentile_ci,
)
from pipeline.evaluate.delong import delong_ci

__all__ = [
    "bias_shifted_ci",
    "auroc_with_ci",
    "paired_auroc_difference",
    "binned_calibration",
    "brier_score",
    "calibration_block",
    "calibration_intercept_slope",
    "confusion_metrics",
    "debiased_l2_calibration_error",
    "discrimination_block",
    "ece",
    "mce",
    "nll",
    "reliability_bins",
    "roc_points",
    "value_ci",
    "wilson_ci",
]

_EPS = 1e-15


# --------------------------------------------------------------------------------------------- helpers
def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def value_ci(value: float, ci: tuple[float, float] | None, method: str | None = None, **extra: Any) -> dict:
    """The reported form of one number: ``{"value": x, "ci": [lo, hi], "ci_method": m, ...}``."""
    out: dict[str, Any] = {"value": _num(value)}
    out["ci"] = [_num(ci[0]), _num(ci[1])] if ci is not None else [None, None]
    if method is not None:
        out["ci_method"] = method
    out.update(extra)
    return out


def wilson_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k / n`` (``(nan, nan)`` when ``n == 0``)."""
    if n <= 0:
        return float("nan"), float("nan")
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def _binary_view(probs: np.ndarray, y: np.ndarray, positive_index: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= positive_index < probs.shape[1]:
        raise ValueError(
            f"positive_index: expected a column in [0, {probs.shape[1] - 1}], got {positive_index}"
        )
    return probs[:, positive_index], (y == positive_index)


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


def bias_shifted_ci(point: float, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval shifted by the bootstrap bias estimate, clipped at 0.

    Binned calibration errors are biased upwards, and a resample's error is biased further, so the plain
    percentile interval can lie entirely above the point estimate of a well-calibrated model. Shifting
    the interval by ``mean(samples) - point`` (the bootstrap estimate of that bias) centres it on the
    point estimate's scale: ``[q_lo - bias, q_hi - bias]`` clipped to ``>= 0``.
    """
    s = np.asarray(samples, dtype=np.float64)
    lo, hi = percentile_ci(s, level)
    finite = s[np.isfinite(s)]
    if not finite.size or not math.isfinite(point):
        return lo, hi
    bias = float(finite.mean()) - point
    return max(0.0, lo - bias), max(0.0, hi - bias)


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


def roc_points(scores: np.ndarray, y_pos: np.ndarray, max_points: int = 200) -> dict:
    """ROC curve points thinned to at most ``max_points`` (first and last kept).

    Returns:
        ``{"fpr": [...], "tpr": [...], "threshold": [...]}`` (an infinite first threshold becomes None).
    """
    fpr, tpr, thr = roc_curve(y_pos, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.round(np.linspace(0, len(fpr) - 1, max_points)).astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {
        "fpr": [float(v) for v in fpr],
        "tpr": [float(v) for v in tpr],
        "threshold": [_num(v) for v in thr],
    }


# ------------------------------------------------------------------------------ confusion-derived metrics
def confusion_metrics(
    cm: np.ndarray, positive_index: int | None = None, labels: np.ndarray | None = None
) -> dict:
    """Metrics from confusion matrices, vectorised over a leading axis.

    Args:
        cm: Confusion matrices of shape (b, K, K) (rows: true class, columns: predicted class).
        positive_index: For binary tasks, the positive class: adds sensitivity, specificity, PPV, NPV, F1.
        labels: Classes that enter macro averages (default: all K).

    Returns:
        Name -> array of shape (b,): ``accuracy``, ``balanced_accuracy``, ``macro_f1``,
        ``kappa_quadratic`` and, for binary, the positive-class metrics.
    """
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[-1]
    labels = np.arange(k) if labels is None else np.asarray(labels)
    total = cm.sum(axis=(1, 2))
    diag = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        out["accuracy"] = diag.sum(axis=1) / total
        recall = np.where(support > 0, diag / np.where(support > 0, support, 1), np.nan)
        out["balanced_accuracy"] = np.nanmean(recall[:, labels], axis=1) if len(labels) else np.nan
        denom = support + predicted
        f1 = np.where(denom > 0, 2 * diag / np.where(denom > 0, denom, 1), 0.0)
        out["macro_f1"] = f1[:, labels].mean(axis=1)
        i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        wq = (i - j) ** 2.0
        expected = support[:, :, None] * predicted[:, None, :] / total[:, None, None]
        out["kappa_quadratic"] = 1.0 - np.sum(wq * cm, axis=(1, 2)) / np.sum(wq * expected, axis=(1, 2))
        if positive_index is not None:
            p = positive_index
            tp = cm[:, p, p]
            fn = support[:, p] - tp
            fp = predicted[:, p] - tp
            tn = total - tp - fn - fp
            out["sensitivity"] = tp / (tp + fn)
            out["specificity"] = tn / (tn + fp)
            out["ppv"] = tp / (tp + fp)
            out["npv"] = tn / (tn + fn)
            out["f1"] = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
            out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    return out


def _counts_for(name: str, cm: np.ndarray, positive_index: int | None) -> tuple[int, int]:
    """Numerator and denominator of a proportion metric from one confusion matrix (K, K)."""
    total = int(round(cm.sum()))
    if name == "accuracy":
        return int(round(np.trace(cm))), total
    p = positive_index
    tp = int(round(cm[p, p]))
    fn = int(round(cm[p].sum())) - tp
    fp = int(round(cm[:, p].sum())) - tp
    tn = total - tp - fn - fp
    return {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
    }[name]


# ------------------------------------------------------------------------------------------------ blocks
def _auroc_entry(scores: np.ndarray, y_pos: np.ndarray, boot_samples: np.ndarray, bs: Bootstrap) -> dict:
    if y_pos.all() or not y_pos.any():
        return value_ci(float("nan"), None, None, note="one class only: AUROC undefined")
    value = roc_auc_score(y_pos, scores)
    _, lo, hi = delong_ci(y_pos, scores, bs.ci_level)
    bci = bs.ci(boot_samples)
    method = "cluster_bootstrap" if bs.clustered else "delong"
    ci = bci if bs.clustered else (lo, hi)
    return value_ci(
        value, ci, method, ci_delong=[_num(lo), _num(hi)], ci_bootstrap=[_num(bci[0]), _num(bci[1])]
    )


def auroc_with_ci(scores: np.ndarray, y_pos: np.ndarray, bootstrap: Bootstrap) -> dict:
    """AUROC with DeLong and (cluster) bootstrap intervals.

    Args:
        scores: Score per case, shape (N,).
        y_pos: Positive label per case, shape (N,).
        bootstrap: Resampler over the N cases.
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    samples = bootstrap.run({"auc": auroc_stat(scores, y_pos)})["auc"]
    return _auroc_entry(np.asarray(scores, dtype=np.float64), y_pos, samples, bootstrap)


def paired_auroc_difference(
    y_pos: np.ndarray, scores1: np.ndarray, scores2: np.ndarray, bootstrap: Bootstrap
) -> dict:
    """Paired bootstrap of AUROC(model 1) - AUROC(model 2) on the same cases (same resamples).

    Args:
        y_pos: Positive label per case, shape (N,).
        scores1: Scores of model 1, shape (N,).
        scores2: Scores of model 2, shape (N,).
        bootstrap: Resampler over the N cases (cluster bootstrap when it has clusters).

    Returns:
        ``{"value", "ci", "ci_method", "p_value", "auroc1", "auroc2"}``; the p-value is the two-sided
        bootstrap p-value ``2 * min(P*(d <= 0), P*(d >= 0))`` (capped at 1).
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    boot = bootstrap.run({"a": auroc_stat(scores1, y_pos), "b": auroc_stat(scores2, y_pos)})
    d = boot["a"] - boot["b"]
    d = d[np.isfinite(d)]
    a1, a2 = roc_auc_score(y_pos, scores1), roc_auc_score(y_pos, scores2)
    p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))) if len(d) else float("nan")
    method = "cluster_bootstrap" if bootstrap.clustered else "bootstrap"
    return value_ci(a1 - a2, bootstrap.ci(d), method, p_value=p, auroc1=_num(a1), auroc2=_num(a2))


def discrimination_block(
    probs: np.ndarray,
    y: np.ndarray,
    kind: str,
    class_names: list[str],
    positive_index: int | None,
    bootstrap: Bootstrap,
    threshold: float = 0.5,
) -> dict:
    """Discrimination metrics with CIs for one split.

    Args:
        probs: Probabilities, shape (N, K) (cases, classes).
        y: Integer labels, shape (N,).
        kind: "binary", "multiclass" or "ordinal".
        class_names: K class names.
        positive_index: Positive class column for binary tasks.
        bootstrap: Resampler over the N cases (its clusters decide case vs patient bootstrap).
        threshold: Decision threshold on the positive-class probability (binary only).

    Returns:
        JSON-able dict (see docs/metrics_schema.md, "discrimination").
    """
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = probs.shape[1]
    level = bootstrap.ci_level
    binary = kind == "binary"
    if binary:
        p_pos, y_pos = _binary_view(probs, y, positive_index)
        pred = np.where(p_pos >= threshold, positive_index, 1 - positive_index) if k == 2 else probs.argmax(1)
    else:
        pred = probs.argmax(axis=1)
    labels = np.unique(y)
    stats: dict[str, Any] = {"cm": confusion_stat(y, pred, k)}
    if binary:
        stats["auroc"] = auroc_stat(p_pos, y_pos)
        stats["auprc"] = average_precision_stat(p_pos, y_pos)
    else:
        for j in range(k):
            stats[f"auroc_{j}"] = auroc_stat(probs[:, j], y == j)
    boot = bootstrap.run(stats)
    cm_boot = boot["cm"].reshape(-1, k, k)
    cm_point = np.zeros((k, k))
    np.add.at(cm_point, (y, pred), 1.0)
    point = {
        n: float(v[0])
        for n, v in confusion_metrics(cm_point[None], positive_index if binary else None, labels).items()
    }
    samples = confusion_metrics(cm_boot, positive_index if binary else None, labels)
    bmethod = "cluster_bootstrap" if bootstrap.clustered else "bootstrap"

    def prop(name: str) -> dict:
        if bootstrap.clustered:
            return value_ci(point[name], bootstrap.ci(samples[name]), bmethod)
        num, den = _counts_for(name, cm_point, positive_index)
        return value_ci(point[name], wilson_ci(num, den, level), "wilson", n=den)

    out: dict[str, Any] = {"n": int(len(y)), "prediction_rule": None}
    out["accuracy"] = prop("accuracy")
    out["balanced_accuracy"] = value_ci(
        point["balanced_accuracy"], bootstrap.ci(samples["balanced_accuracy"]), bmethod
    )
    if binary:
        out["prediction_rule"] = f"positive if p[{class_names[positive_index]}] >= {threshold:g}"
        out["positive_class"] = class_names[positive_index]
        prev_ci = (
            bootstrap.ci((cm_boot[:, positive_index, :].sum(axis=1)) / cm_boot.sum(axis=(1, 2)))
            if bootstrap.clustered
            else wilson_ci(int(y_pos.sum()), len(y), level)
        )
        out["prevalence"] = value_ci(
            float(y_pos.mean()), prev_ci, bmethod if bootstrap.clustered else "wilson"
        )
        out["auroc"] = _auroc_entry(p_pos, y_pos, boot["auroc"], bootstrap)
        ap = average_precision_score(y_pos, p_pos) if y_pos.any() else float("nan")
        out["auprc"] = value_ci(ap, bootstrap.ci(boot["auprc"]), bmethod)
        for name in ("sensitivity", "specificity", "ppv", "npv"):
            out[name] = prop(name)
        out["f1"] = value_ci(point["f1"], bootstrap.ci(samples["f1"]), bmethod)
    else:
        out["prediction_rule"] = "arg-max"
        per_class: dict[str, Any] = {}
        auc_samples = []
        auc_values = []
        for j in range(k):
            yj = y == j
            entry = _auroc_entry(probs[:, j], yj, boot[f"auroc_{j}"], bootstrap)
            tp = int(cm_point[j, j])
            n_true, n_pred = int(yj.sum()), int(cm_point[:, j].sum())
            if bootstrap.clustered:
                with np.errstate(invalid="ignore", divide="ignore"):
                    rec_ci = bootstrap.ci(cm_boot[:, j, j] / cm_boot[:, j, :].sum(axis=1))
                    ppv_ci = bootstrap.ci(cm_boot[:, j, j] / cm_boot[:, :, j].sum(axis=1))
                pmethod = bmethod
            else:
                rec_ci, ppv_ci, pmethod = wilson_ci(tp, n_true, level), wilson_ci(tp, n_pred, level), "wilson"
            per_class[class_names[j]] = {
                "n": n_true,
                "auroc": entry,
                "sensitivity": value_ci(tp / n_true if n_true else np.nan, rec_ci, pmethod),
                "ppv": value_ci(tp / n_pred if n_pred else np.nan, ppv_ci, pmethod),
            }
            if yj.any() and not yj.all():
                auc_samples.append(boot[f"auroc_{j}"])
                auc_values.append(entry["value"])
        out["per_class"] = per_class
        if auc_values:
            macro_samples = np.mean(np.column_stack(auc_samples), axis=1)
            out["macro_auroc"] = value_ci(float(np.mean(auc_values)), bootstrap.ci(macro_samples), bmethod)
        else:
            out["macro_auroc"] = value_ci(float("nan"), None, None)
        out["macro_f1"] = value_ci(point["macro_f1"], bootstrap.ci(samples["macro_f1"]), bmethod)
        if kind == "ordinal":
            out["kappa_quadratic"] = value_ci(
                point["kappa_quadratic"], bootstrap.ci(samples["kappa_quadratic"]), bmethod
            )
    out["confusion_matrix"] = {
        "labels": list(class_names),
        "rows_true_cols_pred": cm_point.astype(int).tolist(),
    }
    return out


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
