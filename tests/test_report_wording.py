"""Every sentence of the report that states a number or a method follows the metrics: change the metrics
(confidence level, interval method, calibration outcome, test counts, training provenance) and the
sentences change with them."""

from __future__ import annotations

import copy
import html as html_mod
import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.evaluate.reporting import reporting_items
from pipeline.evaluate.summary import EvalOptions, SplitPredictions, TaskInfo, evaluate_run
from pipeline.report.build import build_document
from pipeline.report.model_card import model_card
from pipeline.workspace import StagePlan

CLASSES = {"0": "malignant", "1": "benign"}


def _split(rng, n: int, tag: str, per_patient: int) -> SplitPredictions:
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, 2))
    z[np.arange(n), y] += 1.6
    z *= 4.0
    return SplitPredictions(
        logits=z,
        y=y,
        patient=np.array([f"P{tag}{i // per_patient:04d}" for i in range(n)]),
        case=np.array([f"C{tag}{i:05d}" for i in range(n)]),
        groups={"sex": np.where(np.arange(n) % 3 == 0, "M", "F")},
    )


def _plan(root: Path, train: dict) -> StagePlan:
    plan = StagePlan(
        workspace=root,
        snapshot="snap",
        ingest=root / "i",
        augment=root / "a",
        finetune=root / "f",
        evaluate=root / "e",
    )
    for d in (plan.ingest, plan.augment, plan.finetune, plan.evaluate):
        d.mkdir(parents=True, exist_ok=True)
    (plan.ingest / "ingest_report.json").write_text(
        json.dumps({"inputs": 600, "cases": 600, "patients": 500, "split_rule": "keyed hash", "splits": {}})
    )
    (plan.finetune / "train_summary.json").write_text(json.dumps(train))
    return plan


