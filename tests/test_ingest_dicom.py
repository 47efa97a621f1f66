"""DICOM reading against reference conversions nobody here wrote (dcm2niix, dicom2nifti).

Data: tests/data/dicom (subsets of public datasets, see its README). A missing file fails the test.
Comparison: both volumes reoriented to the closest canonical orientation (nibabel), voxels equal exactly,
affines put every corner voxel within 1e-3 mm of each other.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.errors import IngestError
from pipeline.ingest.sources import LoadOptions, SourceItem, load_dicom, load_item, scan_sources

DATA = Path(__file__).parent / "data" / "dicom"

warnings.filterwarnings("ignore", category=UserWarning)


def _must(path: Path) -> Path:
    assert path.exists(), f"test data missing: {path} (tests/data/dicom must ship with the repo)"
    return path


def _canonical(arr, affine):
    img = nib.as_closest_canonical(nib.Nifti1Image(arr, affine))
    return np.asanyarray(img.dataobj), img.affine


def _corner_err(a, b, shape):
    n = [s - 1 for s in shape[:3]]
    c = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])]).T
    return float(np.max(np.linalg.norm((a @ c - b @ c)[:3], axis=0)))


def _assert_matches_reference(vol, ref_path: Path, exact: bool = True):
    ref = nib.load(_must(ref_path))
    ref_data = np.asanyarray(ref.dataobj)
    slope, inter = ref.header.get_slope_inter()
    if slope is not None and not (slope == 1 and (inter or 0) == 0):
        ref_data = ref.get_fdata()
    while ref_data.ndim > 3 and ref_data.shape[-1] == 1:
        ref_data = ref_data[..., 0]
    a, aa = _canonical(vol.array, vol.affine)
    b, ba = _canonical(ref_data, ref.affine)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    if exact:
        np.testing.assert_array_equal(a.astype(np.float64), b.astype(np.float64))
    else:
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(np.abs(b).max()))
    assert _corner_err(aa, ba, a.shape) <= 1e-3


@pytest.mark.parametrize("name", ["3", "4", "5", "7", "9"])
def test_transfer_syntaxes_match_dcm2niix(name):
    """Big endian, RLE, JPEG lossless, JPEG-LS and JPEG 2000 copies decode to dcm2niix's voxels."""
    vol = load_dicom([str(_must(DATA / "dcm_qa_ts" / "In" / f"{name}.dcm"))])
    assert vol.array.shape == (64, 64, 35)
    assert vol.meta["modality"] == "MR" and vol.meta["n_files"] == 1
    _assert_matches_reference(vol, DATA / "dcm_qa_ts" / "Ref" / "1.nii")


def test_12bit_signed_with_high_bit_garbage_matches_dcm2niix():
    """BitsStored 12 with garbage in the high bits and PixelRepresentation 1: masked and sign-extended."""
    vol = load_dicom([str(_must(DATA / "dcm_qa_12bit" / "In" / "12bitSigned_0x0F0F.dcm"))])
    assert vol.array.min() < 0 and vol.array.max() < 2048 and vol.array.min() >= -2048
    _assert_matches_reference(vol, DATA / "dcm_qa_12bit" / "Ref" / "4.nii")


def test_siemens_mosaic_4d_matches_dcm2niix():
    items, rejected = scan_sources(_must(DATA / "dcm_qa_nih" / "In"), kinds=("dicom",))
    assert len(items) == 1 and items[0].header["n_files"] == 2 and items[0].header["mosaic"]
    vol = load_item(items[0])
    assert vol.array.shape == (72, 72, 5, 2) and vol.meta["axis4"] == "time"
    _assert_matches_reference(vol, DATA / "dcm_qa_nih" / "Ref" / "EPI_PE=AP_3.nii")


def test_enhanced_multiframe_philips_matches_dicom2nifti():
    """Per-frame functional groups: positions, orientation and per-frame RescaleSlope (float result)."""
    d = _must(DATA / "dicom2nifti" / "philips_enhanced" / "anatomical" / "001")
    items, _ = scan_sources(d, kinds=("dicom",))
    assert len(items) == 1 and items[0].header["enhanced"]
    vol = load_item(items[0])
    assert vol.array.shape == (256, 256, 8) and vol.array.dtype == np.float32
    _assert_matches_reference(
        vol, DATA / "dicom2nifti" / "philips_enhanced" / "anatomical" / "001_ground_truth.nii.gz", exact=False
    )


def _ct_files():
    return sorted(str(p) for p in _must(DATA / "dcm_qa_ct" / "In" / "GE").glob("*.dcm"))


