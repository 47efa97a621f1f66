"""Discrimination metrics: AUROC (DeLong and bootstrap intervals), paired AUROC differences, ROC points,
confusion-matrix metrics and the discrimination block with CIs.

Conventions (positive class, decision rule, CI methods) are in :mod:`pipeline.evaluate.metrics`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from pipeline.evaluate.delong import auroc_logit_ci, delong_ci
from pipeline.evaluate.intervals import _num, cluster_wilson_ci, value_ci, wilson_ci
from pipeline.stats.bootstrap import (
    Bootstrap,
    auroc_stat,
    average_precision_stat,
    confusion_stat,
)


def _binary_view(probs: np.ndarray, y: np.ndarray, positive_index: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0 <= positive_index < probs.shape[1]:
        raise ValueError(
            f"positive_index: expected a column in [0, {probs.shape[1] - 1}], got {positive_index}"
        )
    return probs[:, positive_index], (y == positive_index)


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
        labels: Classes whose recall enters the balanced accuracy (default: all K; a class absent from
            the labels has no recall). The macro F1 always averages over all K classes, with F1 = 0 for
            a class that is neither present nor predicted, as scikit-learn's
            ``f1_score(y, pred, average="macro", labels=range(K), zero_division=0)``.

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
        out["macro_f1"] = f1.mean(axis=1)
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
    # the printed interval: DeLong / Obuchowski (patient clusters) on the logit scale with a t quantile;
    # the plain DeLong and the percentile bootstrap intervals are kept beside it (see auroc_logit_ci)
    _, llo, lhi, dof = auroc_logit_ci(y_pos, scores, bs.cluster_codes if bs.clustered else None, bs.ci_level)
    method = "obuchowski_logit_t" if bs.clustered else "delong_logit_t"
    return value_ci(
        value,
        (llo, lhi),
        method,
        dof=dof,
        ci_delong=[_num(lo), _num(hi)],
        ci_bootstrap=[_num(bci[0]), _num(bci[1])],
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

    codes = bootstrap.cluster_codes
    hit = (pred == y).astype(np.float64)

    def clustered_prop(value: float, num: np.ndarray, den: np.ndarray) -> dict:
        """A proportion over patient-clustered cases: the design-effect Wilson interval."""
        lo, hi, info = cluster_wilson_ci(num, den, codes, level)
        return value_ci(value, (lo, hi), "cluster_wilson_t", **info)

    def case_sets(name: str) -> tuple[np.ndarray, np.ndarray]:
        """(numerator, denominator) indicators per case of a proportion metric (all but accuracy: binary)."""
        if name == "accuracy":
            return hit, np.ones(len(y))
        pos, ppos = y_pos.astype(np.float64), (pred == positive_index).astype(np.float64)
        return {
            "sensitivity": (ppos, pos),
            "specificity": (1.0 - ppos, 1.0 - pos),
            "ppv": (pos, ppos),
            "npv": (1.0 - pos, 1.0 - ppos),
        }[name]

    def prop(name: str) -> dict:
        if bootstrap.clustered:
            return clustered_prop(point[name], *case_sets(name))
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
        if bootstrap.clustered:
            out["prevalence"] = clustered_prop(float(y_pos.mean()), y_pos.astype(np.float64), np.ones(len(y)))
        else:
            out["prevalence"] = value_ci(float(y_pos.mean()), wilson_ci(int(y_pos.sum()), len(y), level), "wilson")
        out["auroc"] = _auroc_entry(p_pos, y_pos, boot["auroc"], bootstrap)
        ap = average_precision_score(y_pos, p_pos) if y_pos.any() else float("nan")
        out["auprc"] = value_ci(ap, bootstrap.bca_ci(boot["auprc"], stats["auprc"], ap), bmethod + "_bca")
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
            sens_v, ppv_v = tp / n_true if n_true else np.nan, tp / n_pred if n_pred else np.nan
            if bootstrap.clustered:
                pj = (pred == j).astype(np.float64)
                sens = clustered_prop(sens_v, pj, yj.astype(np.float64))
                ppv = clustered_prop(ppv_v, yj.astype(np.float64), pj)
            else:
                sens = value_ci(sens_v, wilson_ci(tp, n_true, level), "wilson")
                ppv = value_ci(ppv_v, wilson_ci(tp, n_pred, level), "wilson")
            per_class[class_names[j]] = {"n": n_true, "auroc": entry, "sensitivity": sens, "ppv": ppv}
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


