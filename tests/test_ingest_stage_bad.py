"""Bad input through the Ingest stage (run_ingest), not only the readers: every bad file or label row gets
a clear reason and code in ingest_report.json, valid cases go on, the source tree is untouched, and a run
where everything fails stops with one IngestError (no traceback through the CLI). Labels keyed by every
supported id type work."""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipeline.config import load_config
from pipeline.errors import IngestError
from pipeline.ingest.stage import read_manifest, run_ingest
from tests.conftest import make_dataset, write_config

warnings.filterwarnings("ignore", category=UserWarning)


def _series(folder: Path, n: int, skip: tuple[int, ...] = (), sizes: dict | None = None) -> None:
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        if k in skip:
            continue
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [-158.1, -179.0, k * 5.0]
        if sizes and k in sizes:
            ds.Rows, ds.Columns = sizes[k]
            ds.PixelData = np.zeros(sizes[k], dtype=np.int16).tobytes()
        ds.save_as(folder / f"slice{k:02d}.dcm")


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _append_labels(root: Path, rows: list[tuple[str, str]]) -> None:
    with open(root / "labels.csv", "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    """A fixed pseudonym key: hashed splits (and so these tests) are deterministic."""
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


@pytest.fixture
def bad_project(tmp_path: Path) -> Path:
    make_dataset(tmp_path, n_patients=30)
    img = tmp_path / "images"
    good = sorted(img.rglob("*.dcm"))[0].read_bytes()
    (img / "bad").mkdir()
    (img / "bad" / "truncated.dcm").write_bytes(good[: len(good) // 2])
    (img / "bad" / "empty.dcm").write_bytes(b"")
    (img / "bad" / "garbage.dcm").write_bytes(np.random.default_rng(0).bytes(4096))
    ds = pydicom.dcmread(sorted(img.rglob("*.dcm"))[1])
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    ds.save_as(img / "bad" / "no_pixels.dcm")
    ds = pydicom.dcmread(sorted(img.rglob("*.dcm"))[2])
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.9.9999.1"  # unknown syntax
    ds.save_as(img / "bad" / "unknown_ts.dcm", enforce_file_format=True)
    _series(img / "bad" / "missing_slice", 8, skip=(4,))
    _series(img / "bad" / "mixed_sizes", 8, sizes={3: (64, 64)})
    _append_labels(
        tmp_path,
        [
            ("bad/truncated.dcm", "lesion"),
            ("bad/no_pixels.dcm", "normal"),
            ("bad/unknown_ts.dcm", "normal"),
            ("bad/missing_slice", "lesion"),
            ("bad/mixed_sizes", "normal"),
            ("does/not/exist.dcm", "lesion"),  # label without case
            ("Johnathan_Doe_scan_0007/img.dcm", "lesion"),  # disagrees with its earlier row ("normal")
        ],
    )
    # a valid case without a label row
    extra = sorted(img.rglob("*.dcm"))[4].read_bytes()
    (img / "unlabelled").mkdir()
    (img / "unlabelled" / "img.dcm").write_bytes(extra)
    return write_config(tmp_path, deid={"key_env": "MEDTL_TEST_KEY"})


@pytest.mark.parametrize("processes", [1, 2])
def test_bad_inputs_are_reported_and_valid_cases_go_on(bad_project: Path, processes: int) -> None:
    root = bad_project.parent
    before = _tree_digest(root / "images")
    cfg = load_config(bad_project, overrides={"ingest": {"processes": processes}})
    out = root / "ws" / "ingest" / "x"
    out.mkdir(parents=True)
    report = run_ingest(cfg, out, root / "ws")
    assert _tree_digest(root / "images") == before, "the source tree was modified"
    codes = report["problems_by_code"]
    expected = {
        "truncated": 1,
        "empty": 1,
        "not_dicom": 1,
        "no_pixel_data": 1,
        "unsupported_transfer_syntax": 1,
        "missing_slice": 1,
        "mixed_sizes": 1,
        "label_without_case": 1,
        "conflicting_duplicate": 1,
    }
    for code, n in expected.items():
        assert codes.get(code, 0) >= n, (code, codes)
    # 30 valid cases minus the one whose duplicate labels disagree (left out), plus the unlabelled one
    assert report["cases"] == 30 and len(read_manifest(out)) == 30
    assert report["unlabelled"]["cases"] == 1 and "no_label" not in codes
    text = (out / "ingest_report.json").read_text()
    assert str(root) not in text and "Johnathan_Doe" not in text and "slice0" not in text
    for p in report["problems"]:
        assert p["reason"] and p["code"]
    by_code = {p["code"]: p["reason"] for p in report["problems"]}
    assert "0 bytes" in by_code["empty"]
    assert "TransferSyntaxUID" in by_code["unsupported_transfer_syntax"]
    assert "Pixel Data" in by_code["truncated"] or "truncated" in by_code["truncated"]
    assert "Rows" in by_code["mixed_sizes"]
    # ... and the private summary maps every bad file to its path and reason
    files = json.loads((root / "ws" / "private" / "ingest" / "x" / "files.json").read_text())
    status = {Path(f["path"]).name: f.get("code") for f in files}
    assert status["garbage.dcm"] == "not_dicom" and status["truncated.dcm"] == "truncated"


@pytest.fixture
def restore_loggers():
    """tasks.cli.main points medtl's loggers at the (captured) stderr; undo that afterwards."""
    import logging

    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level)
        for n in ("pipeline", "models", "tasks")
    }
    yield
    for n, (handlers, propagate, level) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.propagate = handlers, propagate
        lg.setLevel(level)


