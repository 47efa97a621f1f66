"""Multilabel tasks (issue 17, point 4): findings that co-occur, one sigmoid output per finding.

Ingest reads one 0/1 column per finding (bad cells and partial rows are per-row problems, the run goes on),
the scorer takes the sigmoid path with per-finding calibrators, every finding is evaluated by the binary
code path (known answer: the same numbers as a binary evaluation of that column), and a tiny planted-signal
PNG dataset goes through ``medtl run`` end to end with a macro AUROC well above chance.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import DataConfig, TaskConfig

FINDINGS = {"eff_col": "effusion", "nod_col": "nodule"}


def _task() -> TaskConfig:
    return TaskConfig(kind="multilabel", classes=FINDINGS)


# ------------------------------------------------------------------------------------------------ config
def test_config_schema_and_refusals() -> None:
    task = _task()
    assert task.multilabel and task.class_names == ["effusion", "nodule"]
    assert task.finding_columns == {"effusion": "eff_col", "nodule": "nod_col"}
    assert task.positive_index is None
    with pytest.raises(ValueError, match="task.positive_class"):
        TaskConfig(kind="multilabel", classes=FINDINGS, positive_class="effusion")
    with pytest.raises(ValueError, match="at least 2"):
        TaskConfig(kind="multilabel", classes={"eff_col": "effusion"})
    with pytest.raises(ValueError, match="task.classes"):
        TaskConfig(kind="multilabel", classes={"eff_col": "effusion", " eff_col ": "other"})


def make_multilabel_dataset(root: Path, n: int = 160, seed: int = 0, extra_rows: str = "") -> None:
    """32 px grey PNGs with planted findings: a bright square top-left = effusion, bottom-right = nodule
    (independent, prevalence 40% and 30%), on noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["file,eff_col,nod_col"]
    for i in range(n):
        a, b = int(rng.random() < 0.4), int(rng.random() < 0.3)
        img = rng.normal(60, 15, (32, 32))
        if a:
            img[3:12, 3:12] += 120
        if b:
            img[20:29, 20:29] += 120
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"img_{i:03d}.png")
        lines.append(f"img_{i:03d}.png,{a},{b}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n" + extra_rows)


def _ml_config(root: Path, **overrides) -> Path:
    from tests.conftest import write_config

    task = {"task": {"kind": "multilabel", "classes": FINDINGS, "positive_class": None}}
    return write_config(root, **task, **overrides)


def test_training_refusals_name_the_field(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import ConfigError
    from pipeline.train.validation import multilabel_refusals, multilabel_training

    make_multilabel_dataset(tmp_path, n=4)
    cfg = load_config(_ml_config(tmp_path, train={"semi_supervised": "pseudo_label"}))
    assert [f for f, _ in multilabel_refusals(cfg)] == ["train.semi_supervised"]
    with pytest.raises(ConfigError, match="train.semi_supervised") as err:
        multilabel_training(cfg, _NullLog())
    assert err.value.code == "multilabel_unsupported"
    cfg = load_config(_ml_config(tmp_path, train={"strategy": "auto", "semi_supervised": "auto"}))
    log = _NullLog()
    candidates, semi = multilabel_training(cfg, log)
    assert "linear_probe" not in candidates and semi == "off" and len(log.lines) == 2
    cfg = load_config(_ml_config(tmp_path, train={"strategy": "linear_probe"}))
    assert [f for f, _ in multilabel_refusals(cfg)] == ["train.strategy"]


class _NullLog:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args) -> None:
        self.lines.append(msg % args)


# ------------------------------------------------------------------------------------------------ ingest
SECRET = "Jane Doe"


