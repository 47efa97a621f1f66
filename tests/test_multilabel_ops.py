"""Multilabel models in operations (issue 17, point 4 follow-ups): champion/challenger on the macro AUROC
with a paired patient-cluster bootstrap and the mean Brier over findings, the first-model floor, the locked
holdout's "every finding both ways" rule, predict's reference prevalence per finding, and the export that
says "sigmoid per finding" in its outputs and its metadata.

Known answers: the macro AUROC is the mean of scikit-learn's per-finding AUROCs; the difference interval is
recomputed resample by resample with scikit-learn's weighted AUROC on the same patient-cluster count rows;
the first model's interval is the one Evaluate reports for the same cases and resamples.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit

from pipeline.config import PromotionPolicy
from pipeline.ops.promotion import (
    Scored,
    compare_multilabel,
    decide,
    first_model_check_multilabel,
    multilabel_brier,
    usable_multilabel_holdout,
)
from tests.test_multilabel import _ml_config, make_multilabel_dataset

NAMES = ["effusion", "nodule"]


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.random((n, 2)) < [0.4, 0.3]).astype(np.int64)


def _probs(rng: np.random.Generator, y: np.ndarray, signal: float) -> np.ndarray:
    """Calibrated-looking finding probabilities with ``signal`` separation per finding."""
    return expit(signal * (2 * y - 1) + rng.normal(0, 1, y.shape))


def _patients(n: int, per: int = 2) -> np.ndarray:
    return np.array([f"P{i // per:04d}" for i in range(n)])


def test_compare_known_answer_paired_patient_cluster_interval() -> None:
    from sklearn.metrics import roc_auc_score

    from pipeline.stats.bootstrap import Bootstrap

    rng = np.random.default_rng(0)
    n = 160
    y, patients = _labels(rng, n), _patients(n)
    champ, chall = _probs(rng, y, 1.5), _probs(rng, y, 1.5)
    policy = PromotionPolicy(n_bootstrap=200)
    res = compare_multilabel(y, champ, chall, patients, policy, NAMES, seed=7)
    def macro(p: np.ndarray) -> float:
        return float(np.mean([roc_auc_score(y[:, j], p[:, j]) for j in range(2)]))

    assert res["auroc_champion"] == pytest.approx(macro(champ))
    assert res["auroc_challenger"] == pytest.approx(macro(chall))
    assert res["auroc_difference"] == pytest.approx(macro(chall) - macro(champ))
    per_finding = [np.mean((chall[:, j] - y[:, j]) ** 2) for j in range(2)]
    assert res["brier_challenger"] == pytest.approx(np.mean(per_finding))
    nodule = res["per_finding"]["nodule"]["auroc_champion"]
    assert nodule == pytest.approx(roc_auc_score(y[:, 1], champ[:, 1]))
    assert res["n_patients"] == 80 and res["method"] == "bootstrap" and res["findings"] == NAMES
    # the same patient-cluster resamples, each evaluated by scikit-learn with the draw counts as weights
    bs = Bootstrap(n, 200, seed=7, clusters=patients, ci_level=policy.ci_level)
    diffs = []
    for w in np.concatenate(list(bs.counts())):
        new = [roc_auc_score(y[:, j], chall[:, j], sample_weight=w) for j in range(2)]
        old = [roc_auc_score(y[:, j], champ[:, j], sample_weight=w) for j in range(2)]
        diffs.append(np.mean(new) - np.mean(old))
        assert np.all(w.reshape(-1, 2)[:, 0] == w.reshape(-1, 2)[:, 1])  # a patient's cases drawn together
    assert res["difference_ci"] == pytest.approx(list(bs.ci(np.array(diffs))), abs=1e-9)
    assert bs.effective_n == 80  # the expanded percentile level counts patients, not cases


def test_identical_promoted_random_and_overconfident_not() -> None:
    policy = PromotionPolicy(n_bootstrap=300)
    for seed in range(8):
        rng = np.random.default_rng(seed)
        y, patients = _labels(rng, 120), _patients(120)
        champ = _probs(rng, y, 2.0)
        same = compare_multilabel(y, champ, champ.copy(), patients, policy, NAMES, seed)
        assert same["promote"] and same["auroc_difference"] == 0, same
        noise = _probs(rng, rng.permutation(y), 2.0)  # trained on shuffled rows: no signal for y
        res = compare_multilabel(y, champ, noise, patients, policy, NAMES, seed)
        assert not res["promote"] and "macro AUROC difference" in res["reasons"][0], res
    rng = np.random.default_rng(1)
    p = rng.beta(2, 3, (400, 2))  # calibrated champion: y ~ Bernoulli(p)
    y = (rng.random((400, 2)) < p).astype(int)
    sharp = expit(8 * np.log(p / (1 - p)))  # same ranking per finding, overconfident
    res = compare_multilabel(y, p, sharp, _patients(400, 1), PromotionPolicy(), NAMES)
    assert abs(res["auroc_difference"]) < 1e-9 and not res["promote"]
    assert any("mean Brier over findings" in r for r in res["reasons"])


def test_first_model_floor_and_interval_as_evaluate_reports_it() -> None:
    from pipeline.evaluate.multilabel import _macro_block
    from pipeline.stats.bootstrap import Bootstrap

    rng = np.random.default_rng(2)
    y, patients = _labels(rng, 150), _patients(150, 3)
    good = _probs(rng, y, 1.0)
    policy = PromotionPolicy(n_bootstrap=300)
    res = first_model_check_multilabel(y, good, patients, policy, NAMES, seed=5)
    assert res["promote"] and res["auroc_ci"][0] > 0.5 and "macro AUROC" in res["reasons"][0]
    bs = Bootstrap(150, 300, seed=5, clusters=patients, ci_level=0.95)
    evaluate = _macro_block(good, y, bs, NAMES)["discrimination"]["macro_auroc"]
    assert res["auroc_challenger"] == pytest.approx(evaluate["value"])
    assert res["auroc_ci"] == pytest.approx(list(evaluate["ci"]))
    assert res["brier_challenger"] == pytest.approx(multilabel_brier(good, y))
    noise = _probs(rng, rng.permutation(y), 2.0)
    assert not first_model_check_multilabel(y, noise, patients, policy, NAMES, seed=5)["promote"]
    strict = policy.model_copy(update={"min_auroc": res["auroc_challenger"]})  # the bound is below the value
    assert not first_model_check_multilabel(y, good, patients, strict, NAMES, seed=5)["promote"]


def test_findings_without_both_classes_and_bad_shapes() -> None:
    rng = np.random.default_rng(3)
    y = _labels(rng, 60)
    y[:, 1] = 0  # no positive nodule: the macro AUROC averages effusion only (as Evaluate's)
    p = _probs(rng, y, 2.0)
    res = first_model_check_multilabel(y, p, _patients(60), PromotionPolicy(n_bootstrap=200), NAMES)
    assert res["findings"] == ["effusion"]
    y[:, 0] = 1
    res = compare_multilabel(y, p, p, _patients(60), PromotionPolicy(n_bootstrap=200), NAMES)
    assert not res["promote"] and "no finding has positive and negative cases" in res["reasons"][0]
    with pytest.raises(ValueError, match="challenger: expected probabilities of shape"):
        compare_multilabel(y, p, p[:, :1], _patients(60), PromotionPolicy(), NAMES)
    with pytest.raises(ValueError, match=r"y: expected 0/1 labels of shape \(N, 2\)"):
        first_model_check_multilabel(y[:, 0], p, _patients(60), PromotionPolicy(), NAMES)


def _scored(y: np.ndarray, p: np.ndarray, patients: np.ndarray, cases: np.ndarray, method: str) -> Scored:
    z = np.log(p / (1 - p))
    return Scored(
        raw={"test": p}, calibrated={"test": p}, logits={"test": z}, y={"test": y},
        patients={"test": patients}, cases={"test": cases}, calibrator={"method": method}, multilabel=True,
    )


def test_decide_uses_the_holdout_when_every_finding_is_there_both_ways(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.ingest.splits import holdout_mask

    make_multilabel_dataset(tmp_path, n=4)
    ops = {"promotion": {"min_holdout_cases": 10, "holdout_fraction": 0.5, "n_bootstrap": 200}}
    cfg = load_config(_ml_config(tmp_path, ops=ops))
    key = b"k" * 32
    rng = np.random.default_rng(4)
    n = 200
    y, patients = _labels(rng, n), _patients(n)
    cases = np.array([f"C{i}" for i in range(n)])
    champ = _scored(y, _probs(rng, y, 2.0), patients, cases, "champion's")
    chall = _scored(y, _probs(rng, y, 2.0), patients, cases, "challenger's")
    mask = holdout_mask(patients, key, 0.5)
    res = decide(cfg, key, chall, champ)
    assert res["evaluated_on"] == "holdout" and res["n_cases"] == int(mask.sum())
    want = compare_multilabel(y[mask], champ.calibrated["test"][mask], chall.calibrated["test"][mask],
                              patients[mask], cfg.ops.promotion, NAMES, cfg.train.seed)
    assert res["difference_ci"] == want["difference_ci"] and res["promote"] == want["promote"]
    assert res["calibrator_challenger"] == {"method": "challenger's"}
    assert decide(cfg, key, chall, None)["auroc_ci"] == first_model_check_multilabel(
        y[mask], chall.calibrated["test"][mask], patients[mask], cfg.ops.promotion, NAMES, cfg.train.seed
    )["auroc_ci"]
    # no nodule positive in the holdout: it is not usable, the whole test split decides and the note says why
    y2 = y.copy()
    y2[mask, 1] = 0
    assert usable_multilabel_holdout(patients, y2, key, 0.5, 10) is None
    assert usable_multilabel_holdout(patients, y, key, 0.5, 10) is not None
    res = decide(cfg, key, _scored(y2, chall.calibrated["test"], patients, cases, "c"), None)
    assert res["evaluated_on"] == "test" and res["n_cases"] == n
    assert "1 of 2 finding(s) both ways" in res["note"] and "every finding" in res["note"]


def test_reference_profile_prevalence_per_finding(tmp_path: Path) -> None:
    from pipeline.ops.predict import reference_profile

    base = {"spacing": "", "kind": "png", "modality": "", "manufacturer": "", "volume": "absent.npy"}
    labels = [("1;0", 3), ("1;1", 1), ("0;0", 2), ("0;1", 2)]
    rows = [dict(base, case_id=f"C{i}", split="train", label=lab, label_index=str(s))
            for i, (lab, s) in enumerate(labels)]
    rows.append(dict(base, case_id="Ct", split="test", label="1;1", label_index="1"))
    ref = reference_profile(rows, tmp_path, NAMES)  # the volumes are lost: left out of the image figures
    assert ref["label_prevalence"] == {"effusion": 0.5, "nodule": 0.5}
    assert ref["n_train_cases"] == 4
    single = reference_profile(rows, tmp_path)  # single-label: the share of each class index, unchanged
    assert single["label_prevalence"] == {"1": 0.25, "2": 0.5, "3": 0.25}


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ml_ops(tmp_path_factory) -> Path:
    """A multilabel ``medtl run`` with flip TTA (the exported network averages each finding's sigmoid)."""
    from tasks.cli import run_pipeline

    root = tmp_path_factory.mktemp("multilabel_ops")
    make_multilabel_dataset(root)
    ops = {"promotion": {"min_holdout_cases": 5, "n_bootstrap": 300}, "retries": 0}
    train = {"epochs": 6, "batch_size": 16, "lr": 0.003, "patience": 6, "tta": "flip"}
    config = _ml_config(root, train=train, ops=ops)
    assert run_pipeline(config) == 0
    return config


def test_first_multilabel_model_is_decided_and_promoted(ml_ops: Path) -> None:
    from pipeline.ingest.stage import read_manifest
    from pipeline.ops.registry import Registry
    from tests.test_multilabel import _stage

    ws = ml_ops.parent / "ws"
    reg = Registry(ws)
    (m,) = reg.models()
    (d,) = reg.decisions()
    assert d["challenger_id"] == m["id"] and d["champion_id"] is None
    details = d["details"]
    assert details["metric"].startswith("macro AUROC") and details["auroc_ci"][0] > 0.5, details
    assert m["status"] == "champion" and d["promoted"] == 1
    assert details["calibrator_challenger"]["source"].startswith("evaluate/")
    ref = json.loads((ws / "ops" / "models" / str(m["id"]) / "reference.json").read_text())
    train = [r for r in read_manifest(_stage(ml_ops, "ingest")) if r["split"] == "train"]
    want = {n: np.mean([int(r["label"].split(";")[j]) for r in train]) for j, n in enumerate(NAMES)}
    assert ref["label_prevalence"] == pytest.approx(want)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_says_sigmoid_per_finding(ml_ops: Path, tmp_path: Path, fmt: str) -> None:
    import torch

    from pipeline.ops.registry import Registry
    from pipeline.trained.artefact import TrainedModel
    from pipeline.trained.scorer import Scorer
    from tasks.cli import main

    ws = ml_ops.parent / "ws"
    assert main(["models", "export", str(ml_ops), "1", "--format", fmt, "--output", str(tmp_path)]) == 0
    side = json.loads((tmp_path / f"model1.{fmt}.json").read_text())
    assert side["activation"] == "sigmoid" and side["task"] == "multilabel" and side["output_names"] == NAMES
    assert "sigmoid" in side["output"] and side["max_abs_difference"] <= 1e-4
    row = Registry(ws).get(1)
    trained = TrainedModel.load(ws / "finetune" / row["finetune"], ws / "evaluate" / row["evaluate"])
    x = np.random.default_rng(0).normal(size=(6, *trained.input_shape)).astype(np.float32)
    path = tmp_path / side["file"]
    if fmt == "torchscript":
        extra = {"medtl.json": ""}
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra["medtl.json"])
        with torch.no_grad():
            out = loaded(torch.from_numpy(x)).numpy()
    else:
        import onnx
        import onnxruntime as ort

        meta = {p.key.removeprefix("medtl."): p.value for p in onnx.load(str(path)).metadata_props}
        meta["output_names"] = json.loads(meta["output_names"])
        out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert meta["activation"] == "sigmoid" and meta["output_names"] == NAMES
    # the exported outputs are per-finding logits: their sigmoid is the scorer's raw finding probability
    raw = Scorer(trained, "cpu").score(x).raw
    np.testing.assert_allclose(expit(out), raw, atol=1e-4)
    assert not np.allclose(raw.sum(axis=1), 1.0)


