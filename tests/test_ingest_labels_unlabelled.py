"""Unlabelled cases through the Ingest stage, and the split ledger across runs: unlabelled cases are
decoded, cached and counted but never held out; a patient seen unlabelled goes to train when labelled and
nobody else moves; all-unlabelled data stops with a clear error; a labels row naming no file is reported
by its line; an existing workspace keeps its splits; ``split.stratify_by`` values stay private."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import IngestError
from pipeline.ingest.stage import read_manifest, run_ingest
from tests.conftest import PHI_ID_PREFIX, PHI_PATH_WORD, make_dataset, square_image, write_config, write_dicom

HELD_OUT = {"val", "calibration", "test"}


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


def _labels(root: Path) -> list[dict[str, str]]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_labels(root: Path, rows: list[dict[str, str]]) -> None:
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def _run(root: Path, name: str, **overrides) -> tuple[dict, list[dict[str, str]]]:
    cfg = load_config(write_config(root, deid={"key_env": "MEDTL_TEST_KEY"}, **overrides))
    ws = root / "ws"
    out = ws / "ingest" / name
    out.mkdir(parents=True)
    return run_ingest(cfg, out, ws), read_manifest(out)


def _split_of(manifest: list[dict[str, str]]) -> dict[str, str]:
    return {r["patient_id"]: r["split"] for r in manifest if r["split"] != "unlabelled"}


def test_unlabelled_cases_are_ingested_counted_and_never_held_out(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=40)
    rows = _labels(tmp_path)
    for r in rows[:6]:
        r["diagnosis"] = ""  # empty label cell
    _write_labels(tmp_path, rows[:-4])  # the last four files have no row at all
    report, manifest = _run(tmp_path, "a")
    unl = [r for r in manifest if r["split"] == "unlabelled"]
    assert len(unl) == 10 and len(manifest) == 40
    assert all(r["label_index"] == "" and r["label"] == "" and r["class_name"] == "" for r in unl)
    assert all(
        r["split"] in HELD_OUT | {"train"} and r["label_index"] in ("0", "1")
        for r in manifest
        if r not in unl
    )
    # decoded and cached like the rest
    assert all((tmp_path / "ws" / "cache" / "volumes" / r["volume"]).is_file() for r in unl)
    assert report["unlabelled"]["cases"] == 10 and report["unlabelled"]["patients"] == 10
    assert report["cases"] == 40
    assert "no_label" not in report["problems_by_code"] and "missing_label" not in report["problems_by_code"]
    assert sum(d["cases"] for d in report["splits"].values()) == 30
    for d in report["splits"].values():
        assert sum(d["per_class_patients"].values()) == d["patients"]


def test_unlabelled_patient_later_labelled_goes_to_train_and_nobody_moves(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=40)
    rows = _labels(tmp_path)
    late = rows[:8]
    for r in late:
        r["diagnosis"] = ""
    _write_labels(tmp_path, rows)
    _, first = _run(tmp_path, "a")
    before = _split_of(first)
    late_patients = {r["patient_id"] for r in first if r["split"] == "unlabelled"}
    assert len(late_patients) == 8 and not late_patients & set(before)
    # the next run: the eight get their labels, and ten new labelled patients arrive
    fresh = make_dataset(tmp_path / "more", n_patients=50)
    for r in _labels(fresh)[40:]:
        src = fresh / "images" / r["file"]
        dst = tmp_path / "images" / ("new_" + r["file"])
        dst.parent.mkdir(parents=True)
        os.replace(src, dst)
        rows.append({"file": "new_" + r["file"], "diagnosis": r["diagnosis"]})
    for i, r in enumerate(late):
        r["diagnosis"] = "lesion" if i % 3 == 0 else "normal"
    _write_labels(tmp_path, rows)
    report, second = _run(tmp_path, "b")
    after = _split_of(second)
    assert all(after[p] == "train" for p in late_patients)
    assert all(after[p] == s for p, s in before.items()), "a labelled patient moved"
    assert len(after) == 50 and report["unlabelled"]["cases"] == 0


def test_all_cases_unlabelled_is_a_clear_error(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=12)
    _write_labels(tmp_path, [dict(r, diagnosis="") for r in _labels(tmp_path)])
    with pytest.raises(IngestError) as e:
        _run(tmp_path, "a")
    assert e.value.code == "no_labelled_cases"
    assert "no labelled training cases" in str(e.value) and "12 unlabelled" in str(e.value)
    assert PHI_PATH_WORD not in str(e.value)


def test_row_for_a_missing_file_is_reported_by_line_and_the_run_goes_on(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=20)
    rows = _labels(tmp_path)
    rows.insert(3, {"file": f"{PHI_PATH_WORD}_gone/img.dcm", "diagnosis": "lesion"})
    _write_labels(tmp_path, rows)
    report, manifest = _run(tmp_path, "a")
    assert len(manifest) == 20
    missing = [p for p in report["problems"] if p["code"] == "label_without_case"]
    assert len(missing) == 1 and missing[0]["row"] == 5 and "line 5" in missing[0]["reason"]
    text = (tmp_path / "ws" / "ingest" / "a" / "ingest_report.json").read_text()
    assert PHI_PATH_WORD not in text and PHI_ID_PREFIX not in text


def test_existing_workspace_keeps_its_assignments(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=40)
    _, first = _run(tmp_path, "a")
    ledger = tmp_path / "ws" / "private" / "splits" / "ledger.json"
    assert ledger.is_file()
    # an older workspace: its manifest made by another rule (swap two patients' splits), no ledger yet
    pats = sorted({r["patient_id"] for r in first})
    by = {r["patient_id"]: r["split"] for r in first}
    a = next(p for p in pats if by[p] == "train")
    b = next(p for p in pats if by[p] == "test")
    edited = [dict(r, split={a: "test", b: "train"}.get(r["patient_id"], r["split"])) for r in first]
    path = tmp_path / "ws" / "ingest" / "a" / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(edited[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(edited)
    ledger.unlink()
    more = make_dataset(tmp_path / "more", n_patients=45)
    rows = _labels(tmp_path)
    for r in _labels(more)[40:]:
        dst = tmp_path / "images" / ("new_" + r["file"])
        dst.parent.mkdir(parents=True)
        os.replace(more / "images" / r["file"], dst)
        rows.append({"file": "new_" + r["file"], "diagnosis": r["diagnosis"]})
    _write_labels(tmp_path, rows)
    _, second = _run(tmp_path, "b")
    after = _split_of(second)
    assert after[a] == "test" and after[b] == "train"
    assert all(after[r["patient_id"]] == r["split"] for r in edited)


def test_ledger_is_private_and_stratify_values_stay_out_of_shared_outputs(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=36)
    rows = [
        dict(r, site=f"Hospital_{'North' if i % 2 else 'South'}") for i, r in enumerate(_labels(tmp_path))
    ]
    _write_labels(tmp_path, rows)
    report, manifest = _run(tmp_path, "a", split={"stratify_by": ["site"]})
    ws = tmp_path / "ws"
    ledger = ws / "private" / "splits" / "ledger.json"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o700
    text = ledger.read_text()
    assert "Hospital" not in text and PHI_ID_PREFIX not in text and PHI_PATH_WORD not in text
    entries = json.loads(text)["patients"]
    assert set(entries) == {r["patient_id"] for r in manifest}
    assert len({e["stratum"] for e in entries.values()}) == 2
    shared = (ws / "ingest" / "a" / "ingest_report.json").read_text() + (
        ws / "ingest" / "a" / "manifest.csv"
    ).read_text()
    assert "Hospital" not in shared
    assert "stratify_by" in report["split_rule"]


def test_a_new_unlabelled_file_is_decoded_incrementally(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=20)
    _run(tmp_path, "a")
    write_dicom(
        tmp_path / "images" / "extra" / "img.dcm", square_image(np.random.default_rng(5), True), "MRN77X"
    )
    report, manifest = _run(tmp_path, "b")
    assert report["incremental"]["volumes_decoded"] == 1 and report["incremental"]["volumes_reused"] == 20
    assert report["unlabelled"]["cases"] == 1 and sum(r["split"] == "unlabelled" for r in manifest) == 1


def test_consumers_take_unlabelled_rows(tmp_path: Path) -> None:
    """Augment caches them, supervised loading skips them, the semi-supervised loader finds them, and the
    nightly drift figures count them apart from the labelled prevalence."""
    from types import SimpleNamespace

    from pipeline.augment.stage import read_index, run_augment
    from pipeline.ops.nightly import monitor
    from pipeline.ops.registry import Registry
    from pipeline.train.data import load_split
    from pipeline.train.semi import load_unlabelled

    make_dataset(tmp_path, n_patients=24)
    rows = _labels(tmp_path)
    for r in rows[:5]:
        r["diagnosis"] = ""
    _write_labels(tmp_path, rows)
    report, manifest = _run(tmp_path, "a", augment={"preview": 0})
    cfg = load_config(tmp_path / "config.yaml")
    ws = tmp_path / "ws"
    aug = ws / "augment" / "a"
    aug.mkdir(parents=True)
    run_augment(cfg, ws / "ingest" / "a", aug, ws)
    index = read_index(aug)
    unl = [r for r in index if r["split"] == "unlabelled"]
    assert len(unl) == 5 and all(r["label_index"] == "" for r in unl)
    assert all((aug / "tensors" / f"{r['case_id']}.npy").is_file() for r in unl)
    train = load_split(aug, index, "train")
    assert not set(train.case_ids) & {r["case_id"] for r in unl}
    data, left_out = load_unlabelled(aug, index)
    assert len(data) + left_out == 5 and len(data) == 5
    fig = monitor(cfg, SimpleNamespace(workspace=ws, ingest=ws / "ingest" / "a"), Registry(ws))
    assert fig["n_unlabelled"] == 5 and fig["n_cases"] == 19
    assert abs(sum(fig["prevalence"].values()) - 1.0) < 1e-9


def test_unlabelled_case_of_a_ledger_held_out_patient_is_left_out(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=30)
    _, first = _run(tmp_path, "a")
    case = next(r for r in first if r["split"] == "test")
    with open(tmp_path / "ws" / "private" / "ingest" / "a" / "source_map.csv", newline="") as fh:
        files = {r["case_id"]: r["files"] for r in csv.DictReader(fh)}
    rel = Path(files[case["case_id"]]).relative_to(tmp_path / "images").as_posix()
    # the patient's only case loses its label; the ledger still holds the patient in test
    _write_labels(
        tmp_path, [dict(r, diagnosis="" if r["file"] == rel else r["diagnosis"]) for r in _labels(tmp_path)]
    )
    report, manifest = _run(tmp_path, "b")
    assert case["patient_id"] not in {r["patient_id"] for r in manifest}
    assert report["unlabelled"]["left_out_held_out_patient"] == 1 and report["unlabelled"]["cases"] == 0
    assert _split_of(manifest) == {p: s for p, s in _split_of(first).items() if p != case["patient_id"]}