def test_ingest_reads_finding_columns_with_row_problems(tmp_path: Path) -> None:
    from pipeline.ingest.labels import label_index_of, multilabel_stratum, parse_multilabel, read_labels

    rows = [
        ("a.png", "1", "0"),
        ("b.png", "0.0", "TRUE"),
        ("c.png", "", ""),  # unlabelled
        ("d.png", SECRET, "1"),  # bad cell: line 5, column eff_col
        ("e.png", "1", ""),  # partial: line 6
        ("f.png", " 0 ", "false"),
    ]
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "eff_col", "nod_col"])
        w.writerows(rows)
    data = DataConfig(source=tmp_path, labels_csv=path, id_column="file", id_type="path")
    by_ref, problems = read_labels(data, _task())
    assert {r: v.label for r, v in by_ref.items()} == {
        "a.png": "1;0",
        "b.png": "0;1",
        "c.png": "",
        "f.png": "0;0",
    }
    assert not by_ref["c.png"].labelled
    codes = {p.row: p.code for p in problems}
    assert codes == {5: "bad_multilabel_value", 6: "partial_multilabel"}
    bad = next(p for p in problems if p.row == 5)
    assert "line 5" in bad.reason and "eff_col" in bad.reason and SECRET not in bad.reason
    assert SECRET in bad.detail  # the value goes to the private detail only
    partial = next(p for p in problems if p.row == 6)
    assert "nod_col" in partial.reason
    # the label_column is not required for a multilabel task; the finding columns are
    path.write_text("file,eff_col\na.png,1\n")
    with pytest.raises(Exception, match="nod_col"):
        read_labels(data, _task())
    # strata: 0 without finding, else 1 + the rarest positive finding
    assert parse_multilabel("0;1", 2) == [0, 1]
    assert multilabel_stratum([0, 0], [0.5, 0.1]) == 0
    assert multilabel_stratum([1, 1], [0.5, 0.1]) == 2 and multilabel_stratum([1, 0], [0.5, 0.1]) == 1
    assert label_index_of(by_ref["b.png"], _task(), [0.5, 0.1]) == 2
    assert label_index_of(by_ref["c.png"], _task(), [0.5, 0.1]) == ""


def test_split_strata_keep_every_finding_in_every_split() -> None:
    from pipeline.config import SplitConfig
    from pipeline.ingest.labels import multilabel_stratum
    from pipeline.ingest.splits import assign_splits

    rng = np.random.default_rng(0)
    y = (rng.random((400, 2)) < [0.3, 0.08]).astype(int)
    prev = y.mean(axis=0).tolist()
    strata = [multilabel_stratum(v, prev) for v in y]
    patients = [f"P{i:04d}" for i in range(len(y))]
    cfg = SplitConfig(val=0.2, calibration=0.2, test=0.2)
    splits = np.array(assign_splits(patients, [None] * len(y), b"k" * 32, cfg, labels=strata))
    for s in ("train", "val", "calibration", "test"):
        m = splits == s
        share = 0.4 if s == "train" else 0.2
        for j in range(2):  # the rare finding too: within a couple of cases of its share
            assert abs(y[m, j].sum() - share * y[:, j].sum()) <= 3, (s, j)


# ------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def ml_run(tmp_path_factory) -> Path:
    from tasks.cli import run_pipeline

    root = tmp_path_factory.mktemp("multilabel")
    # one bad cell and one partial row: per-row problems, the run goes on
    make_multilabel_dataset(root, extra_rows=f"img_bad.png,{SECRET},1\nimg_partial.png,1,\n")
    config = _ml_config(root, train={"epochs": 6, "batch_size": 16, "lr": 0.003, "patience": 6})
    assert run_pipeline(config) == 0
    return config


def _stage(config: Path, stage: str) -> Path:
    from pipeline.config import load_config
    from pipeline.workspace import plan_stages

    return Path(getattr(plan_stages(load_config(config)), stage))


