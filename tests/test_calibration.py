"""Tests of the post-hoc calibrators in pipeline.trained.calibration."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.base import clone
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from pipeline.trained.calibration import (
    CALIBRATOR_NAMES,
    AutoCalibrator,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    VectorScaling,
    calibration_warnings,
    make_calibrator,
)


def _synthetic(rng: np.random.Generator, n: int, k: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution, then multiplied by ``scale``.

    ``scale > 1`` makes the model over-confident by exactly a temperature of ``scale``.
    """
    true_logits = rng.normal(size=(n, k)) * 1.5
    p = softmax(true_logits, axis=1)
    u = rng.random(n)[:, None]
    y = (u > np.cumsum(p, axis=1)).sum(axis=1)
    return true_logits * scale, y


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_recovers_known_temperature_and_lowers_nll(rng: np.random.Generator, k: int) -> None:
    z_cal, y_cal = _synthetic(rng, 4000, k, scale=3.0)
    z_test, y_test = _synthetic(rng, 4000, k, scale=3.0)
    ts = TemperatureScaling().fit(z_cal, y_cal)
    assert ts.temperature_ == pytest.approx(3.0, rel=0.12)
    p_raw = softmax(z_test, axis=1)
    p_cal = ts.predict_proba(z_test)
    assert log_loss(y_test, p_cal, labels=range(k)) < log_loss(y_test, p_raw, labels=range(k)) - 0.05
    # The arg-max is unchanged by a single positive temperature; for a binary model so is the ranking
    # (and hence AUROC). For K > 2 the per-class probability ranking may change, only arg-max is kept.
    np.testing.assert_array_equal(p_cal.argmax(1), p_raw.argmax(1))
    if k == 2:
        assert roc_auc_score(y_test, p_cal[:, 1]) == pytest.approx(roc_auc_score(y_test, p_raw[:, 1]))


def test_temperature_scaling_underconfident_model_gets_t_below_one(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 3000, 3, scale=0.4)
    assert TemperatureScaling().fit(z, y).temperature_ == pytest.approx(0.4, rel=0.15)


@pytest.mark.parametrize("name", ["temperature", "vector", "platt", "isotonic"])
@pytest.mark.parametrize("k", [2, 3])
def test_every_method_improves_miscalibrated_model(rng: np.random.Generator, name: str, k: int) -> None:
    z_cal, y_cal = _synthetic(rng, 3000, k, scale=2.5)
    z_test, y_test = _synthetic(rng, 3000, k, scale=2.5)
    cal = make_calibrator(name).fit(z_cal, y_cal)
    p = cal.predict_proba(z_test)
    assert p.shape == (3000, k)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert np.all(p > 0)
    p_raw = softmax(z_test, axis=1)
    assert log_loss(y_test, p, labels=range(k)) < log_loss(y_test, p_raw, labels=range(k))
    if k == 2:
        assert brier_score_loss(y_test, p[:, 1]) < brier_score_loss(y_test, p_raw[:, 1])


def test_platt_binary_is_symmetric_in_columns(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 1000, 2, scale=2.0)
    p = PlattScaling().fit(z, y).predict_proba(z)
    p_swapped = PlattScaling().fit(z[:, ::-1], 1 - y).predict_proba(z[:, ::-1])
    np.testing.assert_allclose(p, p_swapped[:, ::-1], atol=1e-5)


def test_isotonic_is_monotone_in_positive_probability(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 2000, 2, scale=2.0)
    iso = IsotonicCalibration().fit(z, y)
    grid = np.column_stack([np.zeros(200), np.linspace(-8, 8, 200)])
    p1 = iso.predict_proba(grid)[:, 1]
    assert np.all(np.diff(p1) >= -1e-12)
    assert p1.min() >= iso.eps and p1.max() <= 1 - iso.eps


def test_vector_scaling_fits_per_class_parameters(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 3000, 3, scale=1.0)
    z_shifted = z * np.array([2.0, 1.0, 0.5])
    vs = VectorScaling().fit(z_shifted, y)
    # Recovers w ~ (0.5, 1, 2) up to the softmax's invariance to a common shift of the bias.
    np.testing.assert_allclose(vs.coef_, [0.5, 1.0, 2.0], rtol=0.2)


def test_auto_calibrator_records_cv_scores_and_picks_the_minimum(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 1500, 3, scale=3.0)
    auto = AutoCalibrator(random_state=1).fit(z, y)
    assert set(auto.scores_) == {"none", "temperature", "vector", "platt", "isotonic"}
    assert auto.scores_[auto.chosen_] == min(auto.scores_.values())
    assert auto.chosen_ != "none"
    assert auto.scores_["temperature"] < auto.scores_["none"]
    np.testing.assert_allclose(auto.predict_proba(z), auto.calibrator_.predict_proba(z))


def test_auto_calibrator_falls_back_with_too_few_cases() -> None:
    z = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    y = np.array([1, 0, 0])
    auto = AutoCalibrator().fit(z, y)
    assert auto.n_splits_ == 0 and auto.chosen_ == "temperature"


@pytest.mark.parametrize("name", CALIBRATOR_NAMES)
def test_estimator_contract(rng: np.random.Generator, name: str) -> None:
    z, y = _synthetic(rng, 300, 2, scale=2.0)
    est = make_calibrator(name)
    assert not any(k.endswith("_") for k in vars(est))  # __init__ only stores parameters
    with pytest.raises(RuntimeError, match="not fitted"):
        est.predict_proba(z)
    assert est.fit(z, y) is est
    fitted = [k for k in vars(est) if k.endswith("_")]
    assert "n_classes_" in fitted
    cloned = clone(est)
    assert not hasattr(cloned, "n_classes_")


def test_make_calibrator_rejects_unknown_name() -> None:
    with pytest.raises(ValueError) as info:
        make_calibrator("beta")
    msg = str(info.value)
    assert "calibration method" in msg and "'beta'" in msg and "temperature" in msg and "isotonic" in msg


@pytest.mark.parametrize(
    ("logits", "y", "match"),
    [
        (np.zeros((4, 1)), np.zeros(4, int), "K >= 2"),
        (np.zeros(4), np.zeros(4, int), "shape"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), np.array([0, 1]), "finite"),
        (np.zeros((3, 2)), np.array([0, 1, 2]), r"\[0, 1\]"),
        (np.zeros((3, 2)), np.array([0, 1]), "y: expected shape"),
        (np.zeros((2, 2)), np.array([0.5, 1.0]), "integer"),
    ],
)
def test_fit_validates_input(logits: np.ndarray, y: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TemperatureScaling().fit(logits, y)


def test_predict_rejects_wrong_number_of_classes(rng: np.random.Generator) -> None:
    z, y = _synthetic(rng, 100, 3, scale=1.0)
    ts = TemperatureScaling().fit(z, y)
    with pytest.raises(ValueError, match="expected 3 columns"):
        ts.predict_proba(np.zeros((5, 2)))


def test_calibration_warnings() -> None:
    assert calibration_warnings("temperature", 5000, 2, alpha=0.1) == []
    assert any("isotonic" in w for w in calibration_warnings("isotonic", 150, 2))
    assert not any("isotonic" in w for w in calibration_warnings("isotonic", 500, 2))
    assert any("vector" in w for w in calibration_warnings("vector", 200, 8))
    conf = calibration_warnings("temperature", 18, 2, alpha=0.05)
    assert any("at least 19" in w for w in conf)
    assert not any("conformal" in w for w in calibration_warnings("temperature", 19, 2, alpha=0.05))
    assert any("no calibration split" in w for w in calibration_warnings("temperature", 0, 2))
