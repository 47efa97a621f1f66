"""Operating points chosen on validation probabilities and applied on test, and decision curves.

A decision rule is "positive if ``p_pos >= threshold``" on the probability of the configured positive
class. Thresholds are chosen on the validation split only (never on test) and then applied unchanged to
the test split, where sensitivity, specificity, PPV and NPV are reported with CIs.

Rules:
    * ``youden``: maximises sensitivity + specificity - 1 on validation (ties: the highest threshold).
    * ``sensXX`` (e.g. ``sens90``, ``sens95``): the highest threshold whose validation sensitivity is at
      least XX% (so specificity is as high as possible under the constraint).
    * ``specXX`` (e.g. ``spec90``): the lowest threshold whose validation specificity is at least XX%.

Candidate thresholds are the distinct validation scores (scikit-learn ``roc_curve`` without dropping
points). A rule that calls nothing positive gets a threshold just above 1.

Decision curve (Vickers & Elkin 2006): net benefit at threshold probability ``pt`` is
``TP/N - FP/N * pt / (1 - pt)`` for the model (positive if ``p >= pt``), ``prev - (1 - prev) pt/(1 - pt)``
for treat-all and 0 for treat-none. It is only meaningful on calibrated probabilities.

Axis order: scores and labels are (N,) arrays.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_curve

from pipeline.evaluate.metrics import confusion_metrics, value_ci, wilson_ci
from pipeline.stats.bootstrap import Bootstrap, confusion_stat

__all__ = ["apply_threshold", "choose_threshold", "decision_curve", "operating_points", "parse_rule"]

_RULE = re.compile(r"^(youden|sens(\d{2})|spec(\d{2}))$")
_ABOVE_ONE = math.nextafter(1.0, 2.0)


def parse_rule(rule: str) -> tuple[str, float | None]:
    """Parse an operating-point name into ``(kind, target)``.

    Raises:
        ValueError: If ``rule`` is not "youden", "sensXX" or "specXX" with XX in 01..99.
    """
    m = _RULE.match(rule) if isinstance(rule, str) else None
    if not m or (m.group(2) or m.group(3) or "01") == "00":
        raise ValueError(
            f"operating point: got {rule!r}, "
            "expected 'youden', 'sensXX' or 'specXX' (XX = 01..99, e.g. 'sens90')"
        )
    if m.group(1) == "youden":
        return "youden", None
    if m.group(2):
        return "sensitivity", int(m.group(2)) / 100.0
    return "specificity", int(m.group(3)) / 100.0


def choose_threshold(scores: np.ndarray, y_pos: np.ndarray, rule: str) -> dict:
    """Choose a threshold on validation scores.

    Args:
        scores: Validation positive-class probabilities, shape (N,).
        y_pos: Validation positive labels, shape (N,).
        rule: "youden", "sensXX" or "specXX".

    Returns:
        ``{"rule", "threshold", "val_sensitivity", "val_specificity", "target"}``.
    """
    kind, target = parse_rule(rule)
    y_pos = np.asarray(y_pos, dtype=bool)
    if y_pos.all() or not y_pos.any():
        raise ValueError(
            f"validation labels: operating point {rule!r} needs both classes, got one class only"
        )
    fpr, tpr, thr = roc_curve(y_pos, np.asarray(scores, dtype=np.float64), drop_intermediate=False)
    spec = 1.0 - fpr
    if kind == "youden":
        # Among thresholds with the largest J, the one with the higher sensitivity (tpr ascends with i).
        j = tpr - fpr
        i = int(np.flatnonzero(j >= j.max() - 1e-12)[-1])
    elif kind == "sensitivity":
        i = int(np.flatnonzero(tpr >= target - 1e-12)[0])  # thresholds descend, tpr ascends
    else:
        i = int(np.flatnonzero(spec >= target - 1e-12)[-1])
    t = float(thr[i])
    return {
        "rule": rule,
        "target": target,
        "threshold": t if math.isfinite(t) else _ABOVE_ONE,
        "val_sensitivity": float(tpr[i]),
        "val_specificity": float(spec[i]),
    }


def apply_threshold(
    scores: np.ndarray,
    y_pos: np.ndarray,
    threshold: float,
    bootstrap: Bootstrap | None = None,
    level: float = 0.95,
) -> dict:
    """Sensitivity, specificity, PPV, NPV with CIs and the confusion matrix at a fixed threshold.

    Args:
        scores: Positive-class probabilities, shape (N,).
        y_pos: Positive labels, shape (N,).
        threshold: Positive if ``score >= threshold``.
        bootstrap: If given and clustered (several cases per patient), CIs come from the cluster
            bootstrap; otherwise Wilson intervals are used.
        level: Confidence level of the Wilson intervals.
    """
    y_pos = np.asarray(y_pos, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    tp = int(np.sum(pred & y_pos))
    fp = int(np.sum(pred & ~y_pos))
    tn = int(np.sum(~pred & ~y_pos))
    fn = int(np.sum(~pred & y_pos))
    frac = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
    }
    out: dict = {"threshold": float(threshold)}
    if bootstrap is not None and bootstrap.clustered:
        boot = bootstrap.run({"cm": confusion_stat(y_pos.astype(int), pred.astype(int), 2)})["cm"]
        samples = confusion_metrics(boot.reshape(-1, 2, 2), positive_index=1)
        for name, (k, n) in frac.items():
            out[name] = value_ci(
                k / n if n else float("nan"), bootstrap.ci(samples[name]), "cluster_bootstrap", n=n
            )
    else:
        lvl = bootstrap.ci_level if bootstrap is not None else level
        for name, (k, n) in frac.items():
            out[name] = value_ci(k / n if n else float("nan"), wilson_ci(k, n, lvl), "wilson", n=n)
    out["confusion_matrix"] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    return out


def operating_points(
    val_scores: np.ndarray,
    val_y_pos: np.ndarray,
    test_scores: np.ndarray,
    test_y_pos: np.ndarray,
    rules: Sequence[str] = ("youden", "sens90", "sens95", "spec90"),
    bootstrap: Bootstrap | None = None,
    level: float = 0.95,
) -> dict[str, dict]:
    """Choose each rule's threshold on validation and report it on test.

    Returns:
        Rule name -> ``choose_threshold`` fields plus ``"test"`` (``apply_threshold`` output) and
        ``"target_met_on_test"`` for sensitivity/specificity rules.
    """
    out: dict[str, dict] = {}
    for rule in rules:
        chosen = choose_threshold(val_scores, val_y_pos, rule)
        test = apply_threshold(test_scores, test_y_pos, chosen["threshold"], bootstrap, level)
        kind, target = parse_rule(rule)
        entry = dict(chosen, test=test)
        if target is not None:
            achieved = test[kind]["value"]
            entry["target_met_on_test"] = None if achieved is None else bool(achieved >= target)
        out[rule] = entry
    return out


def decision_curve(scores: np.ndarray, y_pos: np.ndarray, thresholds: np.ndarray | None = None) -> dict:
    """Net benefit of the model, treat-all and treat-none over threshold probabilities.

    Args:
        scores: Calibrated positive-class probabilities, shape (N,).
        y_pos: Positive labels, shape (N,).
        thresholds: Threshold probabilities in (0, 1); default 0.01, 0.02, ..., 0.99.

    Returns:
        ``{"thresholds", "model", "treat_all", "treat_none"}``, lists of equal length.
    """
    pt = (
        np.round(np.arange(1, 100) / 100.0, 2)
        if thresholds is None
        else np.asarray(thresholds, dtype=np.float64)
    )
    if np.any((pt <= 0) | (pt >= 1)):
        raise ValueError(f"thresholds: expected values in (0, 1), got range [{pt.min()}, {pt.max()}]")
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y_pos, dtype=bool)
    n = len(s)
    pred = s[None, :] >= pt[:, None]  # (T, N)
    tp = (pred & y[None, :]).sum(axis=1)
    fp = (pred & ~y[None, :]).sum(axis=1)
    odds = pt / (1.0 - pt)
    prev = y.mean()
    model = tp / n - fp / n * odds
    treat_all = prev - (1.0 - prev) * odds
    return {
        "thresholds": pt.tolist(),
        "model": model.tolist(),
        "treat_all": treat_all.tolist(),
        "treat_none": [0.0] * len(pt),
    }
