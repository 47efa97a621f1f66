"""The calibration guard: degenerate or harmful calibrators are declined, on the calibration split only."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.calibrate import at_bound, fit_calibrator
from pipeline.evaluate.summary import EvalOptions, SplitPredictions, TaskInfo, evaluate_run


def _split(z: np.ndarray, y: np.ndarray) -> SplitPredictions:
    n = len(y)
    return SplitPredictions(z, y, np.array([f"P{i}" for i in range(n)]), np.array([f"C{i}" for i in range(n)]))


def test_overconfident_model_is_calibrated_and_kept() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 600)
    z = np.stack([np.zeros(600), 6.0 * (y - 0.5) + rng.normal(0, 3, 600)], 1)  # too sharp logits
    cal, info = fit_calibrator("temperature", z, y, seed=0)
    assert cal is not None and info["applied"] == "temperature" and "declined" not in info
    cv = info["cross_validation"]
    assert cv["nll_calibrated"] < cv["nll_uncalibrated"]


def _uninformative(n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    # labels unrelated to confident logits: the NLL-optimal temperature is infinite (T -> e^5, the bound)
    y = np.array([0, 1] * (n // 2))
    s = np.tile([4.0, 4.0, -4.0, -4.0], n // 4)  # each class: half +4, half -4
    return np.stack([np.zeros(n), s], 1), y


def test_degenerate_temperature_hits_the_bound_and_is_declined() -> None:
    z, y = _uninformative()
    cal, info = fit_calibrator("temperature", z, y, seed=0)
    assert info["parameters"]["temperature"] == pytest.approx(np.exp(5.0), rel=1e-3)
    assert cal is None and info["applied"] == "none" and info["fitted"] == "temperature"
    assert "bound" in info["declined"] and any("declined" in w for w in info["warnings"])


def test_harmful_calibrator_is_declined_by_cross_validation() -> None:
    # already well calibrated logits: isotonic on few cases overfits and worsens the out-of-fold NLL
    rng = np.random.default_rng(3)
    n = 40
    s = rng.normal(0, 1.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(int)
    z = np.stack([np.zeros(n), s], 1)
    cal, info = fit_calibrator("isotonic", z, y, seed=0)
    cv = info["cross_validation"]
    assert cv["nll_calibrated"] > cv["nll_uncalibrated"]
    assert cal is None and "cross-validation" in info["declined"]


def test_evaluate_run_reports_the_declined_calibrator() -> None:
    z, y = _uninformative()
    rng = np.random.default_rng(1)
    yt = rng.integers(0, 2, 100)
    zt = np.stack([np.zeros(100), 2.0 * (yt - 0.5) + rng.normal(0, 1, 100)], 1)
    res = evaluate_run(
        {"calibration": _split(z, y), "test": _split(zt, yt)},
        TaskInfo("binary", ["a", "b"], 1),
        EvalOptions(calibration="temperature", n_bootstrap=200),
        seed=0,
    )
    cal = res.metrics["calibration"]
    assert res.calibrator is None and cal["applied"] == "none" and "bound" in cal["declined"]
    assert res.metrics["evaluation"]["test"]["primary"] == "uncalibrated"
    np.testing.assert_allclose(res.calibrated["test"].sum(1), 1.0)


@pytest.mark.parametrize("t", [np.exp(5.0), np.exp(-5.0)])
def test_at_bound(t: float) -> None:
    from pipeline.trained.calibration import TemperatureScaling

    c = TemperatureScaling()
    c.temperature_ = float(t)
    assert at_bound(c)
    c.temperature_ = 1.3
    assert not at_bound(c)