def test_end_to_end_macro_auroc_well_above_chance(ml_run: Path) -> None:
    metrics = json.loads((_stage(ml_run, "evaluate") / "metrics.json").read_text())
    assert metrics["task"]["kind"] == "multilabel"
    macro = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]["macro_auroc"]
    assert macro["value"] > 0.8, macro
    assert macro["ci"][0] <= macro["value"] <= macro["ci"][1]
    assert set(metrics["per_finding"]) == {"effusion", "nodule"}
    for name, block in metrics["per_finding"].items():
        auc = block["evaluation"]["test"]["uncalibrated"]["discrimination"]["auroc"]
        assert auc["value"] > 0.7, (name, auc)
    assert metrics["conformal"]["methods"] == {} and "multilabel" in metrics["conformal"]["reason"]
    # the locked promotion holdout is handled as for single-label tasks: left out when usable, said either way
    hold = metrics["promotion_holdout"]
    assert "promotion_holdout" not in metrics.get("not_adapted", {}) and hold["note"]
    if hold["excluded_cases"]:
        assert hold["reported_cases"] == metrics["splits"]["test"]["cases"]
    info = json.loads((_stage(ml_run, "finetune") / "model_info.json").read_text())
    assert info["kind"] == "multilabel" and info["findings"] == ["effusion", "nodule"]
    report = json.loads((_stage(ml_run, "ingest") / "ingest_report.json").read_text())
    text = json.dumps(report)
    assert "bad_multilabel_value" in text and "partial_multilabel" in text and SECRET not in text
    train = report["splits"]["train"]["per_class"]  # positives per finding, not zeros
    assert train["effusion"] > 0 and train["nodule"] > 0


def test_end_to_end_report_has_the_per_finding_table(ml_run: Path) -> None:
    ev = _stage(ml_run, "evaluate")
    html = (ev / "report.html").read_text()
    assert "Per-finding performance" in html and "effusion" in html and "nodule" in html
    assert "macro AUROC" in html
    assert SECRET not in html
    card = (ev / "model_card.md").read_text()
    assert "effusion" in card and "macro AUROC" in card
    header = (ev / "predictions.csv").read_text().splitlines()[0].split(",")
    assert {"p_cal_effusion", "p_cal_nodule", "y_effusion"} <= set(header)


# ------------------------------------------------------------------------------------- scorer, calibration
def test_ensemble_and_tta_average_each_findings_probability() -> None:
    import torch
    from torch import nn

    from pipeline.trained.nets import FlipTTA, FoldEnsemble

    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(16, 3)) for _ in range(3)]
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(m(x)) for m in members]).mean(0)
        got = torch.sigmoid(FoldEnsemble(members, multilabel=True)(x))
        assert torch.allclose(got, want, atol=1e-5)
        assert not torch.allclose(got.sum(1), torch.ones(5))  # findings co-occur: no softmax
        tta = FlipTTA(members[0], (3,), multilabel=True)(x)
        flip = (torch.sigmoid(members[0](x)) + torch.sigmoid(members[0](x.flip(3)))) / 2
        assert torch.allclose(torch.sigmoid(tta), flip, atol=1e-5)
        # the single-label path is unchanged: log of the mean softmax
        soft = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
        assert torch.allclose(torch.exp(FoldEnsemble(members)(x)), soft, atol=1e-5)


def _synthetic_splits(seed: int = 0, n: int = 240):
    from pipeline.evaluate.summary import SplitPredictions

    rng = np.random.default_rng(seed)
    out = {}
    for s in ("val", "calibration", "test"):
        y = (rng.random((n, 2)) < [0.35, 0.2]).astype(np.int64)
        # finding 0 is over-confident (logits x4); finding 1 is weaker signal
        z = np.column_stack(
            [4.0 * (1.2 * (2 * y[:, 0] - 1) + rng.normal(0, 1, n)), 0.8 * y[:, 1] + rng.normal(0, 1, n)]
        )
        out[s] = SplitPredictions(
            z, y, np.array([f"P{s}{k // 2}" for k in range(n)]), np.array([f"C{s}{k}" for k in range(n)])
        )
    return out


