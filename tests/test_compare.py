"""Comparison with an earlier model: case matching, paired DeLong and paired bootstrap of the AUROC difference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.errors import ConfigError
from pipeline.evaluate.compare import compare_models, load_previous
from pipeline.evaluate.stage import _write_predictions
from pipeline.evaluate.summary import SplitPredictions

NAMES = ["malignant", "benign"]  # positive class at index 0, as BreastMNIST


def _logits(y: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    s = strength * (y == 0) + rng.normal(size=len(y))
    return np.stack([s, np.zeros_like(s)], 1)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _write_prev(folder, case, y, logits) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sp = SplitPredictions(logits=logits, y=y, patient=case.copy(), case=case)
    _write_predictions(folder / "predictions.csv", {"test": sp}, {}, NAMES)


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    case = np.array([f"c{i:05d}" for i in range(n)])
    return rng, y, case


def test_better_model_wins_and_both_analyses_agree(tmp_path) -> None:
    rng, y, case = _data(600)
    now, prev = _logits(y, 2.0, rng), _logits(y, 0.7, rng)
    _write_prev(tmp_path / "old-eval", case[::-1].copy(), y[::-1].copy(), prev[::-1].copy())  # order differs
    previous = load_previous(tmp_path / "old-eval", 2)
    out = compare_models(y, case, case, _softmax(now), previous, NAMES, 0, n_bootstrap=500, seed=1)
    assert out["n_matched"] == 600 and out["n_current_only"] == 0 and out["n_label_mismatch"] == 0
    a_now, a_prev = roc_auc_score(y == 0, now[:, 0]), roc_auc_score(y == 0, prev[:, 0])
    assert out["delong"]["difference"] == pytest.approx(a_now - a_prev, abs=1e-5)  # CSV keeps 6 decimals
    assert out["paired_bootstrap"]["value"] == pytest.approx(a_now - a_prev, abs=1e-5)
    assert out["delong"]["p_value"] < 0.01 and out["paired_bootstrap"]["p_value"] < 0.01
    lo, hi = out["paired_bootstrap"]["ci"]
    assert 0 < lo <= out["paired_bootstrap"]["value"] <= hi
    dlo, dhi = out["delong"]["ci"]
    assert dlo < a_now - a_prev < dhi and abs((dhi - dlo) - (hi - lo)) < 0.5 * (dhi - dlo)
    assert out["auroc_current"]["ci"][0] <= out["auroc_current"]["value"] <= out["auroc_current"]["ci"][1]


def test_same_model_gives_no_difference(tmp_path) -> None:
    rng, y, case = _data(200, seed=3)
    now = _logits(y, 1.0, rng)
    _write_prev(tmp_path / "e", case, y, now)
    out = compare_models(
        y,
        case,
        case,
        _softmax(now),
        load_previous(tmp_path / "e" / "predictions.csv", 2),
        NAMES,
        0,
        n_bootstrap=200,
    )
    assert out["delong"]["difference"] == pytest.approx(0, abs=1e-6)
    assert out["delong"]["p_value"] > 0.5 and out["paired_bootstrap"]["p_value"] > 0.5


def test_partial_overlap_and_label_changes_are_counted(tmp_path) -> None:
    rng, y, case = _data(300, seed=5)
    prev_logits = _logits(y, 1.0, rng)
    y_prev = y.copy()
    y_prev[:10] = 1 - y_prev[:10]  # relabelled since the earlier run
    keep = np.r_[0:250]
    extra = np.array([f"gone{i}" for i in range(7)])
    _write_prev(
        tmp_path / "e",
        np.r_[case[keep], extra],
        np.r_[y_prev[keep], np.zeros(7, int)],
        np.r_[prev_logits[keep], np.zeros((7, 2))],
    )
    out = compare_models(
        y,
        case,
        case,
        _softmax(_logits(y, 1.0, rng)),
        load_previous(tmp_path / "e", 2),
        NAMES,
        0,
        n_bootstrap=200,
    )
    assert (out["n_matched"], out["n_current_only"], out["n_previous_only"], out["n_label_mismatch"]) == (
        240,
        50,
        7,
        10,
    )


def test_multiclass_compares_each_class_and_cluster_bootstrap(tmp_path) -> None:
    rng = np.random.default_rng(2)
    n, k = 240, 3
    y = rng.integers(0, k, n)
    case = np.array([f"c{i}" for i in range(n)])
    patient = np.array([f"p{i // 2}" for i in range(n)])  # two cases per patient
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += 1.5
    names = ["a", "b", "c"]
    (tmp_path / "e").mkdir()
    _write_predictions(
        tmp_path / "e" / "predictions.csv",
        {"test": SplitPredictions(logits=z, y=y, patient=patient, case=case)},
        {},
        names,
    )
    out = compare_models(
        y, case, patient, _softmax(z), load_previous(tmp_path / "e", k), names, None, n_bootstrap=200
    )
    assert set(out["classes"]) == set(names) and out["ci_resampling"] == "patient_cluster"
    for c in out["classes"].values():  # the same model
        assert abs(c["delong"]["difference"]) < 1e-4
        assert c["paired_bootstrap"]["ci_method"] == "cluster_bootstrap"


def test_bad_paths_name_the_problem(tmp_path) -> None:
    with pytest.raises(ConfigError, match="not an Evaluate folder"):
        load_previous(tmp_path, 2)
    rng, y, case = _data(20)
    _write_prev(tmp_path / "e", case, y, _logits(y, 1.0, rng))
    with pytest.raises(ConfigError, match="3 classes"):
        load_previous(tmp_path / "e", 3)


def test_verdict_follows_the_primary_interval(tmp_path) -> None:
    from pipeline.evaluate.compare import verdict

    assert verdict([0.01, 0.2]) == "better" and verdict([-0.3, -0.02]) == "worse"
    assert verdict([-0.1, 0.1]) == "no evidence of a difference" and verdict(None) == "no evidence of a difference"
    rng, y, case = _data(600)
    now, prev = _logits(y, 2.0, rng), _logits(y, 0.7, rng)
    _write_prev(tmp_path / "e", case, y, prev)
    out = compare_models(y, case, case, _softmax(now), load_previous(tmp_path / "e", 2), NAMES, 0, n_bootstrap=300)
    assert out["primary"] == "delong" and out["verdict"] == "better"  # one case per patient: DeLong
    patient = np.array([f"p{i // 2}" for i in range(600)])
    out = compare_models(y, case, patient, _softmax(prev), load_previous(tmp_path / "e", 2), NAMES, 0, n_bootstrap=300)
    assert out["primary"] == "paired_bootstrap" and out["verdict"] == "no evidence of a difference"
