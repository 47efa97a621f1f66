"""Tests of validation-chosen operating points and decision curves."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.operating_points import (
    apply_threshold,
    choose_threshold,
    decision_curve,
    operating_points,
    parse_rule,
)
from pipeline.stats.bootstrap import Bootstrap


def _data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    y = rng.random(n) < 0.35
    s = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.6 * y - 0.5)))
    return s, y


def _sens_spec(s: np.ndarray, y: np.ndarray, t: float) -> tuple[float, float]:
    pred = s >= t
    return (pred & y).sum() / y.sum(), (~pred & ~y).sum() / (~y).sum()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(99)


def test_rules_satisfy_their_definitions_by_brute_force(rng: np.random.Generator) -> None:
    s, y = _data(rng, 400)
    candidates = np.unique(s)
    table = np.array([_sens_spec(s, y, t) for t in candidates])  # ascending thresholds
    youden = choose_threshold(s, y, "youden")
    best_j = np.max(table[:, 0] + table[:, 1] - 1)
    se, sp = _sens_spec(s, y, youden["threshold"])
    assert se + sp - 1 == pytest.approx(best_j)
    for target in (0.90, 0.95):
        r = choose_threshold(s, y, f"sens{int(target * 100)}")
        se, _ = _sens_spec(s, y, r["threshold"])
        assert se >= target and r["val_sensitivity"] == pytest.approx(se)
        higher = candidates[candidates > r["threshold"]]
        assert all(_sens_spec(s, y, t)[0] < target for t in higher)  # highest threshold meeting it
    r = choose_threshold(s, y, "spec90")
    _, sp = _sens_spec(s, y, r["threshold"])
    assert sp >= 0.9 and r["val_specificity"] == pytest.approx(sp)
    lower = candidates[candidates < r["threshold"]]
    assert all(_sens_spec(s, y, t)[1] < 0.9 for t in lower)  # lowest threshold meeting it


def test_thresholds_transfer_to_exchangeable_test_set(rng: np.random.Generator) -> None:
    sv, yv = _data(rng, 5000)
    st, yt = _data(rng, 5000)
    ops = operating_points(sv, yv, st, yt)
    assert set(ops) == {"youden", "sens90", "sens95", "spec90"}
    assert ops["sens90"]["test"]["sensitivity"]["value"] == pytest.approx(0.90, abs=0.03)
    assert ops["sens95"]["test"]["sensitivity"]["value"] == pytest.approx(0.95, abs=0.03)
    assert ops["spec90"]["test"]["specificity"]["value"] == pytest.approx(0.90, abs=0.03)
    assert ops["sens95"]["threshold"] <= ops["sens90"]["threshold"]
    for op in ops.values():
        t = op["test"]
        cm = t["confusion_matrix"]
        assert sum(cm.values()) == 5000
        assert t["ppv"]["value"] == pytest.approx(cm["tp"] / (cm["tp"] + cm["fp"]))
        assert t["npv"]["value"] == pytest.approx(cm["tn"] / (cm["tn"] + cm["fn"]))
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            lo, hi = t[key]["ci"]
            assert lo <= t[key]["value"] <= hi


def test_apply_threshold_uses_cluster_bootstrap_when_patients_repeat(rng: np.random.Generator) -> None:
    s, y = _data(rng, 300)
    patients = np.repeat(np.arange(100), 3)
    out = apply_threshold(s, y, 0.5, Bootstrap(300, 500, seed=0, clusters=patients))
    assert out["sensitivity"]["ci_method"] == "cluster_bootstrap"
    assert apply_threshold(s, y, 0.5)["sensitivity"]["ci_method"] == "wilson"


def test_rule_that_calls_nothing_positive_is_above_one() -> None:
    # An inverted model: every negative outranks every positive, so specificity >= 99% needs "no one".
    s = np.array([0.1, 0.2, 0.9, 0.95])
    y = np.array([True, True, False, False])
    r = choose_threshold(s, y, "spec99")
    assert r["threshold"] > 1.0 and r["val_specificity"] == 1.0 and r["val_sensitivity"] == 0.0
    assert (
        apply_threshold(np.array([1.0, 0.5]), np.array([True, False]), r["threshold"])["confusion_matrix"][
            "tp"
        ]
        == 0
    )


def test_decision_curve_properties(rng: np.random.Generator) -> None:
    s, y = _data(rng, 1000)
    dc = decision_curve(s, y)
    assert len(dc["thresholds"]) == 99 and dc["thresholds"][0] == 0.01 and dc["thresholds"][-1] == 0.99
    assert dc["treat_none"] == [0.0] * 99
    prev = y.mean()
    assert dc["treat_all"][0] == pytest.approx(prev - (1 - prev) * 0.01 / 0.99)
    i = dc["thresholds"].index(0.3)
    pred = s >= 0.3
    expect = (pred & y).sum() / 1000 - (pred & ~y).sum() / 1000 * 0.3 / 0.7
    assert dc["model"][i] == pytest.approx(expect)
    perfect = decision_curve(y.astype(float), y)
    np.testing.assert_allclose(perfect["model"], prev)


def test_parse_rule() -> None:
    assert parse_rule("sens90") == ("sensitivity", 0.9)
    assert parse_rule("spec95") == ("specificity", 0.95)
    assert parse_rule("youden") == ("youden", None)
    for bad in ("sens", "sens100", "spec00", "f1", 3):
        with pytest.raises(ValueError, match="operating point"):
            parse_rule(bad)
    with pytest.raises(ValueError, match="one class"):
        choose_threshold(np.array([0.1, 0.2]), np.array([True, True]), "youden")


def test_youden_tie_goes_to_the_higher_sensitivity() -> None:
    from pipeline.evaluate.operating_points import choose_threshold

    # scores:    0.9  0.8  0.7  0.6  0.5  0.4
    # positive:   1    0    1    0    1    0
    # J at t=0.9: 1/3-0 = 1/3; t=0.7: 2/3-1/3 = 1/3; t=0.5: 3/3-2/3 = 1/3  -> three-way tie
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    y = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    op = choose_threshold(scores, y, "youden")
    assert op["threshold"] == pytest.approx(0.5)
    assert op["val_sensitivity"] == pytest.approx(1.0) and op["val_specificity"] == pytest.approx(1 / 3)
