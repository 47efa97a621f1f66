"""convert_tree: pseudonymised NIfTI + JSON outputs, private per-file summary, no PHI in shared files."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from pipeline.errors import ConfigError
from pipeline.ingest.convert import convert_tree
from pipeline.ingest.deid import pseudonym
from pipeline.ingest.sources import LoadOptions, load_item, scan_sources

warnings.filterwarnings("ignore", category=UserWarning)
DATA = Path(__file__).parent / "data" / "dicom"
KEY = b"0123456789abcdef0123456789abcdef"


@pytest.fixture()
def tree(tmp_path):
    src = tmp_path / "in"
    for sub in ("dcm_qa_ts/In", "dcm_qa_nih/In", "dcm_qa_ct/In", "pydicom"):
        assert (DATA / sub).exists(), f"test data missing: {DATA / sub}"
        shutil.copytree(DATA / sub, src / sub.replace("/", "_"))
    (src / "garbage.dcm").write_bytes(b"\x00not dicom" * 50)
    return src


def _phi_values(src: Path) -> set[str]:
    vals = set()
    for p in src.rglob("*.dcm"):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:
            continue
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "AccessionNumber",
            "InstitutionName",
            "StudyDate",
            "ReferringPhysicianName",
        ):
            v = str(ds.get(kw, "") or "").strip()
            if len(v) >= 4:
                vals.add(v)
    return vals


def _snapshot(root: Path):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_convert_tree_outputs_and_privacy(tree, tmp_path):
    out = tmp_path / "out"
    before = _snapshot(tree)
    summary = convert_tree(tree, out, KEY)
    assert _snapshot(tree) == before
    # 5 ts volumes + 1 mosaic 4D + CT (tilt corrected) + CT_small
    assert summary["converted"] == 8 and summary["refused"] == 0
    assert summary["codes"] == {"not_dicom": 1, "skipped": 1}  # garbage.dcm, pydicom's LICENSE
    niis = sorted(out.glob("*.nii.gz"))
    assert len(niis) == 8 and all(n.name.startswith("P") for n in niis)
    # shared outputs carry no identifiers and no source paths
    phi = _phi_values(tree)
    assert phi, "expected identifying values in the test DICOM headers"
    shared_text = "".join(p.read_text() for p in out.glob("*.json"))
    shared_text += "".join(str(nib.load(n).header["descrip"]) for n in niis)
    for v in phi:
        assert v not in shared_text, f"identifier {v!r} leaked into shared outputs"
    assert str(tree) not in shared_text and "dcm_qa" not in shared_text
    # free text cannot slip in: side-car keys are a fixed, non-identifying set
    from pipeline.ingest.convert import SIDECAR_KEYS

    allowed = set(SIDECAR_KEYS) | {
        "pseudonym",
        "kind",
        "shape",
        "spacing_mm",
        "orientation",
        "affine_ras",
        "axis_order",
        "converter",
    }
    for p in out.glob("*.json"):
        if p.name != "convert_report.json":
            assert set(json.loads(p.read_text())) <= allowed
    # private summary: every input file accounted for, folder 0700
    priv = out / "private"
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o700
    summ = json.loads((priv / "convert_summary.json").read_text())
    files = {str(p.resolve()) for p in tree.rglob("*") if p.is_file()}
    assert set(summ["files"]) == files
    assert summ["files"][str((tree / "garbage.dcm").resolve())]["code"] == "not_dicom"
    # sidecar pseudonym is the keyed HMAC of PatientID
    items, _ = scan_sources(tree)
    ct_item = next(i for i in items if i.header.get("modality") == "CT" and i.header["n_files"] == 4)
    side = json.loads(
        next(
            p
            for p in out.glob("*.json")
            if p.name != "convert_report.json" and json.loads(p.read_text()).get("measured_tilt_deg", 0) > 1
        ).read_text()
    )
    assert side["pseudonym"] == pseudonym(ct_item.ids["PatientID"], KEY)
    assert "tilt_corrected" in side["flags"] and side["modality"] == "CT"
    # NIfTI content equals what load_item gives
    vol = load_item(ct_item)
    name = summ["files"][ct_item.files[0]]["output"]
    img = nib.load(out / name)
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), vol.array)
    np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4)


def test_convert_refusals_are_reported(tree, tmp_path):
    out = tmp_path / "out"
    summary = convert_tree(tree, out, KEY, LoadOptions(tilt="refuse"))
    assert summary["refused"] == 1 and summary["codes"]["gantry_tilt"] == 1
    summ = json.loads((out / "private" / "convert_summary.json").read_text())
    refused = [v for v in summ["files"].values() if v["status"] == "refused"]
    assert len(refused) == 4 and all("GantryDetectorTilt" in v["reason"] for v in refused)


def test_output_inside_input_is_refused(tree):
    with pytest.raises(ConfigError, match="inside input"):
        convert_tree(tree, tree / "out", KEY)


@pytest.mark.integration
def test_matches_dcm2niix_series_by_series(tmp_path):
    """Each dcm_qa_ts volume converted by medtl equals dcm2niix's conversion of the same file."""
    exe = shutil.which("dcm2niix")
    assert exe, "dcm2niix not installed (apt-get install -y dcm2niix)"
    src = DATA / "dcm_qa_ts" / "In"
    compared = []
    for f in sorted(src.glob("*.dcm")):
        d = tmp_path / f.stem
        (d / "in").mkdir(parents=True)
        shutil.copy(f, d / "in")
        run = subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(d), str(d / "in")], capture_output=True)
        if run.returncode != 0 or not (d / "ref.nii").exists():
            continue  # Debian's dcm2niix is built without JPEG-LS/JPEG 2000; medtl reads those (see test_ingest_dicom)
        ref = nib.as_closest_canonical(nib.load(d / "ref.nii"))
        convert_tree(d / "in", d / "medtl", KEY)
        ours = nib.as_closest_canonical(nib.load(next((d / "medtl").glob("*.nii.gz"))))
        np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(ref.dataobj))
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        compared.append(f.name)
    assert len(compared) >= 3, compared


def _bad_images(src: Path) -> None:
    """One good NIfTI, one with a NaN voxel, one constant (values stored as float32)."""
    src.mkdir(parents=True, exist_ok=True)
    good = np.random.default_rng(0).normal(100, 10, (8, 8, 4)).astype(np.float32)
    nan = good.copy()
    nan[1, 2, 3] = np.nan
    for name, arr in (("good", good), ("nan", nan), ("flat", np.full((8, 8, 4), 7, np.float32))):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), src / f"{name}.nii.gz")


def test_non_finite_and_constant_images_are_refused(tmp_path):
    """Today: convert writes a NaN or blank volume as if it were an image; Ingest refuses both."""
    _bad_images(tmp_path / "in")
    summary = convert_tree(tmp_path / "in", tmp_path / "out", KEY)
    assert summary["converted"] == 1 and summary["refused"] == 2
    assert summary["codes"] == {"constant": 1, "non_finite": 1}
    private = json.loads((tmp_path / "out" / "private" / "convert_summary.json").read_text())
    refused = {v["code"] for v in private["files"].values() if v["status"] == "refused"}
    assert refused == {"constant", "non_finite"}