def test_every_case_failing_stops_with_one_clear_error(tmp_path: Path, capfd, restore_loggers) -> None:
    src = tmp_path / "images"
    src.mkdir()
    (src / "a.dcm").write_bytes(b"")
    (src / "b.dcm").write_bytes(b"not a dicom file at all" * 20)
    (tmp_path / "labels.csv").write_text("file,diagnosis\na.dcm,normal\nb.dcm,lesion\n")
    config = write_config(tmp_path, deid={"key_env": "MEDTL_TEST_KEY"})
    with pytest.raises(IngestError) as exc:
        out = tmp_path / "ws" / "ingest" / "x"
        out.mkdir(parents=True)
        run_ingest(load_config(config), out, tmp_path / "ws")
    assert exc.value.code == "nothing_ingested"
    assert "empty x1" in exc.value.reason and "not_dicom x1" in exc.value.reason

    from tasks.cli import main

    capfd.readouterr()
    rc = main(["run", str(config)])
    err = capfd.readouterr().err
    assert rc != 0
    assert "no case could be ingested" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "id_type", ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber", "path"]
)
def test_labels_keyed_by_each_id_type(tmp_path: Path, id_type: str) -> None:
    make_dataset(tmp_path, n_patients=30)
    rows = []
    for f in sorted((tmp_path / "images").rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ref = str(f.relative_to(tmp_path / "images")) if id_type == "path" else str(ds.get(id_type))
        rows.append((ref, "lesion" if int(ds.PatientID[-4:]) % 3 == 0 else "normal"))
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["case", "diagnosis"])
        w.writerows(rows)
    config = write_config(
        tmp_path, data={"id_column": "case", "id_type": id_type}, deid={"key_env": "MEDTL_TEST_KEY"}
    )
    out = tmp_path / "ws" / "ingest" / "x"
    out.mkdir(parents=True)
    report = run_ingest(load_config(config), out, tmp_path / "ws")
    assert report["cases"] == 30, report["problems_by_code"]
    assert report["problems_by_code"].get("no_label", 0) == 0
    manifest = read_manifest(out)
    assert sum(r["class_name"] == "lesion" for r in manifest) == 10


