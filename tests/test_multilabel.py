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
    assert {r: v.label for r, v in by_ref.items()} == {"a.png": "1;0", "b.png": "0;1", "c.png": "", "f.png": "0;0"}
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
    info = json.loads((_stage(ml_run, "finetune") / "model_info.json").read_text())
    assert info["kind"] == "multilabel" and info["findings"] == ["effusion", "nodule"]
    report = json.loads((_stage(ml_run, "ingest") / "ingest_report.json").read_text())
    text = json.dumps(report)
    assert "bad_multilabel_value" in text and "partial_multilabel" in text and SECRET not in text


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