def test_monitor_scores_the_champion_on_new_cases_per_finding(ml_ops: Path) -> None:
    from pipeline.config import load_config
    from pipeline.ingest.stage import read_manifest
    from pipeline.ops.nightly import monitor, status_lines
    from pipeline.ops.predict import ModelScorer
    from pipeline.ops.promotion import model_inputs
    from pipeline.ops.registry import Registry
    from pipeline.workspace import plan_stages

    cfg = load_config(ml_ops)
    plan = plan_stages(cfg)
    ws = ml_ops.parent / "ws"
    reg = Registry(ws)
    # a champion whose ingest folder is unknown: every labelled case of tonight counts as new to it
    champ = dict(reg.get(1), ingest="unknown")
    fig = monitor(cfg, plan, reg, champion=champ)
    rows = [r for r in read_manifest(Path(plan.ingest)) if r["label_index"] != ""]
    new = fig["champion_on_new"]
    assert fig["new_cases"] == len(rows) == new["n"] and set(new["mean_predicted"]) == set(NAMES)
    y = np.array([[int(v) for v in r["label"].split(";")] for r in rows], dtype=float)
    scorer = ModelScorer(ws, champ, cfg)
    p = scorer.score(model_inputs(scorer.spec, rows, ws))["calibrated"]  # its saved per-finding calibrators
    assert new["brier"] == pytest.approx(np.mean([np.mean((p[:, j] - y[:, j]) ** 2) for j in range(2)]))
    assert new["observed"] == pytest.approx({n: y[:, j].mean() for j, n in enumerate(NAMES)})
    assert fig["prevalence"] == pytest.approx(new["observed"]) and "accuracy" not in new
    assert any("Champion: model 1" in line for line in status_lines(ws))
