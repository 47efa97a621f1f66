"""NIfTI-1/NIfTI-2 reading and writing through nibabel.

Axis order: NIfTI voxel order ``(i, j, k[, t])`` as stored in the file; the affine is the one nibabel
picks (sform when its code is set, else qform, else the fallback nibabel documents), mapping voxels to
RAS+ mm. Data are returned with the file's scaling (scl_slope/scl_inter) applied; integer files without
scaling keep their integer dtype. Big-endian files are converted to native byte order.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.volume import Volume


def _load(path: str) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for bad files
        raise IngestError(
            f"{path}: not readable as NIfTI ({type(err).__name__}: {err}); expected a .nii/.nii.gz file",
            "bad_nifti",
        ) from err


def nifti_header(path: str) -> dict[str, Any]:
    """Non-identifying header facts of a NIfTI file without reading its voxels."""
    if not os.path.isfile(path):
        raise IngestError(f"{path}: file not found; expected a NIfTI file", "unreadable")
    if os.path.getsize(path) == 0:
        raise IngestError(f"{path}: file is empty (0 bytes); expected a NIfTI file", "empty")
    img = _load(path)
    return {
        "shape_guess": [int(s) for s in img.shape],
        "dtype": str(img.get_data_dtype()),
        "n_files": 1,
        "format": type(img).__name__,
        "modality": None,
    }


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI file into a :class:`Volume` (axis order ``(i, j, k[, t])``, RAS+ affine).

    2D files get ``k = 1``; a 5D file or one with a singular affine is refused (IngestError).
    """
    path = os.fspath(path)
    img = _load(path)
    try:
        hdr = img.header
        slope, inter = hdr.get_slope_inter() if hasattr(hdr, "get_slope_inter") else (None, None)
        if slope is None or (slope == 1 and (inter or 0) == 0):
            arr = np.asanyarray(img.dataobj)
        else:
            arr = img.get_fdata(dtype=np.float32)
    except Exception as err:  # noqa: BLE001
        raise IngestError(
            f"{path}: voxel data unreadable ({type(err).__name__}: {err}); file truncated?", "truncated"
        ) from err
    arr = np.asarray(arr)
    if arr.dtype.byteorder not in ("=", "|"):
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim == 2:
        arr = arr[:, :, None]
    while arr.ndim > 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim > 4:
        raise IngestError(
            f"{path}: NIfTI shape {arr.shape} has {arr.ndim} dimensions; expected 2 to 4",
            "unsupported_layout",
        )
    affine = np.asarray(img.affine, dtype=np.float64)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise IngestError(
            f"{path}: affine {affine.tolist()} is singular; expected an invertible sform/qform",
            "bad_geometry",
        )
    codes = {}
    if hasattr(hdr, "get_sform"):
        codes = {"sform_code": int(hdr["sform_code"]), "qform_code": int(hdr["qform_code"])}
    meta = {
        "modality": None,
        "source_kind": "nifti",
        "n_files": 1,
        "axis4": "time" if arr.ndim == 4 else None,
        "geometry": "nifti" if any(codes.values()) else "nifti_no_xform",
        "dtype": str(arr.dtype),
        "flags": [] if any(codes.values()) else ["no_spatial_transform"],
        **codes,
    }
    return Volume(arr, affine, meta, {})


def write_nifti(volume: Volume, path: str | os.PathLike[str]) -> None:
    """Write ``volume`` as NIfTI-1 (``.nii`` or ``.nii.gz``) atomically; sform and qform = its affine.

    The array is written in its own dtype and ``(i, j, k[, t])`` order; ``read_nifti`` returns the same
    voxels and affine. Integer data keep their type; float64 is stored as float32.
    """
    import nibabel as nib

    from pipeline.io import atomic_path

    path = os.fspath(path)
    arr = volume.array
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    img = nib.Nifti1Image(arr, volume.affine)
    img.header.set_sform(volume.affine, code=1)
    img.header.set_qform(volume.affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    zooms = list(volume.spacing) + ([1.0] if arr.ndim == 4 else [])
    img.header.set_zooms(zooms)
    img.header.set_xyzt_units("mm", "sec")
    suffix = ".nii.gz" if path.endswith(".gz") else ".nii"
    with atomic_path(path) as tmp:
        tmp_named = str(tmp) + suffix
        nib.save(img, tmp_named)
        os.replace(tmp_named, tmp)
