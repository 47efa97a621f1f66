"""Free text from the labels CSV and DICOM tags stays private (issue 15, point 1): a label or split cell that
is refused is reported by code and CSV line only; a subgroup value (group column, sex, modality,
manufacturer) shared by fewer than 5 patients is pooled as 'other' in the manifest, so no shared file
downstream (augment index, metrics, report) can hold it; the raw values are kept under ``private/``. The
report states the rule and its problem table shows no cell value."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.ingest.ingest_report import OTHER, pool_rare_values
from pipeline.ingest.stage import read_manifest, run_ingest
from tests.conftest import make_dataset, write_config

RARE = "Rosalind Featherstonehaugh"  # a rare site cell that is a person's name
UNKNOWN_LABEL = "see Dr Bartholomew"
UNKNOWN_SPLIT = "Holdout-Ignatius"
NOTE = "phoned Mrs Winterbottom"


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


def test_pooling_counts_patients_not_cases_and_keeps_missing_values() -> None:
    rows = [{"patient_id": f"P{i}", "site": "A"} for i in range(5)]  # 5 patients: shown
    rows += [{"patient_id": "P9", "site": "B"} for _ in range(7)]  # 7 cases of one patient: pooled
    rows += [{"patient_id": "P8", "site": ""}, {"patient_id": "P7", "site": OTHER}]
    pooled = pool_rare_values(rows, ["site"])
    assert [r["site"] for r in rows] == ["A"] * 5 + [OTHER] * 7 + ["", OTHER]
    assert pooled == {"site": {"values": 1, "cases": 7}}


def _ingest(tmp_path: Path) -> tuple[dict, list[dict[str, str]], Path]:
    make_dataset(tmp_path, n_patients=30)
    with open(tmp_path / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, r in enumerate(rows):
        r["split"] = ""
        r["site"] = RARE if i in (3, 11) else ("north" if i % 2 else "south")
        r["notes"] = NOTE
    rows[5]["diagnosis"] = UNKNOWN_LABEL
    rows[6]["split"] = UNKNOWN_SPLIT
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    cfg = load_config(
        write_config(
            tmp_path,
            deid={"key_env": "MEDTL_TEST_KEY"},
            data={"split_column": "split", "group_columns": ["site"]},
        )
    )
    ws = tmp_path / "ws"
    out = ws / "ingest" / "a"
    out.mkdir(parents=True)
    return run_ingest(cfg, out, ws), read_manifest(out), ws


def test_refused_cells_and_rare_values_never_reach_shared_files(tmp_path: Path) -> None:
    report, manifest, ws = _ingest(tmp_path)
    shared = b"".join(
        p.read_bytes().lower()
        for p in ws.rglob("*")
        if p.is_file() and (ws / "private") not in p.parents and p.suffix in (".csv", ".json")
    )
    for value in (RARE, UNKNOWN_LABEL, UNKNOWN_SPLIT, NOTE, "featherstonehaugh", "ignatius", "bartholomew"):
        assert value.lower().encode() not in shared, value
    rows = {p["code"]: p for p in report["problems"] if "row" in p}
    assert rows["unknown_label"]["row"] == 7 and rows["bad_split"]["row"] == 8  # CSV lines (header = 1)
    assert "'diagnosis'" in rows["unknown_label"]["reason"] and "'split'" in rows["bad_split"]["reason"]
    # the two refused rows' cases are ingested unlabelled, with no row and so no site (missing, not pooled)
    assert sorted({r["group_site"] for r in manifest}) == ["", "north", OTHER, "south"]
    assert sum(r["group_site"] == OTHER for r in manifest) == 2
    assert report["subgroup_values"]["pooled"]["group_site"] == {"values": 1, "cases": 2}
    assert "fewer than 5 patients" in report["subgroup_values"]["rule"]

    # the values are kept privately (0600): what each refused row said, and each case's raw subgroup value
    priv = next((ws / "private" / "ingest").glob("a/label_rows.json"))
    details = {d["code"]: d for d in json.loads(priv.read_text())}
    assert UNKNOWN_LABEL in details["unknown_label"]["detail"] and details["bad_split"]["row"] == 8
    assert UNKNOWN_SPLIT in details["bad_split"]["detail"]
    raw = priv.with_name("subgroup_values.csv")
    assert RARE in raw.read_text() and (raw.stat().st_mode & 0o777) == 0o600
    with open(raw, newline="") as fh:
        by_case = {r["case_id"]: r["group_site"] for r in csv.DictReader(fh)}
    assert {c for c, v in by_case.items() if v == RARE} == {
        r["case_id"] for r in manifest if r["group_site"] == OTHER
    }


def test_report_states_the_rule_and_prints_no_cell_value(tmp_path: Path) -> None:
    from pipeline.report.document import Doc
    from pipeline.report.sections.inputs import ReportInputs
    from pipeline.report.sections.overview import data_section

    report, _, _ = _ingest(tmp_path)
    cfg = load_config(tmp_path / "config.yaml")
    doc = Doc()
    data_section(doc, ReportInputs(cfg=cfg, plan=None, metrics={}, preds={}, calibrated={}, ingest=report))
    text = json.dumps([b[1] for b in doc.blocks if b[0] in ("p", "warn", "table")], default=str).lower()
    assert "unknown_label" in text and "bad_split" in text  # the codes, with their row's reason
    assert "values shared by fewer than 5 patients are pooled as 'other'" in text
    for value in (RARE, UNKNOWN_LABEL, UNKNOWN_SPLIT, NOTE):
        assert value.lower() not in text, value
