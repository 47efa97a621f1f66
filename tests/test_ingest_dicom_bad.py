"""Bad DICOM input: every case ends as a Rejected (scan) or IngestError (load) with a clear reason and a
stable code, never a traceback, and the source files stay byte-identical."""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipeline.errors import IngestError
from pipeline.ingest.sources import LoadOptions, load_item, scan_sources

warnings.filterwarnings("ignore", category=UserWarning)


def _write_series(
    folder: Path,
    n: int,
    gap: float = 5.0,
    skip: tuple[int, ...] = (),
    size: dict | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """n axial slices made from pydicom's CT_small, ImagePositionPatient z = k * gap; ``skip`` drops slices."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    series_uid = series_uid or generate_uid()
    out = []
    for k in range(n):
        if k in skip:
            continue
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n - k  # deliberately reversed: sorting must use positions
        ds.ImagePositionPatient = [-158.1, -179.0, k * gap]
        if size and k in size:
            r, c = size[k]
            ds.Rows, ds.Columns = r, c
            ds.PixelData = np.zeros((r, c), dtype=np.int16).tobytes()
        p = folder / f"slice{k:02d}.dcm"
        ds.save_as(p)
        out.append(p)
    return out


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _codes(rejected):
    return {Path(r.path).name: r.code for r in rejected}


def test_sorted_by_position_not_instance_number(tmp_path):
    _write_series(tmp_path / "s", 5)
    items, rejected = scan_sources(tmp_path)
    assert len(items) == 1 and not rejected
    vol = load_item(items[0])
    assert vol.array.shape == (128, 128, 5)
    np.testing.assert_allclose(vol.spacing[2], 5.0)
    # k axis goes up in z (S) as positions do, although InstanceNumber goes down
    assert vol.affine[2, 2] > 0


def test_bad_files_are_rejected_with_codes_and_untouched(tmp_path):
    src = tmp_path / "in"
    good = _write_series(src / "good", 3)
    raw = good[0].read_bytes()
    (src / "empty.dcm").write_bytes(b"")
    (src / "garbage.dcm").write_bytes(os.urandom(3000))
    (src / "text.dcm").write_bytes(b"this is not dicom at all\n" * 40)
    (src / "truncated.dcm").write_bytes(raw[: len(raw) - 5000])
    (src / "truncated_header.dcm").write_bytes(raw[:700])
    # no pixel data
    ds = pydicom.dcmread(good[0])
    for kw in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, kw)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a real pixel-less object
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "SR"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(src / "nopixels.dcm")
    ds = pydicom.dcmread(good[0])
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(src / "stripped.dcm")
    # unknown transfer syntax
    ds = pydicom.dcmread(good[0])
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(src / "unknown_ts.dcm", enforce_file_format=True)
    # DICOMDIR
    dd = pydicom.Dataset()
    dd.file_meta = pydicom.dataset.FileMetaDataset()
    dd.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dd.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dd.DirectoryRecordSequence = []
    dd.save_as(src / "DICOMDIR", enforce_file_format=True)
    # a file without the 128-byte preamble + "DICM" is still DICOM (read with force=True) and is accepted
    (src / "nopre").mkdir()
    ds = pydicom.dcmread(good[0])
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(src / "nopre" / "full.dcm")
    (src / "nopre" / "slice.dcm").write_bytes((src / "nopre" / "full.dcm").read_bytes()[132:])
    (src / "nopre" / "full.dcm").unlink()
    before = _snapshot(src)

    items, rejected = scan_sources(src)
    codes = _codes(rejected)
    assert codes == {
        "empty.dcm": "empty",
        "garbage.dcm": "not_dicom",
        "text.dcm": "not_dicom",
        "truncated.dcm": "truncated",
        "truncated_header.dcm": "truncated",
        "nopixels.dcm": "no_pixel_data",
        "stripped.dcm": "truncated",  # CT Image Storage without Pixel Data
        "unknown_ts.dcm": "unsupported_transfer_syntax",
        "DICOMDIR": "dicomdir",
    }
    for r in rejected:
        assert r.path in r.reason and len(r.reason) > 30
    ts_reason = next(r.reason for r in rejected if r.code == "unsupported_transfer_syntax")
    assert "(0002,0010)" in ts_reason and "1.2.3.4.5.6.7" in ts_reason
    assert sorted(len(i.files) for i in items) == [1, 3], items  # the preamble-less file and the good series
    for it in items:
        load_item(it)
    assert _snapshot(src) == before, "source files were modified"


def test_missing_slice_detected(tmp_path):
    _write_series(tmp_path, 8, skip=(4,))
    items, _ = scan_sources(tmp_path)
    assert len(items) == 1
    with pytest.raises(IngestError) as e:
        load_item(items[0])
    assert e.value.code == "missing_slice"
    assert "(0020,0032)" in e.value.reason and "10.0" in e.value.reason


def test_uneven_spacing_refused_or_resampled(tmp_path):
    files = _write_series(tmp_path, 6)
    ds = pydicom.dcmread(files[-1])
    ds.ImagePositionPatient = [-158.1, -179.0, 27.5]  # last gap 2.5 instead of 5: not a multiple
    ds.save_as(files[-1])
    items, _ = scan_sources(tmp_path)
    with pytest.raises(IngestError) as e:
        load_item(items[0], LoadOptions(uneven_spacing="refuse"))
    assert e.value.code == "uneven_spacing"
    vol = load_item(items[0])
    assert "resampled_uneven_slices" in vol.meta["flags"]
    z = vol.affine @ np.array([0, 0, vol.array.shape[2] - 1, 1])
    assert abs(z[2] - 27.5) < 1e-6  # resampled grid spans the true extent


def test_mixed_sizes_in_one_series_rejected(tmp_path):
    _write_series(tmp_path, 6, size={3: (64, 64)})
    items, rejected = scan_sources(tmp_path)
    assert _codes(rejected) == {"slice03.dcm": "mixed_sizes"}
    assert "Rows (0028,0010)" in rejected[0].reason
    # the rest of the series is still one item, now with a hole where the bad slice was
    assert len(items) == 1 and len(items[0].files) == 5
    with pytest.raises(IngestError) as e:
        load_item(items[0])
    assert e.value.code == "missing_slice"


def test_load_item_on_vanished_file_is_ingest_error(tmp_path):
    files = _write_series(tmp_path, 3)
    items, _ = scan_sources(tmp_path)
    files[1].write_bytes(files[1].read_bytes()[:-9000])
    with pytest.raises(IngestError) as e:
        load_item(items[0])
    assert e.value.code == "truncated" and str(files[1]) in e.value.reason


def _mangled_frame(tmp_path: Path, name: str, how: str) -> Path:
    """pydicom's compressed test file ``name`` re-encapsulated with its first frame cut in half or garbled."""
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(get_testdata_file(name))
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1)))))
    if how == "half":
        frame = frame[: len(frame) // 2]
    else:
        for k in range(len(frame) // 3, len(frame) - 4):
            frame[k] = (k * 37) % 256
    if len(frame) % 2:
        frame += b"\0"
    ds.PixelData = encapsulate([bytes(frame)])
    out = tmp_path / f"{how}_{name}"
    ds.save_as(out)
    return out


@pytest.mark.parametrize(
    "name, how",
    [
        ("JPEG2000.dcm", "half"),  # decoder: "failed to decode image"
        ("MR_small_RLE.dcm", "half"),  # decoder message says "length ... expected": still not a cut file
        ("MR_small_RLE.dcm", "garbage"),  # pylibjpeg-rle panics (pyo3 PanicException, a BaseException)
    ],
)
def test_corrupt_compressed_frame_is_decode_failed(tmp_path, name, how):
    """A complete file whose compressed frame is corrupt is ``decode_failed`` (the file is not cut), and
    even a decoder plugin's panic stays a per-file IngestError."""
    path = _mangled_frame(tmp_path, name, how)
    items, rejected = scan_sources(path)
    assert not rejected and len(items) == 1
    with pytest.raises(IngestError) as e:
        load_item(items[0])
    assert e.value.code == "decode_failed", e.value.reason


def test_decode_code_comes_from_the_file_not_the_message(tmp_path, monkeypatch):
    """The code is set from the file's structure: a decoder message full of 'length expected end' on a
    complete file is decode_failed, a bland message on a cut file is truncated."""
    full = _write_series(tmp_path / "full", 1)[0]
    cut = _write_series(tmp_path / "cut", 1)[0]
    items_full, _ = scan_sources(full)
    items_cut, _ = scan_sources(cut)
    cut.write_bytes(cut.read_bytes()[:-3000])  # cut after the scan, as a file changing under a run

    message = {"text": ""}

    def boom(self):
        raise RuntimeError(message["text"])

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(boom))
    message["text"] = "unexpected end of stream: length 12 but expected 40"
    with pytest.raises(IngestError) as e:
        load_item(items_full[0])
    assert e.value.code == "decode_failed"
    message["text"] = "decoder said no"
    with pytest.raises(IngestError) as e:
        load_item(items_cut[0])
    assert e.value.code == "truncated"


# ------------------------------------------------------------------------------ degenerate geometry
_NO_GEOMETRY = {"ImageOrientationPatient": None, "ImagePositionPatient": None}


def _geometry_variant(folder: Path, name: str, changes: dict) -> Path:
    """pydicom's CT_small (a real scanner file) with header fields changed (None deletes the field)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    path = folder / f"{name}.dcm"
    ds.save_as(path)
    return path


def test_zero_pixel_spacing_without_patient_geometry_falls_back_to_unit_spacing(tmp_path):
    """A computed-radiography style image (no ImagePositionPatient/ImageOrientationPatient) whose
    PixelSpacing is "0\\0": unit spacing, stated in the flags, never a singular affine."""
    path = _geometry_variant(tmp_path, "cr_zero", {"Modality": "CR", "PixelSpacing": [0, 0], **_NO_GEOMETRY})
    items, rejected = scan_sources(path)
    assert not rejected
    vol = load_item(items[0])
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), [1.0, 1.0, 1.0])
    assert abs(np.linalg.det(vol.affine[:3, :3])) > 0
    assert "assumed_unit_pixel_spacing" in vol.meta["flags"] and "no_patient_geometry" in vol.meta["flags"]


def test_zero_pixel_spacing_uses_a_valid_imager_pixel_spacing(tmp_path):
    path = _geometry_variant(
        tmp_path,
        "cr_imager",
        {"Modality": "CR", "PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.2, 0.3], **_NO_GEOMETRY},
    )
    items, _ = scan_sources(path)
    vol = load_item(items[0])
    assert np.allclose(np.abs(np.diag(vol.affine)[:3]), [0.3, 0.2, 1.0])
    assert "assumed_unit_pixel_spacing" not in vol.meta["flags"]


@pytest.mark.parametrize(
    "name, changes, code",
    [
        ("spacing_zero", {"PixelSpacing": [0, 0]}, "missing_geometry"),
        ("spacing_negative", {"PixelSpacing": [-0.5, 0.5]}, "missing_geometry"),
        ("iop_zero", {"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]}, "degenerate_geometry"),
        ("iop_row_zero", {"ImageOrientationPatient": [0, 0, 0, 0, 1, 0]}, "degenerate_geometry"),
        ("iop_parallel", {"ImageOrientationPatient": [1, 0, 0, 1, 0, 0]}, "degenerate_geometry"),
    ],
)
def test_degenerate_patient_geometry_is_a_per_case_code(tmp_path, name, changes, code):
    """With patient geometry, zero/negative spacing or zero-length/parallel orientation vectors are refused
    with a code naming the field (no traceback, no value copied from the file)."""
    path = _geometry_variant(tmp_path, name, changes)
    items, rejected = scan_sources(path)
    assert not rejected
    with pytest.raises(IngestError) as e:
        load_item(items[0])
    assert e.value.code == code
    field = "PixelSpacing (0028,0030)" if code == "missing_geometry" else "ImageOrientationPatient (0020,0037)"
    assert field in e.value.reason


def test_convert_reports_degenerate_geometry_instead_of_a_traceback(tmp_path):
    """`medtl convert` on a tree of such files: the CR converts with unit spacing, the rest are refused
    per case with their codes, and an unexpected reader error is a per-item ``decode_failed``."""
    from pipeline.ingest.convert import convert_tree

    src = tmp_path / "src"
    _geometry_variant(src, "cr_zero", {"Modality": "CR", "PixelSpacing": [0, 0], **_NO_GEOMETRY})
    _geometry_variant(src, "iop_zero", {"ImageOrientationPatient": [0, 0, 0, 0, 0, 0]})
    _geometry_variant(src, "spacing_zero", {"PixelSpacing": [0, 0]})
    summary = convert_tree(src, tmp_path / "out", b"k" * 32)
    assert summary["converted"] == 1 and summary["refused"] == 2
    assert summary["codes"] == {"degenerate_geometry": 1, "missing_geometry": 1}


def test_convert_turns_an_unexpected_reader_error_into_decode_failed(tmp_path, monkeypatch):
    from pipeline.ingest import convert

    src = tmp_path / "src"
    _write_series(src, 2)

    def broken(item, options=None):
        raise ValueError("Volume.affine is singular")

    monkeypatch.setattr(convert, "load_item", broken)
    summary = convert.convert_tree(src, tmp_path / "out", b"k" * 32)
    assert summary["refused"] == 1 and summary["codes"] == {"decode_failed": 1}
