"""Incremental Ingest: a rerun opens only new/changed files, decodes only changed volumes, reports
vanished files, and keeps paths/identifiers of its index under private/."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.ingest import sources
from pipeline.ingest.stage import read_manifest, run_ingest
from tests.conftest import PHI_ID_PREFIX, PHI_PATH_WORD, make_dataset, square_image, write_config, write_dicom


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    """A fixed pseudonym key: hashed splits (and so these tests) are deterministic."""
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


@pytest.fixture
def project(tmp_path: Path):
    make_dataset(tmp_path, n_patients=30)
    config = write_config(tmp_path, deid={"key_env": "MEDTL_TEST_KEY"})
    return load_config(config), tmp_path / "ws", tmp_path


def _run(cfg, ws: Path, name: str) -> tuple[dict, list[dict[str, str]]]:
    out = ws / "ingest" / name
    out.mkdir(parents=True)
    report = run_ingest(cfg, out, ws)
    assert json.loads((out / "ingest_report.json").read_text()) == json.loads(json.dumps(report))
    return report, read_manifest(out)


def _count_probes(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = sources.probe_file

    def spy(path: str, kind: str):
        opened.append(path)
        return real(path, kind)

    monkeypatch.setattr(sources, "probe_file", spy)
    return opened


def test_rerun_reads_and_decodes_nothing(project, monkeypatch) -> None:
    cfg, ws, _ = project
    first, m1 = _run(cfg, ws, "a")
    inc = first["incremental"]
    assert (inc["new"], inc["headers_read"], inc["volumes_decoded"]) == (30, 30, 30)
    opened = _count_probes(monkeypatch)
    second, m2 = _run(cfg, ws, "b")
    inc = second["incremental"]
    assert opened == []
    assert (inc["unchanged"], inc["headers_read"], inc["volumes_decoded"], inc["volumes_reused"]) == (
        30,
        0,
        0,
        30,
    )
    assert m1 == m2


def test_touch_rehashes_but_does_not_reread(project, monkeypatch) -> None:
    cfg, ws, root = project
    _run(cfg, ws, "a")
    f = next((root / "images").rglob("*.dcm"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    opened = _count_probes(monkeypatch)
    report, _ = _run(cfg, ws, "b")
    inc = report["incremental"]
    assert opened == []
    assert (inc["touched"], inc["changed"], inc["volumes_decoded"]) == (1, 0, 0)
    assert inc["hashed_bytes"] == st.st_size


def test_changed_file_is_the_only_one_decoded(project, monkeypatch) -> None:
    cfg, ws, root = project
    _, m1 = _run(cfg, ws, "a")
    f = sorted((root / "images").rglob("*.dcm"))[3]
    write_dicom(f, square_image(np.random.default_rng(99), True), f"{PHI_ID_PREFIX}0003", instance=4)
    opened = _count_probes(monkeypatch)
    report, m2 = _run(cfg, ws, "b")
    inc = report["incremental"]
    assert opened == [str(f)]
    assert (inc["changed"], inc["headers_read"], inc["volumes_decoded"], inc["volumes_reused"]) == (
        1,
        1,
        1,
        29,
    )
    changed = {r["case_id"] for r in m1} ^ {r["case_id"] for r in m2}
    vols1 = {r["volume"] for r in m1}
    assert len([r for r in m2 if r["volume"] not in vols1]) == 1
    assert not changed or len(changed) == 2  # a new StudyInstanceUID may rename the case, nothing else moves


def test_vanished_file_is_reported_and_kept_in_history(project) -> None:
    cfg, ws, root = project
    _, m1 = _run(cfg, ws, "a")
    gone = sorted((root / "images").rglob("*.dcm"))[5]
    gone.unlink()
    report, m2 = _run(cfg, ws, "b")
    assert report["incremental"]["vanished"] == 1
    vanished = [p for p in report["problems"] if p["code"] == "vanished"]
    assert len(vanished) == 1 and vanished[0]["case_id"] in {r["case_id"] for r in m1}
    assert vanished[0]["case_id"] not in {r["case_id"] for r in m2}
    assert len(m2) == len(m1) - 1
    # the next run still knows (privately) that it vanished, without reporting it as new again
    report3, _ = _run(cfg, ws, "c")
    assert report3["incremental"]["vanished"] == 0 and report3["incremental"]["vanished_earlier"] == 1
    files = json.loads(next((ws / "private" / "ingest" / "c").glob("files.json")).read_text())
    assert [f["status"] for f in files if f["path"] == str(gone)] == ["vanished_earlier"]


def test_index_is_private_and_holds_no_phi_outside(project) -> None:
    cfg, ws, _ = project
    _run(cfg, ws, "a")
    _run(cfg, ws, "b")
    indexes = list((ws / "private" / "ingest").glob("index-*.sqlite"))
    assert len(indexes) == 1
    assert (indexes[0].stat().st_mode & 0o777) == 0o600
    assert (indexes[0].parent.stat().st_mode & 0o777) == 0o700
    assert PHI_PATH_WORD.encode() in indexes[0].read_bytes()  # paths live in the private index ...
    for p in ws.rglob("*"):  # ... and nowhere else
        if p.is_file() and (ws / "private") not in p.parents:
            data = p.read_bytes()
            assert PHI_PATH_WORD.encode() not in data and PHI_ID_PREFIX.encode() not in data, p


def test_mask_regions_blank_flagged_2d_images(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=30)  # Secondary Capture files: flagged for pixel review
    cfg = load_config(
        write_config(tmp_path, ingest={"mask_regions": [[0, 0, 8, 4]]}, deid={"key_env": "MEDTL_TEST_KEY"})
    )
    ws = tmp_path / "ws"
    report, manifest = _run(cfg, ws, "a")
    assert len(report["pixel_review"]) == len(manifest) == 30
    for row in manifest:
        assert "masked_regions" in row["flags"].split(";")
        arr = np.load(ws / "cache" / "volumes" / row["volume"])
        assert (arr[:8, :4] == arr.min()).all()
    with open(tmp_path / "labels.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 30


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_index_is_set_aside_and_rebuilt(project, damage) -> None:
    """Today: a damaged index file makes every later Ingest run fail (sqlite3.DatabaseError)."""
    cfg, ws, _ = project
    _run(cfg, ws, "a")
    (index_file,) = (ws / "private" / "ingest").glob("index-*.sqlite")
    data = index_file.read_bytes()
    index_file.write_bytes(b"not a database" * 100 if damage == "garbage" else data[: len(data) // 2])
    report, _ = _run(cfg, ws, "b")
    inc = report["incremental"]
    assert inc["index_rebuilt"] == 1 and inc["headers_read"] == 30
    assert (inc["volumes_decoded"], inc["volumes_reused"]) == (0, 30)  # volumes keyed by content
    assert index_file.with_name(index_file.name + ".corrupt").is_file()
    assert oct(index_file.stat().st_mode & 0o777) == oct(0o600)
    report, _ = _run(cfg, ws, "c")
    assert report["incremental"]["index_rebuilt"] == 0 and report["incremental"]["headers_read"] == 0
