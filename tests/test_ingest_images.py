"""2D images (PNG/JPEG, grey/RGB) and single-frame DICOM (CR, DX, US, SC) as Volumes."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from pipeline.errors import IngestError
from pipeline.ingest.images import read_image
from pipeline.ingest.sources import load_item, scan_sources

warnings.filterwarnings("ignore", category=UserWarning)


def test_grey_png_axis_order_and_explicit_affine(tmp_path):
    rows, cols = 20, 30
    pix = np.arange(rows * cols, dtype=np.uint8).reshape(rows, cols)
    Image.fromarray(pix).save(tmp_path / "a.png")
    vol = read_image(tmp_path / "a.png")
    assert vol.array.shape == (cols, rows, 1)
    assert vol.array[5, 3, 0] == pix[3, 5]  # (i, j) = (column, row)
    assert vol.meta["geometry"] == "none" and "needs_pixel_review" in vol.meta["flags"]
    np.testing.assert_allclose(vol.affine, np.diag([-1.0, -1.0, 1.0, 1.0]))
    assert vol.spacing == (1.0, 1.0, 1.0)


def test_rgb_jpeg_has_channel_axis(tmp_path):
    rgb = np.zeros((16, 24, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
    items, rejected = scan_sources(tmp_path)
    assert [i.kind for i in items] == ["image"] and not rejected
    vol = load_item(items[0])
    assert vol.array.shape == (24, 16, 1, 3) and vol.meta["axis4"] == "rgb"
    assert abs(int(vol.array[..., 0].mean()) - 200) < 3


def test_corrupt_png_is_rejected(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 10)
    (tmp_path / "e.jpg").write_bytes(b"")
    items, rejected = scan_sources(tmp_path)
    assert not items
    assert {r.code for r in rejected} == {"bad_image", "empty"}


def _single_frame(tmp_path, modality: str, sop: str, burned: str | None = None, mono1: bool = False):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds = copy.deepcopy(ds)
    ds.Modality = modality
    ds.SOPClassUID = sop
    ds.file_meta.MediaStorageSOPClassUID = sop
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "RescaleSlope", "RescaleIntercept"):
        if kw in ds:
            delattr(ds, kw)
    if burned:
        ds.BurnedInAnnotation = burned
    if mono1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / f"{modality}.dcm"
    ds.save_as(path)
    return path, ds


@pytest.mark.parametrize(
    "modality, sop, review",
    [
        ("CR", "1.2.840.10008.5.1.4.1.1.1", False),
        ("DX", "1.2.840.10008.5.1.4.1.1.1.1", False),
        ("US", "1.2.840.10008.5.1.4.1.1.6.1", True),
        ("OT", "1.2.840.10008.5.1.4.1.1.7", True),
    ],
)
def test_single_frame_dicom_2d(tmp_path, modality, sop, review):
    path, ds = _single_frame(tmp_path, modality, sop)
    items, rejected = scan_sources(tmp_path)
    assert len(items) == 1 and not rejected
    vol = load_item(items[0])
    assert vol.array.shape == (ds.Columns, ds.Rows, 1)
    np.testing.assert_array_equal(vol.array[:, :, 0], ds.pixel_array.T)
    assert ("needs_pixel_review" in vol.meta["flags"]) == review
    assert vol.meta["geometry"] == "pixel_spacing_only"
    ps = [float(v) for v in ds.PixelSpacing]
    np.testing.assert_allclose(vol.spacing[:2], (ps[1], ps[0]))


def test_burned_in_annotation_flag_and_monochrome1(tmp_path):
    path, ds = _single_frame(tmp_path, "CR", "1.2.840.10008.5.1.4.1.1.1", burned="YES", mono1=True)
    vol = load_item(scan_sources(tmp_path)[0][0])
    assert {"burned_in_annotation", "needs_pixel_review", "inverted_monochrome1"} <= set(vol.meta["flags"])
    raw = ds.pixel_array.T.astype(np.int64)
    np.testing.assert_array_equal(vol.array[:, :, 0], raw.max() + raw.min() - raw)


def test_missing_image_raises_ingest_error(tmp_path):
    with pytest.raises(IngestError):
        read_image(tmp_path / "nope.png")
