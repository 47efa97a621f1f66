"""Fitting the calibrator, with a guard: a calibrator is applied only when it helps on its own data.

The calibrator is fitted on the calibration split only. Before it is applied it must pass two checks,
both computed on the calibration split (never on test):

* **Degenerate fit.** Temperature scaling whose ``log T`` reached its bound (``T = e^5`` or ``e^-5``)
  collapses or saturates every probability; it is declined (as ``auto`` would never choose it).
* **Cross-validated harm.** The method's out-of-fold NLL (stratified K-fold on the calibration split,
  K = min(5, rarest class count)) is compared with the uncalibrated softmax's; a method that makes the
  NLL worse is declined. For binary tasks the out-of-fold calibration slope is reported too, and a slope
  made further from 1 is flagged.

``auto`` already chooses by cross-validated NLL among candidates that include ``none``; the degenerate-fit
check applies to its choice as well. Declining means the uncalibrated softmax is used and the report says
why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.special import softmax
from sklearn.model_selection import StratifiedKFold

from pipeline.evaluate.metrics import calibration_intercept_slope, nll
from pipeline.trained.calibration import TemperatureScaling, make_calibrator

__all__ = ["calibrator_params", "fit_calibrator"]

#: Fraction of the log-temperature bound treated as "at the bound".
_BOUND_TOL = 1e-3


def calibrator_params(cal: Any) -> dict:
    """JSON-able fitted parameters of a calibrator (for metrics.json and the report)."""
    out: dict[str, Any] = {}
    for k in ("temperature_", "coef_", "intercept_", "chosen_", "scores_", "n_splits_"):
        if hasattr(cal, k):
            v = getattr(cal, k)
            out[k.rstrip("_")] = v.tolist() if isinstance(v, np.ndarray) else v
    if hasattr(cal, "calibrator_"):
        out["chosen_parameters"] = calibrator_params(cal.calibrator_)
    return out


def _inner(cal: Any) -> Any:
    return getattr(cal, "calibrator_", cal)


def at_bound(cal: Any) -> bool:
    """True for a temperature scaling whose ``log T`` sits at its bound (a degenerate fit)."""
    c = _inner(cal)
    if not isinstance(c, TemperatureScaling):
        return False
    lo, hi = c.log_t_bounds
    lt = math.log(c.temperature_)
    return lt <= lo + _BOUND_TOL * (hi - lo) or lt >= hi - _BOUND_TOL * (hi - lo)


def _cross_validated(method: str, z: np.ndarray, y: np.ndarray, seed: int) -> dict[str, Any] | None:
    counts = np.bincount(y, minlength=z.shape[1])
    present = counts[counts > 0]
    k = int(min(5, present.min())) if len(present) >= 2 else 0
    if k < 2:
        return None
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(z, y)
    p_cal = np.empty_like(z)
    for tr, te in folds:
        p_cal[te] = make_calibrator(method).fit(z[tr], y[tr]).predict_proba(z[te])
    p_raw = softmax(z, axis=1)
    out: dict[str, Any] = {"folds": k, "nll_uncalibrated": nll(p_raw, y), "nll_calibrated": nll(p_cal, y)}
    if z.shape[1] == 2 and len(np.unique(y)) == 2:
        yp = y == 1
        out["slope_uncalibrated"] = calibration_intercept_slope(p_raw[:, 1], yp)[1]
        out["slope_calibrated"] = calibration_intercept_slope(p_cal[:, 1], yp)[1]
    return out


def fit_calibrator(method: str, z: np.ndarray, y: np.ndarray, seed: int) -> tuple[Any, dict[str, Any]]:
    """Fit ``method`` on the calibration split's logits; decline it when degenerate or harmful.

    Args:
        method: A calibrator name other than ``none``.
        z: Calibration logits (N, K).
        y: Calibration labels (N,).
        seed: Seed of the cross-validation folds (and of ``auto``).

    Returns:
        ``(calibrator or None, info)``; ``info`` has ``applied``, ``parameters``, ``cross_validation``
        and, when declined, ``declined`` (the reason) and ``warnings``.
    """
    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    params = {"random_state": int(seed)} if method == "auto" else {}
    cal = make_calibrator(method, **params).fit(z, y)
    applied = getattr(cal, "chosen_", method)
    info: dict[str, Any] = {"applied": applied, "parameters": calibrator_params(cal), "warnings": []}
    if applied == "none":
        return None, info
    if at_bound(cal):
        t = _inner(cal).temperature_
        info["declined"] = (
            f"temperature scaling reached its bound (T = {t:.3g}): the fit is degenerate (it would collapse or "
            "saturate every probability); uncalibrated probabilities are used"
        )
    elif method != "auto":
        cv = _cross_validated(method, z, y, seed)
        info["cross_validation"] = cv
        if cv is not None and cv["nll_calibrated"] > cv["nll_uncalibrated"]:
            info["declined"] = (
                f"{method} made the negative log-likelihood worse on {cv['folds']}-fold cross-validation of the "
                f"calibration split ({cv['nll_calibrated']:.4f} vs {cv['nll_uncalibrated']:.4f} uncalibrated); "
                "uncalibrated probabilities are used"
            )
        elif cv is not None and "slope_calibrated" in cv:
            du, dc = abs(cv["slope_uncalibrated"] - 1), abs(cv["slope_calibrated"] - 1)
            if math.isfinite(dc) and math.isfinite(du) and dc > du:
                info["warnings"].append(
                    f"{method} moved the cross-validated calibration slope further from 1 "
                    f"({cv['slope_calibrated']:.2f} vs {cv['slope_uncalibrated']:.2f} uncalibrated) while "
                    "improving the NLL"
                )
    if "declined" in info:
        info["warnings"].append(f"calibration declined: {info['declined']}")
        info["fitted"] = applied
        info["applied"] = "none"
        return None, info
    return cal, info
