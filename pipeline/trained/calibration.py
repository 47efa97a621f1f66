"""Post-hoc probability calibration of classifier logits.

Every calibrator follows scikit-learn's estimator contract: ``__init__`` only stores parameters,
``fit(logits, y)`` validates its input and returns ``self``, fitted attributes end in ``_`` and
``predict_proba(logits)`` returns calibrated probabilities.

Axis order at every boundary: ``logits`` is ``(N, K)`` (cases, classes) with ``K >= 2`` (a binary model
has two columns); ``y`` is ``(N,)`` integer class indices in ``[0, K)``; probabilities are ``(N, K)`` with
rows summing to one.

Methods:
    * ``none``: softmax of the logits.
    * ``temperature``: one scalar ``T`` (Guo et al. 2017), ``softmax(z / T)``, fitted by minimising the
      negative log-likelihood (NLL) over ``log T`` with L-BFGS-B.
    * ``vector``: one scale and one bias per class, ``softmax(w * z + b)`` (Guo et al. 2017).
    * ``platt``: logistic regression on the log-odds (Platt 1999, with Platt's smoothed targets); binary
      models use ``z[:, 1] - z[:, 0]``; multi-class models fit one-vs-rest log-odds per class and
      renormalise the rows (as scikit-learn's ``CalibratedClassifierCV`` does).
    * ``isotonic``: scikit-learn ``IsotonicRegression`` on the class probability, one-vs-rest and
      renormalised for multi-class; outputs are clipped to ``[eps, 1 - eps]`` so that NLL stays finite.
    * ``auto``: picks among the above by stratified cross-validated NLL on the calibration split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, logsumexp, softmax
from sklearn.base import BaseEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

__all__ = [
    "CALIBRATOR_NAMES",
    "AutoCalibrator",
    "IdentityCalibrator",
    "IsotonicCalibration",
    "PlattScaling",
    "TemperatureScaling",
    "VectorScaling",
    "calibration_warnings",
    "calibrator_from_state",
    "calibrator_state",
    "check_logits_labels",
    "make_calibrator",
    "nll_from_logprobs",
]

CALIBRATOR_NAMES: tuple[str, ...] = ("none", "temperature", "vector", "platt", "isotonic", "auto")

#: Below this many calibration cases isotonic regression overfits (Niculescu-Mizil & Caruana 2005).
ISOTONIC_MIN_CASES = 200
#: Vector scaling fits 2K parameters; below this many calibration cases per class it tends to overfit.
VECTOR_MIN_PER_CLASS = 50
#: Below this many calibration cases any fitted calibrator is very noisy.
MIN_CAL_CASES = 30


def check_logits_labels(
    logits: Any, y: Any | None = None, name: str = "logits", n_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate and convert logits ``(N, K)`` and labels ``(N,)``.

    Args:
        logits: Array-like of shape (N, K), K >= 2, finite values.
        y: Optional array-like of shape (N,) with integer class indices in [0, K).
        name: Argument name used in error messages.
        n_classes: If given, the number of columns that ``logits`` must have.

    Returns:
        ``(logits, y)`` as float64 and int64 arrays (``y`` is ``None`` when not given).

    Raises:
        ValueError: If a shape, dtype or value is not as expected.
    """
    try:
        z = np.asarray(logits, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a numeric array of shape (N, K), got {type(logits)!r}") from err
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(
            f"{name}: expected shape (N, K) with K >= 2 (binary = 2 columns), got shape {z.shape}"
        )
    if z.shape[0] == 0:
        raise ValueError(f"{name}: expected at least one case (row), got shape {z.shape}")
    if n_classes is not None and z.shape[1] != n_classes:
        raise ValueError(f"{name}: expected {n_classes} columns (fitted classes), got {z.shape[1]}")
    if not np.all(np.isfinite(z)):
        bad = int(np.sum(~np.isfinite(z)))
        raise ValueError(f"{name}: expected finite values, found {bad} NaN/inf entries")
    if y is None:
        return z, None
    y_arr = np.asarray(y)
    if y_arr.ndim != 1 or y_arr.shape[0] != z.shape[0]:
        raise ValueError(f"y: expected shape ({z.shape[0]},) matching {name}, got shape {y_arr.shape}")
    if y_arr.dtype.kind not in "iub":
        if y_arr.dtype.kind == "f" and np.all(np.isfinite(y_arr)) and np.all(y_arr == np.round(y_arr)):
            y_arr = y_arr.astype(np.int64)
        else:
            raise ValueError(f"y: expected integer class indices, got dtype {y_arr.dtype}")
    y_arr = y_arr.astype(np.int64)
    if y_arr.min() < 0 or y_arr.max() >= z.shape[1]:
        raise ValueError(
            f"y: expected class indices in [0, {z.shape[1] - 1}], got range [{y_arr.min()}, {y_arr.max()}]"
        )
    return z, y_arr


def nll_from_logprobs(logp: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood from log-probabilities ``(N, K)`` and labels ``(N,)``."""
    return float(-np.mean(logp[np.arange(len(y)), y]))


class _BaseCalibrator(BaseEstimator):
    """Bookkeeping shared by every calibrator; subclasses implement ``_fit`` and ``_predict_proba``."""

    def fit(self, logits: Any, y: Any) -> _BaseCalibrator:
        """Fit the calibrator.

        Args:
            logits: Uncalibrated logits, shape (N, K) (cases, classes), K >= 2.
            y: Integer class indices, shape (N,).

        Returns:
            self
        """
        z, y_arr = check_logits_labels(logits, y)
        self.n_classes_ = z.shape[1]
        self.n_fit_ = z.shape[0]
        self._fit(z, y_arr)
        return self

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities.

        Args:
            logits: Uncalibrated logits, shape (N, K).

        Returns:
            Probabilities of shape (N, K) (cases, classes); rows sum to one.
        """
        if not hasattr(self, "n_classes_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted yet: call fit(logits, y) first")
        z, _ = check_logits_labels(logits, n_classes=self.n_classes_)
        p = self._predict_proba(z)
        return p / p.sum(axis=1, keepdims=True)

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class IdentityCalibrator(_BaseCalibrator):
    """No calibration: ``softmax(logits)``."""

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        pass

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        return softmax(z, axis=1)


class TemperatureScaling(_BaseCalibrator):
    """Temperature scaling (Guo et al. 2017): ``softmax(logits / T)`` with one scalar ``T > 0``.

    ``T`` is fitted by minimising the NLL over ``log T`` with L-BFGS-B (analytic gradient), bounded to
    ``[log_t_bounds]``. Temperature scaling never changes a case's arg-max (accuracy is unchanged). For a
    binary model it is monotone in ``z1 - z0``, so the binary AUROC is unchanged too; with more than two
    classes the ranking of cases in one class's column can change, and so can one-vs-rest AUROCs.

    Args:
        log_t_bounds: Bounds on ``log T``.
    """

    def __init__(self, log_t_bounds: tuple[float, float] = (-5.0, 5.0)) -> None:
        self.log_t_bounds = log_t_bounds

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        n = len(y)
        onehot = np.zeros_like(z)
        onehot[np.arange(n), y] = 1.0

        def loss(t: np.ndarray) -> tuple[float, np.ndarray]:
            s = z * math.exp(-float(t[0]))
            logp = log_softmax(s, axis=1)
            value = -np.sum(logp * onehot) / n
            grad = np.sum((np.exp(logp) - onehot) * (-s)) / n
            return float(value), np.array([grad])

        res = minimize(loss, x0=np.zeros(1), jac=True, method="L-BFGS-B", bounds=[self.log_t_bounds])
        self.temperature_ = float(math.exp(res.x[0]))
        self.converged_ = bool(res.success)

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        return softmax(z / self.temperature_, axis=1)


class VectorScaling(_BaseCalibrator):
    """Vector scaling (Guo et al. 2017): ``softmax(w * logits + b)`` with per-class ``w`` and ``b``.

    Fitted by L-BFGS on the NLL plus ``reg * (||w - 1||^2 + ||b||^2)`` (a weak pull towards the identity
    that keeps the problem well posed when a class is rare or separable).

    Args:
        reg: L2 penalty strength towards ``w = 1, b = 0``.
        max_iter: Maximum L-BFGS iterations.
    """

    def __init__(self, reg: float = 1e-4, max_iter: int = 500) -> None:
        self.reg = reg
        self.max_iter = max_iter

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        n, k = z.shape
        onehot = np.zeros_like(z)
        onehot[np.arange(n), y] = 1.0

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w, b = theta[:k], theta[k:]
            s = z * w + b
            logp = log_softmax(s, axis=1)
            value = -np.sum(logp * onehot) / n + self.reg * (np.sum((w - 1) ** 2) + np.sum(b**2))
            d = (np.exp(logp) - onehot) / n
            gw = np.sum(d * z, axis=0) + 2 * self.reg * (w - 1)
            gb = np.sum(d, axis=0) + 2 * self.reg * b
            return float(value), np.concatenate([gw, gb])

        theta0 = np.concatenate([np.ones(k), np.zeros(k)])
        res = minimize(loss, theta0, jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.coef_ = res.x[:k].copy()
        self.intercept_ = res.x[k:].copy()
        self.converged_ = bool(res.success)

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        return softmax(z * self.coef_ + self.intercept_, axis=1)


def _ovr_log_odds(z: np.ndarray) -> np.ndarray:
    """One-vs-rest log-odds of each class under softmax: ``z_k - logsumexp(z_{-k})``, shape (N, K)."""
    n, k = z.shape
    out = np.empty_like(z)
    for j in range(k):
        rest = np.delete(z, j, axis=1)
        out[:, j] = z[:, j] - logsumexp(rest, axis=1)
    return out


def _fit_sigmoid(f: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Platt's sigmoid ``P(t=1|f) = expit(a * f + b)`` with Platt's smoothed targets.

    Args:
        f: Scores (log-odds), shape (N,).
        t: Binary targets, shape (N,).

    Returns:
        ``(a, b)``.
    """
    n_pos = float(np.sum(t))
    n_neg = float(len(t) - n_pos)
    hi = (n_pos + 1.0) / (n_pos + 2.0)
    lo = 1.0 / (n_neg + 2.0)
    target = np.where(t > 0, hi, lo)

    def loss(ab: np.ndarray) -> tuple[float, np.ndarray]:
        u = ab[0] * f + ab[1]
        # -[t log s(u) + (1-t) log(1-s(u))] = logaddexp(0, u) - t*u
        value = np.sum(np.logaddexp(0.0, u) - target * u)
        d = expit(u) - target
        return float(value), np.array([np.sum(d * f), np.sum(d)])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


class PlattScaling(_BaseCalibrator):
    """Platt scaling: a logistic regression on the model's log-odds.

    Binary (K = 2): ``p1 = expit(a * (z1 - z0) + b)``, ``p0 = 1 - p1``; which column is "positive" does
    not matter, the fit is symmetric. Multi-class: one sigmoid per class on the one-vs-rest log-odds
    ``z_k - logsumexp(z_{-k})``, then rows are renormalised to sum to one.
    """

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        k = z.shape[1]
        if k == 2:
            a, b = _fit_sigmoid(z[:, 1] - z[:, 0], (y == 1).astype(float))
            self.coef_ = np.array([a])
            self.intercept_ = np.array([b])
        else:
            f = _ovr_log_odds(z)
            params = [_fit_sigmoid(f[:, j], (y == j).astype(float)) for j in range(k)]
            self.coef_ = np.array([p[0] for p in params])
            self.intercept_ = np.array([p[1] for p in params])

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        if z.shape[1] == 2:
            p1 = expit(self.coef_[0] * (z[:, 1] - z[:, 0]) + self.intercept_[0])
            return np.column_stack([1.0 - p1, p1])
        p = expit(_ovr_log_odds(z) * self.coef_ + self.intercept_)
        return np.clip(p, 1e-12, None)


class IsotonicCalibration(_BaseCalibrator):
    """Isotonic regression calibration (Zadrozny & Elkan 2002) with scikit-learn ``IsotonicRegression``.

    Binary: a monotone map of the class-1 probability. Multi-class: one map per class on its softmax
    probability (one-vs-rest), rows renormalised. Outputs are clipped to ``[eps, 1 - eps]`` before
    renormalising, so a case never gets probability exactly 0 (which would make the NLL infinite).
    Needs a few hundred calibration cases to be reliable.

    Args:
        eps: Clipping margin for the per-class outputs.
    """

    def __init__(self, eps: float = 1e-4) -> None:
        self.eps = eps

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        p = softmax(z, axis=1)
        cols = [1] if z.shape[1] == 2 else list(range(z.shape[1]))
        self.isotonic_ = []
        for j in cols:
            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
            iso.fit(p[:, j], (y == j).astype(float))
            self.isotonic_.append(iso)

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        p = softmax(z, axis=1)
        if z.shape[1] == 2:
            p1 = np.clip(self.isotonic_[0].predict(p[:, 1]), self.eps, 1.0 - self.eps)
            return np.column_stack([1.0 - p1, p1])
        out = np.column_stack([iso.predict(p[:, j]) for j, iso in enumerate(self.isotonic_)])
        return np.clip(out, self.eps, 1.0 - self.eps)


class AutoCalibrator(_BaseCalibrator):
    """Choose a calibrator by stratified cross-validated NLL on the calibration split.

    For each candidate, out-of-fold probabilities are computed with ``n_splits``-fold stratified CV
    (fewer folds when the rarest class has fewer cases); the candidate with the lowest mean out-of-fold
    NLL wins (ties go to the earlier, simpler candidate) and is refitted on all cases.

    Args:
        candidates: Method names to compare (see ``make_calibrator``; "auto" is not allowed).
        n_splits: Number of CV folds (at most).
        random_state: Seed for the fold shuffling.

    Attributes:
        chosen_: Name of the winning method.
        scores_: Mean out-of-fold NLL per candidate (``nan`` if a candidate failed).
        calibrator_: The winning calibrator refitted on all cases.
        n_splits_: Number of folds actually used (0 when too few cases: then "temperature" is used).
    """

    def __init__(
        self,
        candidates: Sequence[str] = ("none", "temperature", "vector", "platt", "isotonic"),
        n_splits: int = 5,
        random_state: int = 0,
    ) -> None:
        self.candidates = candidates
        self.n_splits = n_splits
        self.random_state = random_state

    def _fit(self, z: np.ndarray, y: np.ndarray) -> None:
        cands = list(self.candidates)
        if not cands or "auto" in cands:
            raise ValueError(f"candidates: expected non-empty names other than 'auto', got {cands!r}")
        counts = np.bincount(y, minlength=z.shape[1])
        present = counts[counts > 0]
        n_splits = int(min(self.n_splits, present.min())) if len(present) >= 2 else 0
        self.scores_: dict[str, float] = {}
        if n_splits < 2:
            # Too few cases of some class to cross-validate: fall back to the one-parameter method.
            self.n_splits_ = 0
            self.chosen_ = "temperature"
            self.scores_ = {c: float("nan") for c in cands}
        else:
            self.n_splits_ = n_splits
            skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=self.random_state)
            folds = list(skf.split(z, y))
            for name in cands:
                logp = np.empty_like(z)
                try:
                    for tr, te in folds:
                        cal = make_calibrator(name).fit(z[tr], y[tr])
                        logp[te] = np.log(np.clip(cal.predict_proba(z[te]), 1e-15, None))
                    self.scores_[name] = nll_from_logprobs(logp, y)
                except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                    self.scores_[name] = float("nan")
            finite = {k: v for k, v in self.scores_.items() if math.isfinite(v)}
            self.chosen_ = min(finite, key=lambda k: (finite[k], cands.index(k))) if finite else "temperature"
        self.calibrator_ = make_calibrator(self.chosen_).fit(z, y)

    def _predict_proba(self, z: np.ndarray) -> np.ndarray:
        return self.calibrator_.predict_proba(z)


_REGISTRY: dict[str, type[_BaseCalibrator]] = {
    "none": IdentityCalibrator,
    "temperature": TemperatureScaling,
    "vector": VectorScaling,
    "platt": PlattScaling,
    "isotonic": IsotonicCalibration,
    "auto": AutoCalibrator,
}


def make_calibrator(name: str, **params: Any) -> _BaseCalibrator:
    """Create an unfitted calibrator by name.

    Args:
        name: One of ``CALIBRATOR_NAMES``.
        **params: Passed to the calibrator's ``__init__``.

    Raises:
        ValueError: If ``name`` is unknown.
    """
    try:
        cls = _REGISTRY[name]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"calibration method: got {name!r}, expected one of {', '.join(CALIBRATOR_NAMES)}"
        ) from err
    return cls(**params)


def calibration_warnings(method: str, n_cal: int, n_classes: int, alpha: float | None = None) -> list[str]:
    """Human-readable warnings about a calibration set-up that is likely to be unreliable.

    Args:
        method: Calibration method name (see ``make_calibrator``).
        n_cal: Number of cases in the calibration split (0 when it is absent).
        n_classes: Number of classes K.
        alpha: Conformal miscoverage level, if conformal sets are built on the same split.

    Returns:
        A (possibly empty) list of warning strings.
    """
    out: list[str] = []
    if n_cal <= 0:
        out.append(
            "no calibration split: probabilities are uncalibrated softmax outputs and no conformal "
            "sets can be built"
        )
        return out
    if method != "none" and n_cal < MIN_CAL_CASES:
        out.append(
            f"calibration split has only {n_cal} cases (< {MIN_CAL_CASES}): the fitted calibrator "
            "is very noisy"
        )
    if method in ("isotonic", "auto") and n_cal < ISOTONIC_MIN_CASES:
        out.append(
            f"isotonic calibration on {n_cal} cases (< ~{ISOTONIC_MIN_CASES}) tends to overfit; "
            "prefer temperature or Platt scaling"
        )
    if method in ("vector", "auto") and n_cal < VECTOR_MIN_PER_CLASS * n_classes:
        out.append(
            f"vector scaling fits {2 * n_classes} parameters on {n_cal} cases "
            f"({n_cal / n_classes:.0f} per class, < {VECTOR_MIN_PER_CLASS}): likely to overfit"
        )
    if alpha is not None:
        need = math.ceil(1.0 / alpha - 1.0 - 1e-9)
        if n_cal < need:
            out.append(
                f"conformal prediction at alpha={alpha:g} needs at least {need} calibration cases "
                f"(1/alpha - 1), got {n_cal}: every prediction set will contain all classes"
            )
    return out


# ------------------------------------------------------------------------------ saving a fitted calibrator
_NAMES = {cls: name for name, cls in _REGISTRY.items()}


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"__array__": v.astype(np.float64).tolist()}
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def _unplain(v: Any) -> Any:
    return np.asarray(v["__array__"], dtype=np.float64) if isinstance(v, dict) and "__array__" in v else v


def calibrator_state(cal: _BaseCalibrator) -> dict[str, Any]:
    """A fitted calibrator as plain JSON data (no pickle): method, parameters and fitted attributes.

    :func:`calibrator_from_state` rebuilds a calibrator whose ``predict_proba`` is identical, so the
    calibrator fitted in Evaluate is the one predict, promotion and export use (never refitted).
    Isotonic maps are stored as their thresholds (``X_thresholds_``, ``y_thresholds_``): refitting
    scikit-learn's ``IsotonicRegression`` on its own thresholds reproduces the same piecewise-linear map.
    """
    if getattr(cal, "method", None) == "multilabel":  # per-finding calibrators (pipeline/trained/multilabel.py)
        return cal.state()
    if not hasattr(cal, "n_classes_"):
        raise ValueError(f"{type(cal).__name__} is not fitted: nothing to save")
    fitted: dict[str, Any] = {}
    for k, v in vars(cal).items():
        if not k.endswith("_") or k.startswith("_"):
            continue
        if k == "isotonic_":
            fitted[k] = [
                {"x": _plain(np.asarray(i.X_thresholds_)), "y": _plain(np.asarray(i.y_thresholds_))} for i in v
            ]
        elif k == "calibrator_":
            fitted[k] = calibrator_state(v)
        else:
            fitted[k] = {kk: _plain(vv) for kk, vv in v.items()} if isinstance(v, dict) else _plain(v)
    params = {k: _plain(v) for k, v in cal.get_params().items()}
    return {"method": _NAMES[type(cal)], "params": params, "fitted": fitted}


def calibrator_from_state(state: dict[str, Any]) -> _BaseCalibrator:
    """Rebuild a fitted calibrator saved by :func:`calibrator_state`.

    Raises:
        ValueError: Unknown method or missing fitted attributes (names the field).
    """
    method = state.get("method")
    if method == "multilabel":
        from pipeline.trained.multilabel import MultilabelCalibrator

        return MultilabelCalibrator.from_state(state)
    params = dict(state.get("params") or {})
    if "log_t_bounds" in params:
        params["log_t_bounds"] = tuple(params["log_t_bounds"])
    if "candidates" in params:
        params["candidates"] = tuple(params["candidates"])
    cal = make_calibrator(method, **params)
    fitted = state.get("fitted") or {}
    if "n_classes_" not in fitted:
        raise ValueError(f"calibrator state for {method!r}: 'fitted.n_classes_' is missing; expected a fitted calibrator")
    for k, v in fitted.items():
        if k == "isotonic_":
            maps = []
            for m in v:
                iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
                maps.append(iso.fit(_unplain(m["x"]), _unplain(m["y"])))
            setattr(cal, k, maps)
        elif k == "calibrator_":
            setattr(cal, k, calibrator_from_state(v))
        elif isinstance(v, dict) and "__array__" not in v:
            setattr(cal, k, {kk: _unplain(vv) for kk, vv in v.items()})
        else:
            setattr(cal, k, _unplain(v))
    return cal
