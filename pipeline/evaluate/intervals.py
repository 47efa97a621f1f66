"""The reported form of a number and its intervals: ``value_ci``, the Wilson score interval of a
proportion (independent or patient-clustered cases) and the test-inversion interval of a non-negative
error (binned calibration errors).

The CI methods and conventions are described in :mod:`pipeline.evaluate.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.stats import binomtest


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


def cluster_wilson_ci(
    num: np.ndarray, den: np.ndarray, clusters: np.ndarray, level: float = 0.95
) -> tuple[float, float, dict[str, float]]:
    """Wilson interval of a proportion from clustered cases, on the design-effect sample size.

    ``p = sum(num) / sum(den)`` over cases (``den`` 1 where the case counts in the denominator, ``num`` 1
    where it also counts in the numerator, e.g. for sensitivity ``den`` = positive, ``num`` = positive
    and predicted positive). The cluster-robust (ratio-estimator) variance
    ``G/(G-1) sum_c (x_c - p m_c)^2 / n^2`` over the ``G`` clusters with cases in the denominator gives
    the design effect ``deff = var / (p(1-p)/n)`` (at least 1); the Wilson score interval is taken on
    ``n / deff`` cases with a t quantile on ``G - 1`` degrees of freedom (Korn & Graubard 1998, Surv
    Methodol 24:193-201, who use the same effective sample size and degrees-of-freedom adjustment with
    Clopper-Pearson; the Wilson form matches the interval of independent cases, which it equals when every
    cluster has one case and ``G`` is large). Why not the cluster bootstrap: its expanded percentile
    interval covered 92.0-92.6% at a nominal 95% for sensitivity and specificity with patient clusters in
    ``bench/coverage.py`` (BENCHMARKS.md). scipy and statsmodels offer the Wilson interval for independent
    cases only, hence these lines.

    Returns:
        ``(lo, hi, info)``, ``info`` = ``{"n": cases in the denominator, "clusters": G, "deff": ...}``;
        ``(nan, nan, ...)`` when no case is in the denominator.
    """
    from scipy.stats import t as t_dist

    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    _, codes = np.unique(np.asarray(clusters), return_inverse=True)
    x_c = np.bincount(codes.reshape(-1), weights=num * den)
    m_c = np.bincount(codes.reshape(-1), weights=den)
    n = float(m_c.sum())
    g = int(np.sum(m_c > 0))
    if n <= 0:
        return float("nan"), float("nan"), {"n": 0, "clusters": 0, "deff": float("nan")}
    p = float(x_c.sum()) / n
    deff = 1.0
    if g >= 2 and 0.0 < p < 1.0:
        var = g / (g - 1) * float(np.sum((x_c - p * m_c) ** 2)) / n**2
        deff = max(1.0, var / (p * (1.0 - p) / n))
    n_eff = n / deff
    q = float(t_dist.ppf(0.5 + level / 2.0, max(1, g - 1)))
    centre = (p + q * q / (2 * n_eff)) / (1 + q * q / n_eff)
    half = q / (1 + q * q / n_eff) * math.sqrt(p * (1 - p) / n_eff + q * q / (4 * n_eff**2))
    info = {"n": int(round(n)), "clusters": g, "deff": round(deff, 4)}
    return max(0.0, centre - half), min(1.0, centre + half), info


def inverted_ci(
    observed: np.ndarray,
    world: Callable[[float], tuple[np.ndarray, np.ndarray]],
    level: float = 0.95,
    step: float = 0.25,
    u_max: float = 64.0,
) -> list[tuple[float, float]]:
    """Confidence intervals of non-negative parameters by inverting tests along a family of null worlds.

    ``world(u)`` for ``u >= 0`` returns ``(theta_u, samples_u)`` for M statistics at once: the parameter
    values of a simulated world, shape (M,) (``theta_0 = 0``, increasing in ``u``), and draws of the
    statistics in that world, shape (B, M). The interval of statistic m is ``{theta_u : observed[m] lies
    in the acceptance region of world u}`` (a Neyman construction), where the region is the central
    ``level`` part of the draws split ``s : (1 - s)`` between the lower and upper tail, with
    ``s = 0.5 * min(1, theta_u / m_0)`` and ``m_0`` the median statistic of the perfect world ``u = 0``:

    * at ``theta = 0`` the test is one-sided (``s = 0``): no parameter lies below 0, so a small observed
      error is no evidence against ``theta = 0``. The lower bound is exactly 0 whenever the data are
      consistent with a perfect model at level ``1 - level``, so a perfect model is covered with
      probability ``level`` (an equal-tailed test would give ``1 - (1 - level) / 2``);
    * from ``theta >= m_0`` (an error as large as a perfect model's typical error) the test is the usual
      equal-tailed one; the ramp in between keeps the interval from collapsing to ``[0, 0]`` when the
      observed error is unusually small.

    Worlds are evaluated on the grid ``u = 0, step, 2 step, ...`` (steps double beyond ``u = 4``) until
    every observed value lies below its acceptance region; a bound between two grid worlds is
    interpolated linearly (quantile and ``theta`` curves are smooth in ``u`` when the worlds share their
    random draws).

    Returns:
        One ``(lower, upper)`` per statistic; ``(nan, nan)`` for a non-finite observed value. When even
        ``u_max`` cannot place the observed value below the region, the upper bound is ``theta(u_max)``.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a confidence level in (0, 1), got {level!r}")
    obs = np.atleast_1d(np.asarray(observed, dtype=np.float64))
    a = 1.0 - level
    thetas, lows, highs = [], [], []
    u, m0 = 0.0, None
    while True:
        theta, samples = world(u)
        theta = np.atleast_1d(np.asarray(theta, dtype=np.float64))
        samples = np.asarray(samples, dtype=np.float64).reshape(len(samples), -1)
        if m0 is None:
            m0 = np.median(samples, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(m0 > 0, 0.5 * np.minimum(1.0, theta / np.where(m0 > 0, m0, 1.0)), 0.5)
        lo = np.array([np.quantile(samples[:, m], a * s[m]) for m in range(len(obs))])
        hi = np.array([np.quantile(samples[:, m], 1.0 - a * (1.0 - s[m])) for m in range(len(obs))])
        thetas.append(theta)
        lows.append(lo)
        highs.append(hi)
        if np.all((lo > obs) | ~np.isfinite(obs)) or u >= u_max:
            break
        u += step if u < 4.0 else u / 2
    th, lo_q, hi_q = np.array(thetas), np.array(lows), np.array(highs)
    return [_invert_one(float(obs[m]), th[:, m], lo_q[:, m], hi_q[:, m]) for m in range(len(obs))]


def _crossing(x: float, curve: np.ndarray, values: np.ndarray, k: int) -> float:
    """``values`` interpolated where ``curve`` passes ``x`` between grid points ``k - 1`` and ``k``."""
    c0, c1 = curve[k - 1], curve[k]
    f = 0.0 if c1 == c0 else min(1.0, max(0.0, (x - c0) / (c1 - c0)))
    return float(values[k - 1] + f * (values[k] - values[k - 1]))


def _invert_one(obs: float, theta: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    if not math.isfinite(obs):
        return float("nan"), float("nan")
    ok_hi = obs <= hi  # the region reaches up to the observed value
    ok_lo = obs >= lo  # ... and down to it
    if ok_hi[0]:
        lower = 0.0
    elif ok_hi.any():
        k = int(np.argmax(ok_hi))
        lower = _crossing(obs, hi, theta, k)
    else:
        return float(theta[-1]), float(theta[-1])
    if not ok_lo[0]:
        return lower, lower
    if ok_lo.all():
        return lower, float(theta[-1])
    k = int(np.argmax(~ok_lo))
    return lower, max(lower, _crossing(obs, lo, theta, k))
