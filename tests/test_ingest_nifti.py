"""NIfTI reading (NIfTI-1, NIfTI-2, big endian, 4D) and the write/read round trip."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import IngestError
from pipeline.ingest.nifti import read_nifti, write_nifti
from pipeline.ingest.sources import scan_sources
from pipeline.ingest.volume import Volume

DATA = Path(__file__).parent / "data" / "nifti"


@pytest.mark.parametrize(
    "name, shape",
    [
        ("anatomical.nii", (33, 41, 25)),
        ("functional.nii", (17, 21, 3, 20)),
        ("example_nifti2.nii.gz", (32, 20, 12, 2)),
        ("someones_anatomy.nii.gz", (57, 67, 56)),
    ],
)
def test_read_matches_nibabel(name, shape):
    path = DATA / name
    assert path.exists(), f"test data missing: {path}"
    vol = read_nifti(path)
    img = nib.load(path)
    assert vol.array.shape == shape
    np.testing.assert_array_equal(vol.array, np.asanyarray(img.dataobj))
    np.testing.assert_allclose(vol.affine, img.affine)
    assert vol.array.dtype.byteorder in ("=", "|")  # big-endian input converted to native
    assert vol.meta["axis4"] == ("time" if len(shape) == 4 else None)
    assert vol.ids == {}
    np.testing.assert_allclose(vol.spacing, img.header.get_zooms()[:3], rtol=1e-5)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_write_read_round_trip_keeps_voxels_and_affine(tmp_path, suffix):
    rng = np.random.default_rng(0)
    arr = rng.integers(-1000, 2000, size=(7, 5, 4), dtype=np.int16)
    aff = np.array([[0, -0.8, 0.1, 10], [0.9, 0, 0, -20], [0, 0.05, 2.5, 3], [0, 0, 0, 1]], dtype=float)
    vol = Volume(arr, aff, {"modality": "CT"})
    out = tmp_path / f"x{suffix}"
    write_nifti(vol, out)
    back = read_nifti(out)
    np.testing.assert_array_equal(back.array, arr)
    assert back.array.dtype == arr.dtype
    np.testing.assert_allclose(back.affine, aff, atol=1e-6)
    assert back.orientation == vol.orientation
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"


def test_round_trip_real_file_4d(tmp_path):
    vol = read_nifti(DATA / "example_nifti2.nii.gz")
    write_nifti(vol, tmp_path / "y.nii.gz")
    back = read_nifti(tmp_path / "y.nii.gz")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)


def test_bad_nifti_is_ingest_error(tmp_path):
    bad = tmp_path / "bad.nii"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(IngestError) as e:
        read_nifti(bad)
    assert e.value.code == "bad_nifti" and str(bad) in e.value.reason
    items, rejected = scan_sources(tmp_path)
    assert not items and rejected[0].code == "bad_nifti"


def test_volume_refuses_singular_affine():
    with pytest.raises(ValueError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.zeros((4, 4)))
