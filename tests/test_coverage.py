"""Quick version of bench/coverage.py: the ECE interval holds the population ECE, the old one did not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate.calibration_metrics import _binned_stat, binned_error_ci, ece
from pipeline.stats.bootstrap import Bootstrap, percentile_ci

# loaded by path under its own name: ``coverage`` is also the name of coverage.py (pytest-cov)
_spec = importlib.util.spec_from_file_location(
    "bench_coverage", Path(__file__).resolve().parents[1] / "bench" / "coverage.py"
)
cov = importlib.util.module_from_spec(_spec)
sys.modules["bench_coverage"] = cov  # dataclasses look their module up
_spec.loader.exec_module(cov)


def _old_bias_shifted(conf: np.ndarray, correct: np.ndarray, bs: Bootstrap) -> tuple[float, float]:
    """The interval this change replaced: bootstrap percentile interval shifted by the bootstrap bias."""
    stat = _binned_stat(conf, correct, cov.N_BINS, "uniform")
    samples = bs.run({"b": stat})["b"][:, 0]
    point = float(stat(np.ones((1, len(conf))))[0, 0])
    lo, hi = percentile_ci(samples, bs.ci_level)
    bias = float(np.mean(samples)) - point
    return max(0.0, lo - bias), max(0.0, hi - bias)


def _coverage(sc: cov.Scenario, reps: int, seed: int) -> tuple[float, float]:
    truth = cov.population(sc)["ece"]
    new = old = 0
    for r in range(reps):
        q, y, patient = cov.draw(sc, sc.n, np.random.default_rng([seed, r]))
        bs = Bootstrap(sc.n, 300, seed=r, clusters=patient)
        lo, hi = binned_error_ci(q, y.astype(np.float64), bs, cov.N_BINS)["ece"]
        new += lo - 1e-12 <= truth <= hi + 1e-12
        lo, hi = _old_bias_shifted(q, y.astype(np.float64), bs)
        old += lo - 1e-12 <= truth <= hi + 1e-12
    return new / reps, old / reps


def test_population_values_match_a_large_sample() -> None:
    sc = cov.Scenario("over", 150, 0.2, 1.8, 0.0, 1.8, clustered=True)
    truth = cov.population(sc)
    q, y, patient = cov.draw(sc, 400_000, np.random.default_rng(0))
    assert len(np.unique(patient)) < 0.6 * len(q)  # clustered: about 2 images per patient
    assert y.mean() == pytest.approx(sc.prevalence, abs=0.005)
    assert ece(q, y) == pytest.approx(truth["ece"], abs=0.004)
    assert np.mean((q >= 0.5)[y == 1]) == pytest.approx(truth["sensitivity"], abs=0.01)
    well = cov.population(cov.Scenario("well", 150, 0.3, 1.8, 0.0, 1.0, clustered=False))
    assert well["ece"] == pytest.approx(0.0, abs=1e-9) and well["calibration_slope"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "sc",
    [
        cov.Scenario("well", 150, 0.3, 1.8, 0.0, 1.0, clustered=False),
        cov.Scenario("under", 150, 0.3, 1.8, 0.3, 0.6, clustered=True),
    ],
    ids=lambda s: s.name,
)
def test_ece_interval_covers_where_the_bias_shifted_interval_did_not(sc: cov.Scenario) -> None:
    new, old = _coverage(sc, reps=80, seed=11)
    # 80 replicates: a 95% interval covers at least 85% of them except with probability < 0.1%
    assert new >= 0.85, f"new ECE interval covered {new:.2f}"
    assert old < 0.85, f"bias-shifted interval covered {old:.2f}"


def _world_draws(monkeypatch: pytest.MonkeyPatch, conf: np.ndarray, y: np.ndarray, bs: Bootstrap):
    """The perfect world's (u = 0) simulated ECEs and the resample sizes of ``binned_error_ci``."""
    import pipeline.evaluate.calibration_metrics as cm

    seen = {}

    def spy(observed, world, level):
        seen["theta"], seen["samples"] = world(0.0)
        return [(0.0, 1.0)] * len(observed)

    monkeypatch.setattr(cm, "inverted_ci", spy)
    cm.binned_error_ci(conf, y, bs, cov.N_BINS)
    n_star = np.concatenate(list(bs.counts())).sum(axis=1)
    return seen["samples"][:, 0], n_star


def test_world_copies_are_new_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every case at p = 0.5, one bin: a world resample's ECE is |events - n*/2| / n*, and a copy of a drawn
    # case is a new case, so the events are a whole number from Binomial(n*, 0.5).
    n = 120
    conf = np.full(n, 0.5)
    y = (np.arange(n) % 2).astype(np.float64)
    ece_w, n_star = _world_draws(monkeypatch, conf, y, Bootstrap(n, 400, seed=5))
    dev = ece_w * n_star  # |events - n*/2|
    frac = np.abs(dev - 0.5 * n_star - np.round(dev - 0.5 * n_star))
    assert np.all(frac < 1e-9), "events per world resample must be whole numbers"
    assert np.mean(dev**2 / n_star) == pytest.approx(0.25, rel=0.15)  # binomial variance n* / 4


def test_world_patient_copies_move_together(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two images per patient with the same outcome: within a drawn copy of a patient the outcomes are
    # comonotone (rho = 1), so each copy adds 0 or 2 events and the event count is even.
    g = 80
    conf = np.full(2 * g, 0.5)
    y = np.repeat((np.arange(g) % 2).astype(np.float64), 2)
    patients = np.repeat(np.arange(g), 2)
    ece_w, n_star = _world_draws(monkeypatch, conf, y, Bootstrap(2 * g, 400, seed=5, clusters=patients))
    events = np.round(0.5 * n_star + ece_w * n_star)  # |events - n*/2| = dev: both roots are even
    other = np.round(0.5 * n_star - ece_w * n_star)
    assert np.all((events % 2 == 0) & (other % 2 == 0))
    assert np.mean((ece_w * n_star) ** 2 / n_star) == pytest.approx(0.5, rel=0.2)  # pairs: variance doubles
