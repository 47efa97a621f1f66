"""The reported form of a number and its intervals: ``value_ci``, the Wilson score interval of a
proportion and the bias-shifted bootstrap percentile interval of binned calibration errors.

The CI methods and conventions are described in :mod:`pipeline.evaluate.metrics`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import binomtest

from pipeline.evaluate.bootstrap import percentile_ci


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


