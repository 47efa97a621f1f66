"""The statistics behind the report's TRIPOD+AI / CLAIM items (``pipeline.evaluate.reporting``), against
values computed another way."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import roc_auc_score

from pipeline.config import Config
from pipeline.evaluate.reporting import (
    error_cases,
    hanley_mcneil_se,
    reporting_items,
    site_heterogeneity,
    subgroup_differences,
)
from pipeline.evaluate.summary import SplitPredictions

NAMES = ["malignant", "benign"]


def _cfg(tmp: Path, **evaluate) -> Config:
    return Config.model_validate(
        {
            "name": "r",
            "task": {
                "kind": "binary",
                "classes": {"0": "malignant", "1": "benign"},
                "positive_class": "malignant",
            },
            "data": {"source": str(tmp), "labels_csv": str(tmp / "l.csv")},
            "evaluate": {"n_bootstrap": 300, **evaluate},
        }
    )


def _split(rng, n: int, tag: str, strength: float = 1.5, n_pos: int | None = None, per_patient: int = 1):
    y = np.ones(n, dtype=np.int64)
    k = n // 2 if n_pos is None else n_pos
    y[rng.permutation(n)[:k]] = 0  # class 0 = malignant = positive
    z = rng.normal(size=(n, 2))
    z[np.arange(n), y] += strength
    sex = np.where(np.arange(n) % 4 == 0, "M", "F").astype(object)
    sex[:3] = "unknown"
    return SplitPredictions(
        logits=z,
        y=y,
        patient=np.array([f"P{tag}{i // per_patient:04d}" for i in range(n)]),
        case=np.array([f"C{tag}{i:05d}" for i in range(n)]),
        groups={"sex": sex.astype(str)},
    )


def test_hanley_mcneil_at_chance_equals_the_mann_whitney_null_variance() -> None:
    for n1, n2 in ((50, 50), (10, 90), (3, 7)):
        assert hanley_mcneil_se(0.5, n1, n2) ** 2 == pytest.approx((n1 + n2 + 1) / (12 * n1 * n2))
    assert hanley_mcneil_se(0.9, 100, 100) < hanley_mcneil_se(0.9, 20, 20)
    assert math.isnan(hanley_mcneil_se(0.9, 0, 10))


def test_sample_size_warnings_follow_the_split_sizes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    preds = {
        "val": _split(rng, 80, "v"),
        "calibration": _split(rng, 15, "c"),
        "test": _split(rng, 60, "t", n_pos=8),
    }
    probs = {s: softmax(p.logits, axis=1) for s, p in preds.items()}
    out = reporting_items(_cfg(tmp_path, conformal_alpha=0.05), preds, probs, {"conformal": {"alpha": 0.05}})
    ss = out["sample_size"]
    assert ss["splits"]["test"]["positives"] == 8 and ss["splits"]["test"]["min_events"] == 8
    codes = {w["code"] for w in ss["warnings"]}
    assert {"test_few_events", "conformal_calibration_too_small"} <= codes
    assert "val_few_events" not in codes
    assert ss["conformal_min_calibration_cases"] == 19
    # a bigger, balanced test split: no test warning, and a smaller detectable difference
    preds["test"] = _split(rng, 400, "t")
    probs["test"] = softmax(preds["test"].logits, axis=1)
    big = reporting_items(_cfg(tmp_path, conformal_alpha=0.05), preds, probs, {"conformal": {"alpha": 0.05}})
    assert "test_few_events" not in {w["code"] for w in big["sample_size"]["warnings"]}
    d_small = ss["detectable_difference"]["auroc"]["difference"]
    d_big = big["sample_size"]["detectable_difference"]["auroc"]["difference"]
    assert d_big < d_small
    a = big["sample_size"]["detectable_difference"]["auroc"]
    y = preds["test"].y == 0
    assert a["auroc"] == pytest.approx(roc_auc_score(y, probs["test"][:, 0]))
    assert a["difference"] == pytest.approx(
        (1.959964 + 0.841621) * hanley_mcneil_se(a["auroc"], y.sum(), (~y).sum()), rel=1e-5
    )
    json.dumps(big, allow_nan=False)  # strict JSON


def test_participants_count_missing_values_and_read_train_from_the_index(tmp_path) -> None:
    rng = np.random.default_rng(1)
    preds = {"test": _split(rng, 40, "t")}
    with open(tmp_path / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["case_id", "patient_id", "split", "label_index", "sex", "age_band", "manufacturer", "modality"]
        )
        for i in range(30):
            w.writerow([f"c{i}", f"p{i // 3}", "train", i % 2, "" if i < 5 else "F", "", "", ""])
        w.writerow(["u1", "p99", "train", "", "F", "", "", ""])  # unlabelled
    out = reporting_items(
        _cfg(tmp_path), preds, {"test": softmax(preds["test"].logits, axis=1)}, {}, tmp_path
    )
    tr = out["participants"]["train"]
    assert tr["cases"] == 31 and tr["patients"] == 11 and tr["unlabelled"] == 1
    assert tr["missing"]["sex"] == 5 and tr["groups"]["sex"] == {"F": 26}
    assert out["participants"]["test"]["missing"]["sex"] == 3
    assert out["missing_subgroup_values"]["sex"] == {"train": 5, "test": 3}
    assert out["sample_size"]["splits"]["train"]["cases"] == 30  # labelled cases only


def test_subgroup_differences_find_a_group_the_model_fails() -> None:
    rng = np.random.default_rng(2)
    n = 600
    y = rng.integers(0, 2, n)
    group = np.where(np.arange(n) < 300, "A", "B")
    score = np.where(group == "A", 0.8 * (y == 0) + 0.2 * rng.random(n), rng.random(n))  # B: noise
    probs = np.stack([score, 1 - score], axis=1)
    same = np.where(np.arange(n) % 2 == 0, "x", "y")
    out = subgroup_differences(
        probs, y, np.array([f"p{i}" for i in range(n)]), {"g": group, "h": same}, NAMES, 0, 0.95, 300, 0
    )
    assert out["g"]["reference"] == "B"  # equal sizes: ties go to the later name
    ref, other = out["g"]["reference"], next(iter(out["g"]["groups"]))
    m_o, m_r = group == other, group == ref
    expected = roc_auc_score(y[m_o] == 0, score[m_o]) - roc_auc_score(y[m_r] == 0, score[m_r])
    d = out["g"]["groups"][other]["differences"]
    assert d["auroc"]["value"] == pytest.approx(expected)
    assert d["auroc"]["excludes_zero"] and abs(d["auroc"]["value"]) > 0.3
    sens = lambda m: ((score[m] >= 0.5) & (y[m] == 0)).sum() / (y[m] == 0).sum()  # noqa: E731
    assert d["sensitivity"]["value"] == pytest.approx(sens(m_o) - sens(m_r))
    cil = lambda m: (score[m] - (y[m] == 0)).mean()  # noqa: E731
    assert d["calibration_in_the_large"]["value"] == pytest.approx(cil(m_o) - cil(m_r))
    h = out["h"]["groups"]
    assert not next(iter(h.values()))["differences"]["auroc"]["excludes_zero"]  # same model on both halves


def test_site_heterogeneity_separates_alike_and_different_sites() -> None:
    rng = np.random.default_rng(3)
    n = 900
    y = rng.integers(0, 2, n)
    site = np.array(["s1", "s2", "s3"])[np.arange(n) % 3]
    good = 1.0 * (y == 0) + rng.normal(size=n)
    alike = site_heterogeneity(np.stack([good, -good], 1), y, site, "site", 0, 0.95)
    bad = np.where(site == "s3", rng.normal(size=n), 3.0 * (y == 0) + rng.normal(size=n))
    diff = site_heterogeneity(np.stack([bad, -bad], 1), y, site, "site", 0, 0.95)
    assert diff["i2"] > 0.8 and diff["p_value"] < 0.001 and diff["tau2"] > 0
    assert alike["p_value"] > diff["p_value"] and alike["i2"] < diff["i2"]
    s1 = site == "s1"
    assert diff["sites"][0]["value"] == pytest.approx(roc_auc_score(y[s1] == 0, bad[s1]))
    lo, hi = diff["pooled"]["ci"]
    assert lo < diff["pooled"]["value"] < hi
    one = site_heterogeneity(np.stack([good, -good], 1), y, np.full(n, "s1"), "site", 0, 0.95)
    assert one["reason"] and "pooled" not in one


def test_error_cases_are_the_most_confident_mistakes() -> None:
    y = np.array([0, 0, 1, 1, 1, 0])
    p0 = np.array([0.9, 0.2, 0.95, 0.6, 0.1, 0.4])
    probs = np.stack([p0, 1 - p0], 1)
    e = error_cases(y, probs, NAMES, 0, n=5)["malignant"]
    assert e["false_positives"] == [2, 3]  # true benign, p(malignant) >= 0.5, highest first
    assert e["false_negatives"] == [1, 5]  # true malignant, lowest p first
    multi = error_cases(
        np.array([0, 1, 2, 2]), np.eye(3)[[1, 1, 0, 2]] * 0.8 + 0.2 / 3, ["a", "b", "c"], None
    )
    assert multi["b"]["false_positives"] == [0] and multi["a"]["false_negatives"] == [0]
    assert multi["c"]["false_negatives"] == [2] and multi["a"]["false_positives"] == [2]


def test_explain_draws_the_error_analysis_cases(tmp_path) -> None:
    import torch
    from torch import nn

    from pipeline.evaluate.stage import explain

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()

    class FakeScorer:  # the two members explain() uses
        device = torch.device("cpu")

        def explanation_network(self):
            return net

    rng = np.random.default_rng(4)
    test = _split(rng, 40, "t", strength=0.5)
    probs = softmax(test.logits, axis=1)
    kept = {"scorer": FakeScorer(), "test_x": rng.random((40, 1, 16, 16)).astype(np.float32)}
    cfg = _cfg(tmp_path, explain_cases=2)
    out = explain(cfg, {"test": test}, {"test": probs}, kept)
    assert len(out) == 2
    errors = error_cases(test.y, probs, NAMES, 0, n=2)["malignant"]
    idx = errors["false_positives"] + errors["false_negatives"]
    assert [c.index for c in out[1].cases] == idx and not any(c.correct for c in out[1].cases)
    assert [c.case_id for c in out[1].cases] == [str(test.case[i]) for i in idx]
    assert all(c.pred_name != c.true_name for c in out[1].cases)
    assert out[1].cams.shape[0] == len(idx) and "false positives and false negatives" in out[1].caption