def test_scorer_takes_the_sigmoid_path_with_per_finding_calibrators(tmp_path: Path) -> None:
    import torch
    from scipy.special import expit
    from torch import nn

    from pipeline.evaluate.multilabel import evaluate_multilabel
    from pipeline.evaluate.summary import EvalOptions
    from pipeline.trained.artefact import TrainedModel, save_calibrator
    from pipeline.trained.calibration import calibrator_from_state, calibrator_state
    from pipeline.trained.multilabel import MultilabelCalibrator, binary_logits
    from pipeline.trained.scorer import Scorer

    splits = _synthetic_splits()
    res = evaluate_multilabel(splits, ["effusion", "nodule"], EvalOptions(n_bootstrap=200), seed=3)
    cal = res.calibrator
    assert isinstance(cal, MultilabelCalibrator)
    assert res.metrics["calibration"]["per_finding"]["effusion"] == "temperature"
    t = cal.calibrators[0].temperature_
    assert t > 1.3  # the over-confident finding is softened
    z = splits["test"].logits
    np.testing.assert_allclose(cal.predict_proba(z)[:, 0], expit(z[:, 0] / t), atol=1e-9)
    for j, c in enumerate(cal.calibrators):  # each finding is its binary calibrator on [0, s_j]
        want = expit(z[:, j]) if c is None else c.predict_proba(binary_logits(z[:, j]))[:, 1]
        np.testing.assert_allclose(cal.predict_proba(z)[:, j], want)
    np.testing.assert_allclose(res.calibrated["test"], cal.predict_proba(z))
    again = calibrator_from_state(calibrator_state(cal))  # the JSON state rebuilds the same map
    np.testing.assert_allclose(again.predict_proba(z), cal.predict_proba(z))
    doc = save_calibrator(tmp_path, cal, {"model.pt": "abc"}, {"split": "calibration", "n_cases": 240})
    assert doc["method"] == "per_finding" and doc["state"]["method"] == "multilabel"

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    model = TrainedModel(
        info={"task": "multilabel", "class_names": ["effusion", "nodule"]}, network=net, files={}
    )
    scorer = Scorer(model, "cpu")
    x = np.random.default_rng(1).normal(size=(6, 1, 2, 2)).astype(np.float32)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy()
    s = scorer.score(x)
    np.testing.assert_allclose(s.raw, expit(logits), atol=1e-5)
    np.testing.assert_allclose(s.calibrated, s.raw)  # no calibrator: raw sigmoids
    model.calibrator = again
    np.testing.assert_allclose(scorer.score(x).calibrated, cal.predict_proba(s.logits), atol=1e-9)


def test_per_finding_metrics_equal_the_binary_metrics_of_each_column() -> None:
    import dataclasses

    from scipy.special import expit
    from sklearn.metrics import roc_auc_score

    from pipeline.evaluate.multilabel import binary_split, evaluate_multilabel, finding_seed, finding_task
    from pipeline.evaluate.summary import EvalOptions, evaluate_run

    splits = _synthetic_splits(seed=4)
    options = EvalOptions(calibration="platt", n_bootstrap=300)
    names = ["effusion", "nodule"]
    res = evaluate_multilabel(splits, names, options, seed=11)
    m = res.metrics
    test = splits["test"]
    aucs = []
    for j, name in enumerate(names):
        binary = evaluate_run(
            {s: binary_split(sp, j) for s, sp in splits.items()},
            finding_task(name),
            dataclasses.replace(options, conformal_alpha=None),
            seed=finding_seed(11, j),
        )
        assert m["per_finding"][name]["evaluation"] == binary.metrics["evaluation"]
        assert m["per_finding"][name]["calibration"] == binary.metrics["calibration"]
        d = m["per_finding"][name]["evaluation"]["test"]["uncalibrated"]
        want = roc_auc_score(test.y[:, j], test.logits[:, j])
        assert d["discrimination"]["auroc"]["value"] == pytest.approx(want)
        brier = np.mean((expit(test.logits[:, j]) - test.y[:, j]) ** 2)
        assert d["calibration"]["brier"]["value"] == pytest.approx(brier)
        assert "operating_points" in d and "ece" in d["calibration"]
        aucs.append(want)
    macro = m["evaluation"]["test"]["uncalibrated"]["discrimination"]["macro_auroc"]
    assert macro["value"] == pytest.approx(np.mean(aucs))
    assert macro["ci"][0] < macro["value"] < macro["ci"][1] and macro["ci_method"] == "cluster_bootstrap"
    assert m["conformal"]["methods"] == {} and m["task"]["kind"] == "multilabel"
    with pytest.raises(ValueError, match="one column per finding"):
        evaluate_multilabel({"test": splits["test"]}, ["a", "b", "c"], options, seed=1)


