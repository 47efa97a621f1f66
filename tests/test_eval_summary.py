"""End-to-end tests of pipeline.evaluate.summary.evaluate_run on synthetic predictions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from pipeline.evaluate.summary import EvalOptions, SplitPredictions, TaskInfo, evaluate_run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "metrics_schema.md"


def _split(
    rng: np.random.Generator,
    n_patients: int,
    k: int,
    scale: float,
    cases_per_patient: int = 1,
    prefix: str = "p",
) -> SplitPredictions:
    """Patients with one or more cases; true logits shared within a patient; logits over-confident."""
    patient_logits = rng.normal(size=(n_patients, k)) * 1.5
    true_logits = np.repeat(patient_logits, cases_per_patient, axis=0)
    true_logits = true_logits + rng.normal(scale=0.3, size=true_logits.shape)
    p = softmax(true_logits, axis=1)
    y = (rng.random(len(p))[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    patient = np.repeat([f"{prefix}{i:05d}" for i in range(n_patients)], cases_per_patient)
    case = np.array([f"c{i:06d}" for i in range(len(y))])
    site = np.where(np.arange(len(y)) % 50 == 0, "tiny_site", np.where(np.arange(len(y)) % 2 == 0, "A", "B"))
    return SplitPredictions(true_logits * scale, y, patient, case, {"site": site})


def _iter_value_ci(obj, path=""):
    if isinstance(obj, dict):
        if "value" in obj and "ci" in obj:
            yield path, obj
        for key, val in obj.items():
            yield from _iter_value_ci(val, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, val in enumerate(obj):
            yield from _iter_value_ci(val, f"{path}[{i}]")


@pytest.fixture(scope="module")
def binary_result():
    rng = np.random.default_rng(5)
    splits = {
        "val": _split(rng, 300, 2, 3.0, prefix="v"),
        "calibration": _split(rng, 400, 2, 3.0, prefix="k"),
        "test": _split(rng, 400, 2, 3.0, cases_per_patient=2, prefix="t"),
    }
    # Positive class in column 0 (like BreastMNIST malignant = 0).
    task = TaskInfo("binary", ["malignant", "benign"], positive_index=0)
    opts = EvalOptions(calibration="temperature", n_bootstrap=300)
    return splits, task, opts, evaluate_run(splits, task, opts, seed=11)


def test_metrics_are_json_and_have_schema(binary_result) -> None:
    _, _, _, res = binary_result
    m = res.metrics
    text = json.dumps(m, allow_nan=False)
    assert json.loads(text) == m
    assert m["schema_version"] == 1
    for key in (
        "task",
        "options",
        "splits",
        "calibration",
        "evaluation",
        "conformal",
        "subgroups",
        "patient_level",
        "warnings",
        "seed",
    ):
        assert key in m
    assert m["task"]["positive_class"] == "malignant"
    assert m["splits"]["test"]["cases"] == 800 and m["splits"]["test"]["patients"] == 400


def test_every_documented_top_level_and_block_key_exists_in_docs(binary_result) -> None:
    doc = DOCS.read_text()
    m = binary_result[3].metrics
    keys = set(m) | set(m["evaluation"]["test"]) | set(m["evaluation"]["test"]["calibrated"])
    keys |= set(m["evaluation"]["test"]["calibrated"]["discrimination"])
    keys |= set(m["evaluation"]["test"]["calibrated"]["calibration"]) | set(m["conformal"])
    keys |= set(m["calibration"]) | set(m["patient_level"])
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"keys not documented in docs/metrics_schema.md: {missing}"


def test_calibration_improves_nll_and_keeps_auroc(binary_result) -> None:
    _, _, _, res = binary_result
    test = res.metrics["evaluation"]["test"]
    assert test["primary"] == "calibrated"
    assert res.metrics["calibration"]["applied"] == "temperature"
    assert res.metrics["calibration"]["parameters"]["temperature"] == pytest.approx(3.0, rel=0.3)
    unc, cal = test["uncalibrated"], test["calibrated"]
    assert cal["calibration"]["nll"]["value"] < unc["calibration"]["nll"]["value"]
    assert cal["calibration"]["ece"]["value"] < unc["calibration"]["ece"]["value"]
    assert cal["discrimination"]["auroc"]["value"] == pytest.approx(unc["discrimination"]["auroc"]["value"])
    assert unc["calibration"]["calibration_slope"]["value"] < 0.6  # over-confident by a factor 3
    assert (
        cal["calibration"]["calibration_slope"]["ci"][0]
        < 1.0
        < cal["calibration"]["calibration_slope"]["ci"][1]
    )


def test_every_number_has_a_ci_containing_it(binary_result) -> None:
    m = binary_result[3].metrics
    found = 0
    for path, entry in _iter_value_ci(m["evaluation"]):
        found += 1
        if entry["value"] is None:
            continue
        if entry["ci"] is None:  # reported without an interval (MCE): says why
            assert entry["ci_note"], path
            continue
        lo, hi = entry["ci"]
        assert lo is not None and hi is not None, path
        if entry.get("ci_method", "").endswith("_inversion"):
            # interval of the population calibration error, below the upward-biased plug-in value at times
            assert 0.0 <= lo <= hi, path
            continue
        assert lo - 1e-9 <= entry["value"] <= hi + 1e-9, path
    assert found > 50


def test_patient_clusters_drive_resampling_and_patient_level(binary_result) -> None:
    m = binary_result[3].metrics
    assert m["evaluation"]["test"]["ci_resampling"] == "patient_cluster"
    assert m["evaluation"]["val"]["ci_resampling"] == "case"
    auroc = m["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]
    assert auroc["ci_method"] == "obuchowski_logit_t"  # patient-clustered variance, not case-level DeLong
    assert m["evaluation"]["test"]["calibrated"]["discrimination"]["auprc"]["ci_method"] == "cluster_bootstrap_bca"
    assert auroc["ci"][0] < auroc["value"] < auroc["ci"][1] and auroc["dof"] >= 1
    pl = m["patient_level"]
    assert pl["n_patients"] == 400 and pl["label_rule"] == "any_positive"
    assert pl["metrics"]["discrimination"]["auroc"]["value"] > 0.7


def test_curves_operating_points_and_conformal(binary_result) -> None:
    splits, _, _, res = binary_result
    block = res.metrics["evaluation"]["test"]["calibrated"]
    roc = block["roc_curve"]
    assert 2 <= len(roc["fpr"]) <= 200
    assert len(block["decision_curve"]["thresholds"]) == 99
    ops = block["operating_points"]
    assert set(ops) == {"youden", "sens90", "sens95", "spec90"}
    # The threshold is chosen on val: re-deriving it from the val probabilities gives the same value.
    p_val = res.calibrated["val"][:, 0]
    y_val = splits["val"].y == 0
    sens = np.mean(p_val[y_val] >= ops["sens90"]["threshold"])
    assert sens >= 0.9 and sens == pytest.approx(ops["sens90"]["val_sensitivity"])
    cm = ops["youden"]["test"]["confusion_matrix"]
    assert sum(cm.values()) == 800
    conf = res.metrics["conformal"]
    assert set(conf["methods"]) == {"lac", "aps_randomized", "lac_mondrian"}  # only sets that keep coverage
    for meth in conf["methods"].values():
        assert meth["test"]["coverage"] >= 0.85
        assert set(meth["test"]["per_class"]) == {"malignant", "benign"}


def test_subgroups_flag_small_groups(binary_result) -> None:
    m = binary_result[3].metrics
    site = m["subgroups"]["site"]
    assert set(site) == {"A", "B", "tiny_site"}
    assert site["tiny_site"]["warning"] == "too_small"
    assert site["A"]["warning"] is None
    assert site["A"]["size"]["cases"] + site["B"]["size"]["cases"] + site["tiny_site"]["size"]["cases"] == 800
    assert any("site" in w for w in m["warnings"])


def test_calibrated_probabilities_returned(binary_result) -> None:
    splits, _, _, res = binary_result
    for name, sp in splits.items():
        assert res.calibrated[name].shape == sp.logits.shape
        np.testing.assert_allclose(res.calibrated[name], res.calibrator.predict_proba(sp.logits))


def test_reproducible_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    splits = {
        "val": _split(rng, 80, 2, 2.0),
        "calibration": _split(rng, 80, 2, 2.0),
        "test": _split(rng, 100, 2, 2.0),
    }
    task = TaskInfo("binary", ["neg", "pos"], positive_index=1)
    opts = EvalOptions(n_bootstrap=200, min_subgroup=5)
    a = evaluate_run(splits, task, opts, seed=3).metrics
    b = evaluate_run(splits, task, opts, seed=3).metrics
    c = evaluate_run(splits, task, opts, seed=4).metrics
    assert a == b
    assert (
        a["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]["ci_bootstrap"]
        != c["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]["ci_bootstrap"]
    )


def test_without_calibration_split() -> None:
    rng = np.random.default_rng(2)
    splits = {"val": _split(rng, 100, 2, 2.0), "test": _split(rng, 150, 2, 2.0)}
    res = evaluate_run(splits, TaskInfo("binary", ["neg", "pos"], 1), EvalOptions(n_bootstrap=200), seed=0)
    m = res.metrics
    assert m["calibration"]["applied"] == "none" and m["calibration"]["reason"] == "no calibration split"
    assert m["evaluation"]["test"]["primary"] == "uncalibrated"
    assert m["evaluation"]["test"]["calibrated"] is None
    assert m["conformal"]["methods"] == {} and m["conformal"]["reason"] == "no calibration split"
    assert any("no calibration split" in w for w in m["warnings"])
    assert res.calibrator is None
    np.testing.assert_allclose(res.calibrated["test"], softmax(splits["test"].logits, axis=1))


def test_ordinal_task_with_auto_calibration() -> None:
    rng = np.random.default_rng(3)
    splits = {
        "val": _split(rng, 150, 4, 2.5),
        "calibration": _split(rng, 300, 4, 2.5),
        "test": _split(rng, 300, 4, 2.5),
    }
    task = TaskInfo("ordinal", ["g0", "g1", "g2", "g3"])
    res = evaluate_run(splits, task, EvalOptions(calibration="auto", n_bootstrap=200), seed=0)
    m = res.metrics
    assert m["calibration"]["applied"] in {"temperature", "vector", "platt", "isotonic"}
    assert set(m["calibration"]["parameters"]["scores"]) == {
        "none",
        "temperature",
        "vector",
        "platt",
        "isotonic",
    }
    d = m["evaluation"]["test"]["calibrated"]["discrimination"]
    assert "kappa_quadratic" in d and "macro_auroc" in d and set(d["per_class"]) == set(task.class_names)
    assert m["evaluation"]["test"]["calibrated"]["calibration"]["reference"] == "top_label"
    assert set(m["evaluation"]["test"]["calibrated"]["roc_curve"]) == set(task.class_names)
    assert "operating_points" not in m["evaluation"]["test"]["calibrated"]
    assert m["patient_level"] is None


def test_input_errors() -> None:
    rng = np.random.default_rng(4)
    sp = _split(rng, 50, 2, 1.0)
    task = TaskInfo("binary", ["a", "b"], 1)
    with pytest.raises(ValueError, match="'test' split is required"):
        evaluate_run({"val": sp}, task, EvalOptions(), 0)
    with pytest.raises(ValueError, match="unknown split"):
        evaluate_run({"test": sp, "train": sp}, task, EvalOptions(), 0)
    with pytest.raises(ValueError, match="split 'test'.*expected 3 columns"):
        evaluate_run({"test": sp}, TaskInfo("multiclass", ["a", "b", "c"]), EvalOptions(), 0)
    with pytest.raises(ValueError, match="options.calibration.*'beta'"):
        EvalOptions(calibration="beta")
    with pytest.raises(ValueError, match="operating point"):
        EvalOptions(operating_points=("sens200",))
    with pytest.raises(ValueError, match="task.positive_index"):
        TaskInfo("binary", ["a", "b"])
    with pytest.raises(ValueError, match="task.kind"):
        TaskInfo("regression", ["a", "b"])
    bad = SplitPredictions(sp.logits, sp.y, sp.patient[:-1], sp.case)
    with pytest.raises(ValueError, match="patient: expected shape"):
        evaluate_run({"test": bad}, task, EvalOptions(), 0)


def test_degenerate_splits_give_nulls_not_crashes() -> None:
    rng = np.random.default_rng(9)

    def one_class(sp: SplitPredictions, cls: int) -> SplitPredictions:
        return SplitPredictions(sp.logits, np.full(len(sp.y), cls), sp.patient, sp.case, sp.groups)

    task = TaskInfo("binary", ["a", "b"], 1)
    splits = {
        "val": one_class(_split(rng, 30, 2, 2.0), 1),
        "calibration": _split(rng, 5, 2, 2.0),
        "test": one_class(_split(rng, 40, 2, 2.0), 0),
    }
    m = evaluate_run(splits, task, EvalOptions(n_bootstrap=200, calibration="auto"), seed=0).metrics
    json.dumps(m, allow_nan=False)
    auroc = m["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]
    assert auroc["value"] is None and "one class" in auroc["note"]
    assert m["evaluation"]["test"]["calibrated"]["roc_curve"] is None
    assert any("operating points were not chosen" in w for w in m["warnings"])
    assert any("only 5 cases" in w for w in m["warnings"])
    assert any("at least 9" in w for w in m["warnings"])  # conformal at alpha 0.1 needs 9 cases
    assert m["conformal"]["methods"]["lac"]["test"]["coverage"] == 1.0  # qhat = inf: all classes
