"""Nightly operation end to end on the tiny synthetic DICOM dataset: records, registry, champion/challenger,
retraining policy, predict, export, status, gc, notification."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.cli import main, run_pipeline
from tests.conftest import PHI_ID_PREFIX, PHI_NAME, PHI_PATH_WORD, make_dataset, square_image, write_dicom

pytestmark = pytest.mark.integration

OPS = {"promotion": {"min_auroc": 0.0, "min_holdout_cases": 5, "holdout_fraction": 0.5}, "retries": 0}
#: A linear probe learns the bright-square signal in a few cheap epochs (a usable champion).
TRAIN = {"strategy": "linear_probe", "epochs": 6, "batch_size": 16, "lr": 0.03, "patience": 6}


def write_config(root, **kw):
    from tests.conftest import write_config as base

    kw.setdefault("train", TRAIN)
    return base(root, **kw)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ops")
    make_dataset(root)
    config = write_config(root, ops=OPS)
    assert run_pipeline(config) == 0
    return config


def _reg(config: Path):
    from pipeline.ops.registry import Registry

    return Registry(config.parent / "ws")


def test_first_night_registers_and_promotes(project: Path) -> None:
    reg = _reg(project)
    models = reg.models()
    assert len(models) == 1
    m = models[0]
    assert m["status"] == "champion"
    assert m["code_version"] != "unknown" and m["packages"]["torch"] != "not installed"
    assert len(m["config_hash"]) == 12 and m["data_snapshot"]
    assert [e["action"] for e in reg.events(m["id"])] == ["registered", "promoted"]
    assert reg.events(m["id"])[1]["actor"] == "auto"
    (d,) = reg.decisions()
    assert d["challenger_id"] == m["id"] and d["champion_id"] is None and d["promoted"] == 1
    records = list((project.parent / "ws" / "runs").glob("*.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["retrain"]["train"] and rec["promotion"]["promoted"]
    assert records[0].name.startswith(rec["night"]) and rec["data_snapshot"] in records[0].name
    for rel in rec["stages"].values():
        assert (project.parent / "ws" / rel).is_dir()
    (run,) = reg.runs()
    assert run["status"] == "success" and run["record"] == f"runs/{records[0].name}"
    families = {e["task"] for e in reg.task_events(run["id"]) if e["event"] == "success"}
    assert {"Ingest", "Augment", "FineTune", "Evaluate", "Promote", "RunPipeline"} <= families


def test_rerun_same_night_is_noop_and_next_night_only_writes_a_record(project: Path, monkeypatch) -> None:
    from tasks.base import StageTask
    from tasks.ops import Promote
    from tasks.run import nightly_build

    ws = project.parent / "ws"
    n_runs = len(_reg(project).runs())

    def boom(self):
        raise AssertionError(f"{self.task_family}.run() called")

    monkeypatch.setattr(StageTask, "run", boom)
    monkeypatch.setattr(Promote, "run", boom)
    _, summary = nightly_build(project, {"local_scheduler": True, "log_level": "WARNING"})
    assert summary["status"] == "noop" and len(_reg(project).runs()) == n_runs
    _, summary = nightly_build(project, {"local_scheduler": True, "log_level": "WARNING"}, night="2099-01-01")
    assert summary["status"] == "success", summary
    rec = json.loads((ws / summary["record"]).read_text())
    assert rec["night"] == "2099-01-01"
    assert rec["promotion"] is None or rec["promotion"].get("promoted") is not None
    assert len(_reg(project).models()) == 1  # nothing retrained


def test_status_command(project: Path, capsys) -> None:
    assert main(["status", str(project)]) == 0
    out = capsys.readouterr().out
    assert "success" in out and "Champion: model 1" in out and "locked holdout" in out


def test_models_list_and_manual_promotion_is_audited(project: Path, capsys) -> None:
    assert main(["models", "list", str(project)]) == 0
    assert "champion" in capsys.readouterr().out
    assert (
        main(["models", "promote", str(project), "1", "--reason", "re-affirmed by QA", "--by", "qa-lead"])
        == 0
    )
    ev = _reg(project).events(1)[-1]
    assert (ev["action"], ev["actor"], ev["reason"]) == ("promoted", "qa-lead", "re-affirmed by QA")
    assert main(["models", "promote", str(project), "1", "--reason", " "]) == 2


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_pytorch(project: Path, tmp_path: Path, fmt: str) -> None:
    from pipeline.ops.export import export_model

    res = export_model(project.parent / "ws", _reg(project).get(1), fmt, tmp_path)
    assert res["max_abs_difference"] <= 1e-4
    assert (tmp_path / res["file"]).stat().st_size > 1000
    assert res["preprocessing"]["image_size"] == 32


def test_predict_calibrated_sets_and_ood(project: Path, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.ops.predict import ModelScorer, predict_folder

    r = np.random.default_rng(5)
    new = tmp_path / "new"
    for i in range(4):
        write_dicom(
            new / f"{PHI_PATH_WORD}_n{i}" / "a.dcm", square_image(r, i % 2 == 0), f"{PHI_ID_PREFIX}9{i}"
        )
    # an out-of-distribution scan: very bright, another modality
    from pydicom import dcmread

    write_dicom(new / "odd" / "b.dcm", square_image(r, False), f"{PHI_ID_PREFIX}999")
    ds = dcmread(new / "odd" / "b.dcm")
    ds.Modality = "MR"
    ds.save_as(new / "odd" / "b.dcm")
    cfg = load_config(project)
    ws = project.parent / "ws"
    model = _reg(project).get(1)
    summary = predict_folder(cfg, model, new, tmp_path / "out")
    assert summary["scored"] == 5
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "predictions.csv").read_text())))
    assert all(r["case_id"].startswith("C") and r["patient_id"].startswith("P") for r in rows)
    p = np.array([[float(r["p_normal"]), float(r["p_lesion"])] for r in rows])
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    sets = [set(filter(None, r["conformal_set"].split("|"))) for r in rows]
    assert all(st <= {"normal", "lesion"} for st in sets) and any(sets)  # LAC sets may be empty
    flagged = [r for r in rows if r["ood_flags"]]
    assert len(flagged) == 1 and "modality not seen in training" in flagged[0]["ood_flags"]
    assert "MR" not in flagged[0]["ood_flags"]  # the new case's tag value is never copied out
    # the refitted calibrator is the one the Evaluate stage reported
    scorer = ModelScorer(ws, model, cfg)
    metrics = json.loads(next((ws / "evaluate").glob(f"{model['evaluate']}/metrics.json")).read_text())
    t = metrics["calibration"]["parameters"]["temperature"]
    assert scorer.calibrator.temperature_ == pytest.approx(t, rel=1e-6)
    text = (tmp_path / "out" / "predictions.json").read_text() + (
        tmp_path / "out" / "predictions.csv"
    ).read_text()
    for needle in (PHI_NAME, PHI_ID_PREFIX, PHI_PATH_WORD, str(new)):
        assert needle not in text


def test_predict_cli_records_drift(project: Path, tmp_path: Path, capsys) -> None:
    r = np.random.default_rng(7)
    for i in range(3):
        write_dicom(tmp_path / "in" / f"x{i}.dcm", square_image(r, True), f"{PHI_ID_PREFIX}8{i}")
    assert (
        main(["predict", str(project), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "o")]) == 0
    )
    d = _reg(project).drift("predict")[-1]["figures"]
    assert (
        d["n"] == 3 and 0.0 <= d["ood_rate"] <= 1.0 and set(d["predicted_prevalence"]) == {"normal", "lesion"}
    )


def test_shuffled_label_challenger_is_never_promoted(project: Path, monkeypatch) -> None:
    """A challenger trained on permuted training labels is evaluated against the champion and rejected."""
    import shutil

    import tasks.finetune as ft
    from pipeline.train.loop import run_finetune as real

    def shuffled(cfg, augment_dir, out_dir, work_dir, progress=False):
        tmp = Path(str(out_dir) + "-shuffled-augment")
        shutil.copytree(augment_dir, tmp)
        rows = list(csv.DictReader(open(tmp / "index.csv")))
        train = [i for i, r in enumerate(rows) if r["split"] == "train"]
        true = np.array([int(rows[i]["label_index"]) for i in train])
        # A permutation keeps some chance agreement with the truth, and a strong signal is learnt even
        # from weakly agreeing labels; take the first seed whose labels do not agree more than chance.
        for seed in range(100):
            perm = np.random.default_rng(seed).permutation(true)
            if np.corrcoef(perm, true)[0, 1] <= 0:
                break
        perm = perm.astype(str)
        for i, lab in zip(train, perm, strict=True):
            rows[i]["label_index"] = lab
        with open(tmp / "index.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        try:
            return real(cfg, tmp, out_dir, work_dir, progress)
        finally:
            shutil.rmtree(tmp)

    monkeypatch.setattr(ft, "run_finetune", shuffled)
    config = write_config(project.parent, ops=OPS, train={**TRAIN, "seed": 7})
    try:
        assert run_pipeline(config) == 0
        reg = _reg(project)
        challenger = reg.models()[-1]
        assert challenger["id"] != 1 and challenger["status"] == "rejected"
        assert reg.champion()["id"] == 1
        d = reg.decisions()[-1]
        assert d["challenger_id"] == challenger["id"] and d["champion_id"] == 1 and d["promoted"] == 0
        det = d["details"]
        # Rejected for a stated reason: the AUROC difference bound or a worse Brier score (on a few test
        # cases a permuted-label model can tie the champion's AUROC, but never passes both rules).
        assert det["reasons"]
        assert (
            det["difference_ci"][0] <= -det["auroc_margin"]
            or det["brier_challenger"] > det["brier_champion"] + det["brier_margin"]
        )
        assert d["evaluated_on"] in ("holdout", "test") and det["n_cases"] >= 5
    finally:
        write_config(project.parent, ops=OPS)


def test_retrain_policy_skips_training_for_few_new_cases(project: Path) -> None:
    root = project.parent
    r = np.random.default_rng(11)
    rows = (root / "labels.csv").read_text()
    for i in range(2):
        rel = f"new_{i}/img.dcm"
        write_dicom(root / "images" / rel, square_image(r, i == 0), f"NEWPAT{i}")
        rows += f"{rel},{'lesion' if i == 0 else 'normal'}\n"
    (root / "labels.csv").write_text(rows)
    config = write_config(root, ops={**OPS, "retrain": {"min_new_cases": 50}})
    try:
        n_models = len(_reg(project).models())
        assert run_pipeline(config) == 0
        rec = max((root / "ws" / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
        rec = json.loads(rec.read_text())
        assert rec["retrain"]["train"] is False and rec["retrain"]["new_cases"] == 2
        assert set(rec["stages"]) == {"ingest"} and len(_reg(project).models()) == n_models
        assert rec["drift"]["new_cases"] == 2 and rec["drift"]["champion_on_new"]["n"] == 2
        config = write_config(root, ops={**OPS, "retrain": {"min_new_cases": 2}})
        from pipeline.config import load_config
        from pipeline.ops.nightly import retrain_decision
        from pipeline.workspace import plan_stages

        cfg = load_config(config)
        dec = retrain_decision(cfg, plan_stages(cfg), _reg(project))
        assert dec["train"] and "2 new labelled case(s)" in dec["reasons"][0]
    finally:
        write_config(root, ops=OPS)


def test_notify_failures_keep_exit_status(project: Path, tmp_path: Path) -> None:
    from pipeline.config import NotifyConfig
    from pipeline.ops.notify import notify

    out = tmp_path / "got.json"
    ok = notify(
        NotifyConfig(
            command=[
                sys.executable,
                "-c",
                f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())",
            ]
        ),
        {"status": "success", "promoted": True},
    )
    assert ok == [] and json.loads(out.read_text())["promoted"] is True
    warns = notify(
        NotifyConfig(
            command=[sys.executable, "-c", "raise SystemExit(1)"],
            webhook="http://127.0.0.1:9/hook",
            timeout_s=2,
        ),
        {"status": "success"},
    )
    assert len(warns) == 2 and "exited with status 1" in warns[0] and "webhook" in warns[1]
    # through the CLI: a failing hook on a no-op night leaves exit status 0
    config = write_config(
        project.parent,
        ops={
            **OPS,
            "retrain": {"min_new_cases": 50},
            "notify": {"command": [sys.executable, "-c", "raise SystemExit(1)"]},
        },
    )
    try:
        assert run_pipeline(config) == 0
    finally:
        write_config(project.parent, ops=OPS)


def test_gc_keeps_what_registered_models_need(project: Path) -> None:
    from pipeline.config import RetentionPolicy
    from pipeline.ops.gc import run_gc

    ws = project.parent / "ws"
    junk = ws / "augment" / ".deadbeef.tmp-abc"
    junk.mkdir(parents=True)
    (junk / "x.npy").write_bytes(b"0" * 10)
    res = run_gc(ws, RetentionPolicy(keep_runs=1, cache_days=0))
    assert "augment/.deadbeef.tmp-abc" in res["remove"] and not junk.exists()
    from pipeline.ops.registry import Registry

    for m in Registry(ws).models():
        if m["status"] in ("champion", "candidate"):
            for s in ("ingest", "augment", "finetune", "evaluate"):
                assert (ws / s / m[s]).is_dir()
            import pipeline.ingest.stage as st

            for row in st.read_manifest(ws / "ingest" / m["ingest"]):
                assert (ws / "cache" / "volumes" / row["volume"]).is_file()
    rejected = [m for m in Registry(ws).models() if m["status"] == "rejected"]
    assert rejected and not (ws / "finetune" / rejected[0]["finetune"]).exists()


def test_registry_holds_no_identifiers(project: Path) -> None:
    ws = project.parent / "ws"
    needles = [
        PHI_NAME.encode(),
        PHI_ID_PREFIX.encode(),
        PHI_PATH_WORD.encode(),
        b"St Planted Hospital",
        b"19230101",
    ]
    for p in list((ws / "ops").rglob("*")) + list((ws / "runs").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            for n in needles:
                assert n not in data, (n, p)
    con = sqlite3.connect(ws / "ops" / "registry.sqlite")
    assert con.execute("SELECT count(*) FROM models").fetchone()[0] >= 1


def test_altered_registered_model_is_refused_everywhere(project: Path, tmp_path: Path) -> None:
    """The registry records the sha256 of every model file: a model.pt replaced together with a matching
    model_info.json (so the artefact's own record agrees) is still refused by predict, export and promotion."""
    import shutil

    import torch

    from pipeline.config import load_config
    from pipeline.ops.export import export_model
    from pipeline.ops.predict import ModelScorer
    from pipeline.ops.promotion import score_model
    from pipeline.trained.artefact import TrainedModelError, file_sha256
    from pipeline.workspace import plan_stages

    ws = project.parent / "ws"
    model = _reg(project).get(1)
    assert set(model["files"]) == {"model.pt", "model_info.json", "calibrator.json"}
    ft = ws / "finetune" / model["finetune"]
    backup = tmp_path / "backup"
    shutil.copytree(ft, backup)
    try:
        sd = torch.load(ft / "model.pt", weights_only=True)
        key = next(k for k, v in sd.items() if v.is_floating_point())
        sd[key] = sd[key] * 0.5
        torch.save(sd, ft / "model.pt")
        info = json.loads((ft / "model_info.json").read_text())
        info["files"]["model.pt"] = file_sha256(ft / "model.pt")  # an attacker fixes the artefact's record
        (ft / "model_info.json").write_text(json.dumps(info))
        cfg = load_config(project)
        plan = plan_stages(cfg)
        for use in (
            lambda: ModelScorer(ws, model, cfg),
            lambda: export_model(ws, model, "torchscript", tmp_path / "x"),
            lambda: score_model(cfg, ws, model, plan.augment, plan.ingest),
        ):
            with pytest.raises(TrainedModelError) as err:
                use()
            assert err.value.code == "model_digest_mismatch" and "registry" in str(err.value)
    finally:
        shutil.rmtree(ft)
        shutil.copytree(backup, ft)
    ModelScorer(ws, model, load_config(project))  # restored: accepted again


def test_validate_on_an_external_source(project: Path, tmp_path: Path, capsys) -> None:
    """`medtl validate`: a second labelled source (other patients, same signal) is scored with the champion
    and measured with the report's intervals beside the internal test set; CSV rows that name no scan, scans
    without a row, empty and unknown labels are counted, never copied; no identifier reaches the outputs."""
    ext = make_dataset(tmp_path / "ext", n_patients=36, seed=11)
    lines = (ext / "labels.csv").read_text().splitlines()
    lines[1] = lines[1].split(",")[0] + ","  # an empty label: unlabelled
    lines[2] = lines[2].split(",")[0] + ",maybe"  # not a class: refused by row number
    del lines[3]  # a scan without a row
    lines.append(f"{PHI_PATH_WORD}_9999/img.dcm,lesion")  # a row without a scan
    (ext / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "val"
    argv = ["validate", str(project), "--input", str(ext / "images"), "--labels", str(ext / "labels.csv")]
    assert main(argv + ["--output", str(out)]) == 0
    assert "External validation of model 1: 33 labelled case(s) of 36 scored" in capsys.readouterr().out
    doc = json.loads((out / "external_validation.json").read_text())
    assert doc["counts"] == {
        "scored": 36,
        "labelled": 33,
        "unlabelled": 1,
        "no_label_row": 2,
        "label_rows_without_case": 1,
    }
    assert doc["problems"]["labels_csv"] == [{"row": 3, "code": "unknown_label"}]
    auroc = doc["calibrated"]["discrimination"]["auroc"]
    assert auroc["value"] > 0.8 and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert auroc["ci_method"] == "delong_logit_t"
    diff = doc["auroc_difference"]
    assert diff["value"] == pytest.approx(diff["external"] - diff["internal"])
    assert diff["ci"][0] <= diff["value"] <= diff["ci"][1] and diff["verdict"] in (
        "no evidence of a difference",
        "lower externally",
        "higher externally",
    )
    html = (out / "external_validation.html").read_text()
    assert "External validation" in html and "nothing was refitted" in html
    text = (
        html
        + (out / "external_validation.json").read_text()
        + (out / "scored" / "predictions.csv").read_text()
    )
    for needle in (PHI_NAME, PHI_ID_PREFIX, PHI_PATH_WORD, str(ext), "maybe"):
        assert needle not in text


def test_evaluate_external_source_in_the_report(project: Path, tmp_path: Path) -> None:
    """`evaluate.external`: a second labelled source is scored in Evaluate with this run's model and the
    calibrator it has just fitted (nothing refitted), the report gains its section, the model is the
    same, and no identifier reaches the outputs. (Last in this file: the run registers a second model.)"""
    import yaml

    from pipeline.config import load_config
    from pipeline.workspace import plan_stages

    ext = make_dataset(tmp_path / "ext2", n_patients=30, seed=12)
    cfg = yaml.safe_load(project.read_text())
    cfg["evaluate"]["external"] = [
        {"name": "siteB", "source": str(ext / "images"), "labels_csv": str(ext / "labels.csv")}
    ]
    path = project.parent / "config_external.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["run", str(path)]) == 0
    plan, base = plan_stages(load_config(path)), plan_stages(load_config(project))
    assert plan.finetune == base.finetune  # the same model: the source is not part of training
    ev = plan.evaluate
    assert ev != base.evaluate  # but it is part of Evaluate's digest
    metrics = json.loads((ev / "metrics.json").read_text())
    (src,) = metrics["external"]
    assert src["name"] == "siteB" and src["counts"]["scored"] == 30 and src["counts"]["labelled"] == 30
    auroc = src["metrics"]["discrimination"]["auroc"]
    assert auroc["value"] > 0.8 and auroc["ci"][0] <= auroc["value"] <= auroc["ci"][1]
    assert src["auroc_difference"]["verdict"] in (
        "no evidence of a difference",
        "lower externally",
        "higher externally",
    )
    html = (ev / "report.html").read_text()
    assert (
        "Robustness and external validation" in html and "Source &#39;siteB&#39;: 30 case(s) scored" in html
    )
    text = html + (ev / "metrics.json").read_text() + (ev / "model_card.md").read_text()
    text += (ev / "external" / "siteB" / "scored" / "predictions.csv").read_text()
    for needle in (PHI_NAME, PHI_ID_PREFIX, PHI_PATH_WORD, str(ext)):
        assert needle not in text
