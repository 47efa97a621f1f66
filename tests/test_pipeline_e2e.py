"""The Luigi chain end to end on a tiny synthetic DICOM dataset (real EfficientNet-Lite0 weights, 32 px)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tasks.base import StageTask
from tasks.cli import run_pipeline
from tasks.run import RunPipeline
from tests.conftest import PHI_ID_PREFIX, PHI_NAME, PHI_PATH_WORD

pytestmark = pytest.mark.integration


def _outputs(ws: Path) -> dict[str, int]:
    return {str(p.relative_to(ws)): p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from tests.conftest import make_dataset, write_config

    root = tmp_path_factory.mktemp("e2e")
    make_dataset(root)
    config = write_config(root)
    assert run_pipeline(config) == 0
    return config


def test_chain_writes_every_stage_output(finished_run: Path) -> None:
    ws = finished_run.parent / "ws"
    for stage, files in {
        "ingest": ["manifest.csv", "ingest_report.json"],
        "augment": ["index.csv", "transform_spec.json", "preview.png"],
        "finetune": ["model.pt", "model_info.json", "history.csv", "train_summary.json"],
        "evaluate": ["metrics.json", "report.html", "report.pdf", "model_card.md", "predictions.csv"],
    }.items():
        dirs = [d for d in (ws / stage).iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert len(dirs) == 1, (stage, dirs)
        for f in files:
            assert (dirs[0] / f).stat().st_size > 0, (stage, f)
    runs = list((ws / "runs").glob("*.json"))
    assert len(runs) == 1
    nightly_html = runs[0].with_suffix(".html").read_text()
    assert "Champion / challenger decision" in nightly_html and "promoted" in nightly_html
    record = json.loads(runs[0].read_text())
    assert set(record["stages"]) == {"ingest", "augment", "finetune", "evaluate"}
    metrics = json.loads(next((ws / "evaluate").glob("*/metrics.json")).read_text())
    auroc = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]["auroc"]
    assert auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    html = next((ws / "evaluate").glob("*/report.html")).read_text()
    assert "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html


def test_rerun_executes_no_task_and_touches_nothing(finished_run: Path, monkeypatch) -> None:
    ws = finished_run.parent / "ws"
    before = _outputs(ws)

    def boom(self) -> None:  # any run() call fails the test
        raise AssertionError(f"{self.task_family}.run() was called on a finished workspace")

    monkeypatch.setattr(StageTask, "run", boom)
    monkeypatch.setattr(RunPipeline, "run", boom)
    assert run_pipeline(finished_run) == 0
    assert _outputs(ws) == before


def test_changing_training_option_keeps_ingest_and_augment(finished_run: Path) -> None:
    from pipeline.config import load_config
    from pipeline.workspace import plan_stages

    base = plan_stages(load_config(finished_run))
    changed = plan_stages(load_config(finished_run, overrides={"train": {"lr": 0.0005}}))
    assert (changed.ingest, changed.augment) == (base.ingest, base.augment)
    assert changed.finetune != base.finetune and changed.evaluate != base.evaluate
    ev = plan_stages(load_config(finished_run, overrides={"evaluate": {"ece_bins": 10}}))
    assert ev.finetune == base.finetune and ev.evaluate != base.evaluate


def test_no_identifier_outside_private(finished_run: Path) -> None:
    """Planted PatientName, PatientID, accession, institution and path words appear only under private/."""
    ws = finished_run.parent / "ws"
    needles = [PHI_NAME.encode(), PHI_NAME.replace("^", " ").encode(), PHI_ID_PREFIX.encode(),
               f"ACC{PHI_ID_PREFIX}".encode(), b"St Planted Hospital", PHI_PATH_WORD.encode(), b"19230101",
               b"Johnathan", str(finished_run.parent / "images").encode()]
    private = ws / "private"
    assert private.is_dir() and (private.stat().st_mode & 0o777) == 0o700
    checked = 0
    for p in ws.rglob("*"):
        if not p.is_file() or private in p.parents:
            continue
        data = p.read_bytes()
        if p.suffix == ".gz":
            data = gzip.decompress(data)
        for n in needles:
            assert n not in data, f"{n!r} found in {p.relative_to(ws)}"
        checked += 1
    assert checked > 20
    # ... and the private mapping does hold the source paths (so QA can trace a case)
    assert any(PHI_PATH_WORD.encode() in f.read_bytes() for f in private.rglob("*") if f.is_file())


def test_fold_ensemble_val_predictions_are_out_of_fold(tmp_path: Path) -> None:
    """A k-fold ensemble trained on the val cases: Evaluate scores val with each case's out-of-fold model."""
    import csv

    import numpy as np

    from pipeline.config import load_config
    from pipeline.train.loop import load_oof
    from pipeline.workspace import plan_stages
    from tests.conftest import make_dataset, write_config

    make_dataset(tmp_path)
    config = write_config(tmp_path, train={"folds": 2, "epochs": 1, "batch_size": 16, "lr": 0.003})
    assert run_pipeline(config) == 0
    plan = plan_stages(load_config(config))
    oof = load_oof(plan.finetune)
    assert oof is not None
    with open(plan.evaluate / "predictions.csv") as fh:
        val = [r for r in csv.DictReader(fh) if r["split"] == "val"]
    assert val
    for r in val:
        p = np.exp(oof[r["case_id"]])
        p = p / p.sum()
        assert abs(float(r["p_raw_lesion"]) - p[1]) < 1e-5