TRAIN_SINGLE = {
    "backbone": "resnet18",
    "strategy": "finetune",
    "pretrained": True,
    "weights": {"path": "resnet18.safetensors", "sha256": "cd" * 32, "source": "local", "pinned": True},
    "weights_per_member": [
        {"path": "resnet18.safetensors", "sha256": "cd" * 32, "source": "local", "pinned": True}
    ],
    "epochs_run": 7,
    "best_epoch": 5,
    "stopped_by": "early_stopping",
    "train_cases": 300,
    "train_class_counts": [120, 180],
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wording")
    rng = np.random.default_rng(11)
    cfg = Config.model_validate(
        {
            "name": "wording",
            "task": {"kind": "binary", "classes": CLASSES, "positive_class": "malignant"},
            "data": {"source": str(tmp), "labels_csv": str(tmp / "labels.csv")},
            "evaluate": {"n_bootstrap": 200, "ci_level": 0.9},
        }
    )
    preds = {
        "val": _split(rng, 160, "v", 1),
        "calibration": _split(rng, 120, "c", 1),
        "test": _split(rng, 240, "t", 2),
    }
    task = TaskInfo(kind="binary", class_names=list(CLASSES.values()), positive_index=0)
    opts = EvalOptions(n_bootstrap=200, ci_level=0.9, operating_points=("youden",))
    res = evaluate_run(preds, task, opts, seed=0)
    metrics = dict(res.metrics)
    metrics["reporting"] = reporting_items(cfg, preds, res.calibrated, metrics)
    plan = _plan(tmp, TRAIN_SINGLE)
    return cfg, plan, metrics, preds, res.calibrated


def _text(cfg, plan, metrics, preds, calibrated) -> str:
    doc = build_document(cfg, plan, metrics, preds, calibrated)
    page = doc.html("t", "s").split("<body>", 1)[1]
    return html_mod.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_the_confidence_level_comes_from_the_metrics(run) -> None:
    cfg, plan, metrics, preds, cal = run
    text = _text(*run)
    assert "Intervals are 90% confidence intervals." in text
    assert "95%" not in text  # nothing hard-coded at the default level
    m = copy.deepcopy(metrics)
    m["options"]["ci_level"] = 0.99
    text99 = _text(cfg, plan, m, preds, cal)
    assert "Intervals are 99% confidence intervals." in text99 and "90%" not in text99


def test_the_interval_method_named_is_the_one_used(run) -> None:
    cfg, plan, metrics, preds, cal = run
    assert metrics["evaluation"]["test"]["ci_resampling"] == "patient_cluster"
    text = _text(*run)
    # two cases per patient: the AUROC CI is the patient-clustered (Obuchowski) one, not case-level DeLong
    assert "DeLong on the logit scale with a t quantile for AUROC" not in text
    assert "patient-clustered DeLong (Obuchowski) on the logit scale with a t quantile for AUROC" in text
    assert re.search(r"patient-cluster bootstrap, bias-corrected and accelerated \(200 resamples\) for [^;]*AUPRC", text)
    m = copy.deepcopy(metrics)
    for variant in ("uncalibrated", "calibrated"):
        m["evaluation"]["test"][variant]["discrimination"]["auroc"]["ci_method"] = "delong"
    assert "DeLong for AUROC" in _text(cfg, plan, m, preds, cal)
    assert "with 90% paired patient-cluster bootstrap CIs (200 resamples" in text  # subgroup differences
    for d in m["reporting"]["subgroup_differences"].values():
        for e in d["groups"].values():
            for x in e["differences"].values():
                x["ci_method"] = "bootstrap"
    assert "with 90% paired case bootstrap CIs" in _text(cfg, plan, m, preds, cal)


def test_a_declined_calibrator_is_never_called_calibrated(run) -> None:
    cfg, plan, metrics, preds, cal = run
    assert "Calibration: temperature fitted on the 120 calibration cases and applied" in _text(*run)
    m = copy.deepcopy(metrics)
    m["calibration"].update(
        applied="none",
        fitted="temperature",
        declined="temperature made the negative log-likelihood worse on 5-fold cross-validation",
        cross_validation={"folds": 5, "nll_uncalibrated": 0.31, "nll_calibrated": 0.35},
    )
    m["evaluation"]["test"]["primary"] = "uncalibrated"
    m["evaluation"]["test"]["calibrated"] = None
    text = _text(cfg, plan, m, preds, cal)
    assert "Calibration declined: temperature was fitted" in text
    assert "every probability in this report is uncalibrated" in text
    assert "NLL went from 0.310 (uncalibrated) to 0.350" in text
    assert "calibrated (temperature)" not in text and "applied." not in text.split("Calibration declined")[0]
    card = model_card(cfg, plan, m, build_document(cfg, plan, m, preds, cal))
    assert (
        "**Post-hoc calibration:** temperature was fitted on the 120 calibration cases and declined" in card
    )


def test_test_split_harm_of_the_calibrator_is_flagged(run) -> None:
    cfg, plan, metrics, preds, cal = run
    m = copy.deepcopy(metrics)
    c_unc = m["evaluation"]["test"]["uncalibrated"]["calibration"]
    c_cal = m["evaluation"]["test"]["calibrated"]["calibration"]
    c_unc["nll"]["value"], c_cal["nll"]["value"] = 0.393, 0.415
    c_unc["calibration_slope"]["value"], c_cal["calibration_slope"]["value"] = 1.01, 0.59
    c_unc["ece"]["value"], c_cal["ece"]["value"] = 0.08, 0.03
    text = _text(cfg, plan, m, preds, cal)
    assert (
        "made some calibration figures worse (NLL 0.393 -> 0.415; calibration slope 1.010 -> 0.590)" in text
    )
    assert "while improving others (ECE 0.080 -> 0.030" in text


def test_limitations_state_this_runs_counts(run) -> None:
    cfg, plan, metrics, preds, cal = run
    t = metrics["splits"]["test"]
    text = _text(*run)
    assert (
        f"Internal validation only: the {t['cases']} test cases" in text
        and f"of {t['patients']} patients" in text
    )
    auc = metrics["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]
    assert f"The 90% CI of the test AUROC runs from {auc['ci'][0]:.3f} to {auc['ci'][1]:.3f}" in text
    m = copy.deepcopy(metrics)
    m["splits"]["test"].update(cases=57, patients=31)
    m["evaluation"]["test"]["calibrated"]["discrimination"]["auroc"]["ci"] = [0.61, 0.93]
    text2 = _text(cfg, plan, m, preds, cal)
    assert "the 57 test cases" in text2 and "of 31 patients" in text2
    assert "runs from 0.610 to 0.930 (width 0.320)" in text2
    m["external"] = [
        {"name": "site-b", "counts": {"scored": 80, "labelled": 77, "unlabelled": 3}, "metrics": {},
         "problem_codes": {"unreadable": 2}, "ood_rate": 0.25}
    ]
    text3 = _text(cfg, plan, m, preds, cal)
    assert "Internal validation only" not in text3 and "Robustness and external validation" in text3
    assert "Source 'site-b': 80 case(s) scored, 77 with a label (3 with an empty label" in text3
    assert "not scored or refused: 2 unreadable; 25% of the scored cases look unlike" in text3


def test_size_warnings_and_detectable_difference_follow_the_reporting_block(run) -> None:
    cfg, plan, metrics, preds, cal = run
    dd = metrics["reporting"]["sample_size"]["detectable_difference"]["auroc"]
    text = _text(*run)
    assert f"by less than {dd['difference']:.3f}" in text and "two-sided alpha 0.10" in text
    m = copy.deepcopy(metrics)
    m["reporting"]["sample_size"]["warnings"] = [
        {
            "code": "test_few_events",
            "split": "test",
            "message": "the test split has 7 case(s) of its rarest class",
        }
    ]
    text2 = _text(cfg, plan, m, preds, cal)
    assert "Split too small for its use (test_few_events): the test split has 7 case(s)" in text2
    summary = text2.split("Data and splits")[0]
    assert (
        "Split too small for its use: the test split has 7 case(s) of its rarest class (code test_few_events)"
        in summary
    )
    assert "Split too small" not in text.split("Data and splits")[0]


def test_fold_ensemble_provenance_is_reported_per_member(run, tmp_path) -> None:
    cfg, _, metrics, preds, cal = run
    members = [
        {"path": "convnext.safetensors", "sha256": f"{i:02d}" * 32, "source": "timm cache", "pinned": True}
        for i in range(5)
    ]
    train = dict(
        TRAIN_SINGLE,
        weights=members[0],
        weights_per_member=members,
        best_epoch=None,
        stopped_by="k_fold",
        epochs_run=40,
        folds={"k": 5, "per_fold": [{"fold": i, "best_epoch": 3 + i, "val_auroc": 0.8} for i in range(5)]},
    )
    plan = _plan(tmp_path, train)
    text = _text(cfg, plan, metrics, preds, cal)
    assert "from scratch" not in text and "None (k_fold)" not in text
    for m in members:
        assert m["sha256"] in text
    assert "best epoch per fold: 3, 4, 5, 6, 7" in text
    card = model_card(cfg, plan, metrics, build_document(cfg, plan, metrics, preds, cal))
    assert "starting weights: convnext.safetensors; 5 members" in card
    plan2 = _plan(tmp_path / "x", dict(TRAIN_SINGLE, weights=None, weights_per_member=None))
    text2 = _text(cfg, plan2, metrics, preds, cal)
    assert "pretrained (provenance not recorded: file and sha256 unknown)" in text2
    plan3 = _plan(tmp_path / "y", dict(TRAIN_SINGLE, pretrained=False, weights=None, weights_per_member=None))
    assert "none (from scratch)" in _text(cfg, plan3, metrics, preds, cal)


def test_checklist_uses_claim_2024_numbers() -> None:
    """CLAIM numbers are those of the 44-item 2024 update (RSNA's checklist), not the 2020 list."""
    from pipeline.config import Config
    from pipeline.report.sections.checklist import CLAIM_NOTE, checklist

    cfg = Config.model_validate(
        {"task": {"kind": "binary", "classes": {"0": "a", "1": "b"}, "positive_class": "b"},
         "data": {"source": ".", "labels_csv": "l.csv"}}
    )
    rows = {r[0]: r[2] for r in checklist(cfg, {}, {})}
    assert rows["De-identification"] == "11" and rows["Missing data"] == "12"
    assert rows["Sample size"] == "21" and rows["Data partitioning, level of disjointness"] == "19, 20"
    assert rows["Participant flow"] == "35" and rows["Participant characteristics per split"] == "36"
    assert rows["Robustness, external validation"] == "30, 33" and rows["Failure analysis"] == "39"
    assert rows["Limitations"] == "40" and "CLAIM 2024" in CLAIM_NOTE and "2020" not in CLAIM_NOTE