def test_tilted_uneven_ct_raw_stack_matches_dcm2niix_voxels():
    """Slices sorted by ImagePositionPatient along the normal equal dcm2niix's raw stack (rows flipped)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from ingest_reference import raw_stack

    arr, _ = raw_stack(_ct_files())
    ref = np.asanyarray(nib.load(_must(DATA / "dcm_qa_ct" / "Ref" / "2_slices12-15.nii.gz")).dataobj)
    np.testing.assert_array_equal(arr[:, ::-1, :], ref)


def test_tilted_uneven_ct_refused_or_corrected():
    files = _ct_files()
    with pytest.raises(IngestError) as e:
        load_dicom(files, LoadOptions(tilt="refuse"))
    assert e.value.code == "gantry_tilt" and "(0020,0032)" in e.value.reason
    with pytest.raises(IngestError) as e:
        load_dicom(files, LoadOptions(uneven_spacing="refuse"))
    assert e.value.code == "uneven_spacing"
    vol = load_dicom(files)
    assert {"tilt_corrected", "resampled_uneven_slices"} <= set(vol.meta["flags"])
    assert vol.array.dtype == np.int16  # HU kept integer
    # orthogonal affine after correction
    m = vol.affine[:3, :3] / np.array(vol.spacing)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)
    assert abs(vol.meta["measured_tilt_deg"] - 18.5) < 0.1
    # world check: the first source slice lies on the corrected grid; sampling there returns its pixels
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from ingest_reference import source_consistency

    per_slice = source_consistency(vol.array, vol.affine, files)
    assert per_slice[0] < 1.0
    # and the wrong (uncorrected, InstanceNumber-stacked) geometry would be far off
    assert np.mean(per_slice) < 40


def test_ct_small_and_mr_small_from_pydicom_read_in_hu():
    from pydicom.data import get_testdata_file

    ct = load_dicom([get_testdata_file("CT_small.dcm")])
    assert ct.array.shape == (128, 128, 1) and ct.meta["modality"] == "CT"
    import pydicom

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert float(ds.RescaleIntercept) == -1024
    np.testing.assert_array_equal(ct.array[:, :, 0], ds.pixel_array.T.astype(np.int32) - 1024)  # HU
    mr = load_dicom([get_testdata_file("MR_small.dcm")])
    assert mr.array.shape == (64, 64, 1)
    np.testing.assert_allclose(mr.spacing[:2], (0.3125, 0.3125))
    copy = load_dicom([str(_must(DATA / "pydicom" / "CT_small.dcm"))])
    np.testing.assert_array_equal(copy.array, ct.array)


def test_same_series_uid_split_by_series_number(tmp_path):
    """dcm_qa_ts: 5 files share one SeriesInstanceUID but are 5 volumes (SeriesNumber differs)."""
    items, rejected = scan_sources(_must(DATA / "dcm_qa_ts" / "In"), kinds=("dicom",))
    assert len(items) == 5 and not rejected
    assert len({it.ids["SeriesInstanceUID"] for it in items}) == 1
    assert len({it.key for it in items}) == 5


def test_items_are_picklable_and_keys_stable():
    items1, _ = scan_sources(_must(DATA), kinds=("dicom",))
    items2, _ = scan_sources(DATA, kinds=("dicom",))
    assert [i.key for i in items1] == [i.key for i in items2]
    clone = pickle.loads(pickle.dumps(items1))
    assert clone == items1 and isinstance(clone[0], SourceItem)
    vol = load_item(items1[0])
    vol2 = pickle.loads(pickle.dumps(vol))
    np.testing.assert_array_equal(vol.array, vol2.array)


def test_meta_holds_no_identifiers():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    vol = load_dicom([path])
    text = repr(vol.meta)
    for kw in (
        "PatientName",
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstitutionName",
        "StudyDate",
    ):
        value = str(ds.get(kw, "")).strip()
        if value:
            assert value not in text, f"{kw} leaked into meta"
    assert vol.ids["PatientID"] == str(ds.PatientID)
    assert vol.meta["age_years"] is None or isinstance(vol.meta["age_years"], float)


def test_flipping_array_and_affine_keeps_world_coordinates():
    vol = load_dicom([str(_must(DATA / "dcm_qa_ts" / "In" / "3.dcm"))])
    a, aa = _canonical(vol.array, vol.affine)
    ijk = np.array([10, 20, 5, 1.0])
    world = vol.affine @ ijk
    back = np.linalg.inv(aa) @ world
    i, j, k = np.rint(back[:3]).astype(int)
    assert a[i, j, k] == vol.array[10, 20, 5]


@pytest.mark.parametrize("syntax", ["DeflatedExplicitVRLittleEndian", "RLELossless"])
def test_syntaxes_written_by_pydicom_decode_identically(tmp_path, syntax):
    """Deflate and RLE copies of CT_small decode to the same HU as the original."""
    import pydicom
    import pydicom.uid as uid
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(src)
    ts = getattr(uid, syntax)
    if syntax == "RLELossless":
        ds.compress(ts)
        ds.save_as(tmp_path / "x.dcm")
    else:
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(tmp_path / "x.dcm")
    assert str(pydicom.dcmread(tmp_path / "x.dcm").file_meta.TransferSyntaxUID) == ts
    a = load_dicom([src])
    b = load_dicom([str(tmp_path / "x.dcm")])
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert b.meta["transfer_syntax"] == ts