def test_unexpected_reader_error_is_reported_not_raised(tmp_path: Path, monkeypatch) -> None:
    """A reader bug or exotic file (any exception while decoding) becomes code decode_failed."""
    from pipeline.ingest import sources

    make_dataset(tmp_path, n_patients=30)
    real = sources.load_item
    victim = sorted((tmp_path / "images").rglob("*.dcm"))[0]

    def flaky(item, options=None):
        if str(victim) in item.files:
            raise ValueError("synthetic reader failure")
        return real(item, options)

    monkeypatch.setattr(sources, "load_item", flaky)
    out = tmp_path / "ws" / "ingest" / "x"
    out.mkdir(parents=True)
    report = run_ingest(
        load_config(write_config(tmp_path, deid={"key_env": "MEDTL_TEST_KEY"})), out, tmp_path / "ws"
    )
    assert report["cases"] == 29 and report["problems_by_code"]["decode_failed"] == 1
    reason = next(p["reason"] for p in report["problems"] if p["code"] == "decode_failed")
    assert "ValueError" in reason and str(tmp_path) not in reason


def test_image_faults_are_per_case_and_the_run_goes_on(tmp_path: Path) -> None:
    """A constant image (code ``constant``), a NIfTI holding NaN (``non_finite``) are rejected per case
    on the stored values; a CR whose PixelSpacing is "0\\0" is ingested with unit spacing, flagged in its
    manifest row and counted in the report; the night completes with the rest."""
    import nibabel as nib

    from tests.conftest import write_dicom

    make_dataset(tmp_path, n_patients=30)
    img = tmp_path / "images"
    write_dicom(img / "flat" / "img.dcm", np.full((32, 32), 70, dtype=np.uint8), "FLAT0001")
    vol = np.random.default_rng(1).normal(0, 1, (16, 16, 4)).astype(np.float32)
    vol[3, 4, 1] = np.nan
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 1.0, 2.0, 1.0])), img / "nan_volume.nii.gz")
    donor = pydicom.dcmread(sorted(img.rglob("*.dcm"))[0])
    donor.PixelSpacing = [0, 0]
    donor.PatientID = "ZEROSPACING"
    donor.SOPInstanceUID = donor.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    (img / "zero_spacing").mkdir()
    donor.save_as(img / "zero_spacing" / "img.dcm")
    _append_labels(
        tmp_path,
        [("flat/img.dcm", "normal"), ("nan_volume.nii.gz", "lesion"), ("zero_spacing/img.dcm", "lesion")],
    )
    out = tmp_path / "ws" / "ingest" / "x"
    out.mkdir(parents=True)
    report = run_ingest(
        load_config(write_config(tmp_path, deid={"key_env": "MEDTL_TEST_KEY"})), out, tmp_path / "ws"
    )
    assert report["problems_by_code"].get("constant") == 1
    assert report["problems_by_code"].get("non_finite") == 1
    assert report["cases"] == 31
    assert report["case_flags"].get("assumed_unit_pixel_spacing") == 1
    flagged = [r for r in read_manifest(out) if "assumed_unit_pixel_spacing" in r["flags"]]
    assert len(flagged) == 1 and flagged[0]["spacing"].startswith("1x1")
    text = json.dumps(report)
    assert "FLAT0001" not in text and "nan_volume" not in text


@pytest.mark.parametrize(
    "array, code",
    [
        (np.zeros((0, 8, 1), dtype=np.int16), "empty"),
        (np.full((8, 8, 1), 3, dtype=np.int16), "constant"),
        (np.array([[[1.0]], [[np.inf]]], dtype=np.float32), "non_finite"),
    ],
)
def test_decode_job_rejects_empty_constant_non_finite(tmp_path: Path, monkeypatch, array, code) -> None:
    """Judged on the stored values as loaded (before any windowing), before anything is cached."""
    from types import SimpleNamespace

    from pipeline.ingest import decode_jobs, sources

    loaded = SimpleNamespace(array=array, affine=np.eye(4), meta={"flags": []})
    monkeypatch.setattr(sources, "load_item", lambda item, options=None: loaded)
    item = SimpleNamespace(files=("/data/x.dcm",), kind="dicom", header={})
    job = decode_jobs.DecodeJob(item, str(tmp_path / "v.npy"), None)
    with pytest.raises(IngestError) as e:
        decode_jobs.safe_decode(job)
    assert e.value.code == code
    assert not (tmp_path / "v.npy").exists()