def test_end_to_end_predict_gives_per_finding_probabilities(ml_run: Path, tmp_path: Path) -> None:
    import shutil

    from pipeline.config import load_config
    from pipeline.ops.predict import predict_folder
    from pipeline.ops.registry import Registry

    cfg = load_config(ml_run)
    src = ml_run.parent / "images"
    inp = tmp_path / "new"
    inp.mkdir()
    for name in ("img_000.png", "img_001.png", "img_002.png"):
        shutil.copy(src / name, inp / name)
    row = Registry(Path(cfg.runtime.workspace)).get(1)
    summary = predict_folder(cfg, row, inp, tmp_path / "out")
    assert summary["scored"] == 3 and set(summary["predicted_prevalence"]) == {"effusion", "nodule"}
    with open(tmp_path / "out" / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"p_effusion", "p_nodule"} <= set(rows[0])
    assert all(r["predicted_class"] == "" and r["conformal_set"] == "" for r in rows)
    p = np.array([[float(r["p_effusion"]), float(r["p_nodule"])] for r in rows])
    assert ((p >= 0) & (p <= 1)).all() and not np.allclose(p.sum(axis=1), 1.0)


def test_preflight_names_absent_finding_columns_and_refused_settings(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    make_multilabel_dataset(tmp_path, n=6)
    cfg = load_config(_ml_config(tmp_path))
    assert preflight(cfg, models=False) == []  # data.label_column is not needed for a multilabel task
    (tmp_path / "labels.csv").write_text("file,eff_col\nimg_000.png,1\n")
    problems = preflight(cfg, models=False)
    assert [(p.field, p.code) for p in problems] == [("task.classes['nod_col']", "missing_column")]
    assert "nod_col" in problems[0].line()
    make_multilabel_dataset(tmp_path, n=6)
    cfg = load_config(
        _ml_config(
            tmp_path,
            train={"semi_supervised": "pseudo_label"},
            evaluate={"study_label_fractions": [0.5], "study_strategies": ["finetune"]},
        )
    )
    fields = {p.field: p.code for p in preflight(cfg, models=False)}
    assert fields == {
        "train.semi_supervised": "multilabel_unsupported",
        "evaluate.study_label_fractions": "multilabel_unsupported",
    }


def test_out_of_fold_probabilities_round_trip_through_the_sigmoid() -> None:
    from scipy.special import expit, softmax

    from pipeline.train.loop import _oof_logits

    p = np.array([[0.9, 0.2], [1e-15, 1.0], [0.5, 0.5]])
    np.testing.assert_allclose(expit(_oof_logits(p, True)), np.clip(p, 1e-12, 1 - 1e-7), atol=1e-9)
    q = np.array([[0.7, 0.3], [0.1, 0.9]])
    np.testing.assert_allclose(softmax(_oof_logits(q, False), axis=1), q)


def test_suggest_refuses_a_multilabel_task(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from pipeline.active.suggest import suggest_cases
    from pipeline.config import load_config
    from pipeline.errors import MedtlError

    make_multilabel_dataset(tmp_path, n=4)
    cfg = load_config(_ml_config(tmp_path))
    with pytest.raises(MedtlError, match="task.kind: multilabel") as err:
        suggest_cases(cfg, SimpleNamespace(augment=tmp_path, finetune=tmp_path), 5)
    assert err.value.code == "multilabel_unsupported"
