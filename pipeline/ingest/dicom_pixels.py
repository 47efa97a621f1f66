"""DICOM pixel decoding: stored values -> modality LUT -> :class:`Slice` s with geometry.

Pixels: BitsAllocated (0028,0100), BitsStored (0028,0101), PixelRepresentation (0028,0103),
PhotometricInterpretation (0028,0004), RescaleSlope (0028,1053), RescaleIntercept (0028,1052),
ModalityLUTSequence (0028,3000), NumberOfFrames (0028,0008), TransferSyntaxUID (0002,0010); enhanced
multi-frame geometry from the functional groups; Siemens mosaics cut into tiles. The slices go on to
:mod:`pipeline.ingest.dicom_geometry`, which sorts, checks and assembles them.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.dicom_header import (
    _UNCOMPRESSED_TS,
    HeaderRecord,
    _check_transfer_syntax,
    _csa_image,
    _csareader,
    _is_mosaic,
    _last_element_short,
    mosaic_count,
)
from pipeline.ingest.dicom_series import _normal
from pipeline.ingest.dicom_values import _f, _fg, _floats, _i, _quiet_dcmread, _s, usable_spacing

_DEFLATED_TS = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: native pixels once inflated


@dataclass
class Slice:
    """One decoded 2D image plane (pixels in pydicom's ``(row, column)`` layout) and its geometry."""

    pixels: np.ndarray
    position: np.ndarray | None
    iop: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) as PixelSpacing (0028,0030)
    order_key: tuple
    thickness: float | None = None
    spacing_between: float | None = None


def _pixel_data_short(ds: Any, ts: str) -> bool:
    """True when the file was cut inside its pixels.

    Native (uncompressed) Pixel Data (7FE0,0010) holding fewer bytes than Rows (0028,0010) x Columns
    (0028,0011) x NumberOfFrames (0028,0008) x SamplesPerPixel (0028,0002) x BitsAllocated (0028,0100) / 8
    (pydicom's ``get_expected_length``), or, for any syntax, a last element shorter than its header says.
    """
    if _last_element_short(ds):
        return True
    if (ts not in _UNCOMPRESSED_TS and ts != _DEFLATED_TS) or "PixelData" not in ds:
        return False
    from pydicom.pixels.utils import get_expected_length

    value = ds["PixelData"].value
    try:
        expected = get_expected_length(ds, "bytes")
    except Exception:  # noqa: BLE001 - header values too broken to compute a length: not "truncated"
        return False
    return isinstance(value, (bytes, bytearray)) and len(value) < expected


def _decode(ds: Any, path: str) -> np.ndarray:
    """Decoded stored values (BitsStored masked, signed per PixelRepresentation), frames first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (KeyboardInterrupt, SystemExit, MemoryError, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - decoder errors become IngestError
        # BaseException, not Exception: the Rust decoder plugins (pylibjpeg-rle) panic on a corrupt
        # fragment with pyo3's PanicException, which derives from BaseException; a bad file must stay
        # a per-file rejection, never end the run.
        ts = _s(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None))
        msg = str(err)
        # the code comes from the file's structure, never from the decoder's message text
        code = "truncated" if _pixel_data_short(ds, ts) else "decode_failed"
        raise IngestError(
            f"{path}: Pixel Data (7FE0,0010) cannot be decoded (TransferSyntaxUID (0002,0010) = {ts}): "
            f"{type(err).__name__}: {msg}",
            code,
        ) from err
    return np.asarray(arr)


def _rescale(arr: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Apply RescaleSlope (0028,1053) / RescaleIntercept (0028,1052) (the modality LUT)."""
    if slope == 1.0 and intercept == 0.0:
        return arr
    if slope == 1.0 and float(intercept).is_integer() and arr.dtype.kind in "iu":
        return arr.astype(np.int32) + int(intercept)
    return (arr.astype(np.float64) * slope + intercept).astype(np.float32)


def _frame_scale(ds: Any, frame_item: Any) -> tuple[float, float]:
    item = _fg(ds, frame_item, "PixelValueTransformationSequence")
    if item is not None and "RescaleSlope" in item:
        return _f(item.get("RescaleSlope"), 1.0) or 1.0, _f(item.get("RescaleIntercept"), 0.0) or 0.0
    return _f(ds.get("RescaleSlope"), 1.0) or 1.0, _f(ds.get("RescaleIntercept"), 0.0) or 0.0


def _classic_modality_lut(arr: np.ndarray, ds: Any) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(arr, ds))
    slope, intercept = _frame_scale(ds, None)
    return _rescale(arr, slope, intercept)


def _mosaic_slices(ds: Any, arr: np.ndarray, path: str, order_key: tuple) -> list[Slice]:
    """Cut a Siemens mosaic into its tiles and compute each tile's ImagePositionPatient.

    The mosaic's ImagePositionPatient (0020,0032) is the corner of the whole mosaic; the true position of
    the first tile is shifted by half the difference between mosaic and tile size (as nibabel's
    ``MosaicWrapper.image_position``). Tiles follow the CSA ``SliceNormalVector``, spaced by
    SpacingBetweenSlices (0018,0088), else SliceThickness (0018,0050).
    """
    n = mosaic_count(ds, path)
    m = int(math.ceil(math.sqrt(n)))
    rows, cols = arr.shape[:2]
    if rows < m or cols < m:
        raise IngestError(
            f"{path}: mosaic of Rows x Columns = {rows} x {cols} cannot hold a {m} x {m} grid of "
            f"NumberOfImagesInMosaic = {n} tiles; expected at least {m} pixels per side",
            "bad_mosaic",
        )
    tr, tc = rows // m, cols // m
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    ps = _floats(ds.get("PixelSpacing"), 2)
    if iop is None or ipp is None or ps is None:
        raise IngestError(
            f"{path}: mosaic lacks ImageOrientationPatient (0020,0037), ImagePositionPatient (0020,0032) or "
            "PixelSpacing (0028,0030); expected all three",
            "missing_geometry",
        )
    csareader = _csareader()
    row_c, col_c = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = _normal(iop)
    csa = _csa_image(ds)
    try:
        sn = csareader.get_slice_normal(csa)
        if sn is not None and np.linalg.norm(sn) > 0:
            normal = np.asarray(sn, dtype=float) / np.linalg.norm(sn)
    except Exception:  # noqa: BLE001
        pass
    step = _f(ds.get("SpacingBetweenSlices")) or _f(ds.get("SliceThickness"))
    if not step:
        raise IngestError(
            f"{path}: mosaic has neither SpacingBetweenSlices (0018,0088) nor SliceThickness (0018,0050); "
            "expected the slice spacing",
            "missing_geometry",
        )
    origin = (
        np.asarray(ipp) + row_c * ps[1] * (cols - cols / m) / 2.0 + col_c * ps[0] * (rows - rows / m) / 2.0
    )
    slices = []
    for t in range(n):
        r0, c0 = (t // m) * tr, (t % m) * tc
        tile = arr[r0 : r0 + tr, c0 : c0 + tc]
        slices.append(
            Slice(
                pixels=tile,
                position=origin + t * step * normal,
                iop=iop,
                pixel_spacing=(ps[0], ps[1]),
                order_key=order_key,
                thickness=_f(ds.get("SliceThickness")),
                spacing_between=step,
            )
        )
    return slices


def _enhanced_slices(ds: Any, arr: np.ndarray, path: str) -> list[Slice]:
    """Frames of an enhanced multi-frame file, with per-frame geometry and rescale."""
    frames = ds.get("PerFrameFunctionalGroupsSequence") or []
    n = _i(ds.get("NumberOfFrames"), 1) or 1
    if arr.ndim == 2:
        arr = arr[None]
    if len(frames) != n or arr.shape[0] != n:
        raise IngestError(
            f"{path}: NumberOfFrames (0028,0008) = {n} but PerFrameFunctionalGroupsSequence (5200,9230) has "
            f"{len(frames)} items and Pixel Data {arr.shape[0]} frames; expected equal counts",
            "bad_multiframe",
        )
    out = []
    for f_idx, item in enumerate(frames):
        pos_item = _fg(ds, item, "PlanePositionSequence")
        ori_item = _fg(ds, item, "PlaneOrientationSequence")
        pm_item = _fg(ds, item, "PixelMeasuresSequence")
        fc_item = _fg(ds, item, "FrameContentSequence")
        pos = _floats(pos_item.get("ImagePositionPatient") if pos_item is not None else None, 3)
        iop = _floats(ori_item.get("ImageOrientationPatient") if ori_item is not None else None, 6)
        ps = _floats(pm_item.get("PixelSpacing") if pm_item is not None else None, 2)
        slope, intercept = _frame_scale(ds, item)
        temporal = _i(fc_item.get("TemporalPositionIndex"), 0) if fc_item is not None else 0
        stack = _s(fc_item.get("StackID")) if fc_item is not None else ""
        out.append(
            Slice(
                pixels=_rescale(arr[f_idx], slope, intercept),
                position=np.asarray(pos) if pos else None,
                iop=iop,
                pixel_spacing=ps,
                order_key=(stack, temporal or 0, f_idx),
                thickness=_f(pm_item.get("SliceThickness")) if pm_item is not None else None,
                spacing_between=_f(pm_item.get("SpacingBetweenSlices")) if pm_item is not None else None,
            )
        )
    return out


def decode_file(path: str, record: HeaderRecord | None = None) -> tuple[list[Slice], Any]:
    """Decode one DICOM file into slices with geometry, modality LUT applied.

    Returns:
        (slices, dataset without pixel data) - the dataset is used for public facts only.
    """
    try:
        ds = _quiet_dcmread(path, force=True)
    except Exception as err:  # noqa: BLE001
        raise IngestError(
            f"{path}: not readable as DICOM ({type(err).__name__}: {err})", "not_dicom"
        ) from err
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise IngestError(f"{path}: no Pixel Data (7FE0,0010); expected an image object", "no_pixel_data")
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import ImplicitVRLittleEndian

        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ts = _s(ds.file_meta.TransferSyntaxUID)
    bad = _check_transfer_syntax(path, ts)
    if bad:
        raise IngestError(bad[1], bad[0])
    arr = _decode(ds, path)
    if record is not None:
        order_key = record.order_key
    else:
        order_key = (
            _i(ds.get("AcquisitionNumber"), 0) or 0,
            _i(ds.get("TemporalPositionIdentifier"), 0) or 0,
            _i(ds.get("InstanceNumber"), 0) or 0,
            os.path.basename(path),
        )
    if "PerFrameFunctionalGroupsSequence" in ds:
        slices = _enhanced_slices(ds, arr, path)
    else:
        n_frames = _i(ds.get("NumberOfFrames"), 1) or 1
        spp = _i(ds.get("SamplesPerPixel"), 1) or 1
        frames = [arr] if n_frames == 1 else [arr[i] for i in range(n_frames)]
        if _s(ds.get("PhotometricInterpretation")).upper() == "PALETTE COLOR":
            frames = [_palette_to_rgb(f, ds, path) for f in frames]
        elif spp == 1:
            frames = [_classic_modality_lut(f, ds) for f in frames]
        if _s(ds.get("PhotometricInterpretation")).upper() == "MONOCHROME1":
            frames = [_invert_monochrome1(f, ds) for f in frames]
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        ps = _floats(ds.get("PixelSpacing"), 2)
        imager_ps = _floats(ds.get("ImagerPixelSpacing"), 2)
        if not usable_spacing(ps) and usable_spacing(imager_ps):  # e.g. CR with PixelSpacing "0\\0"
            ps = imager_ps
        ps = ps or imager_ps
        if _is_mosaic(ds):
            slices = _mosaic_slices(ds, frames[0], path, order_key)
        else:
            slices = [
                Slice(
                    pixels=f,
                    position=np.asarray(ipp) if (ipp and n_frames == 1) else None,
                    iop=iop,
                    pixel_spacing=ps,
                    order_key=order_key + (i,),
                    thickness=_f(ds.get("SliceThickness")),
                    spacing_between=_f(ds.get("SpacingBetweenSlices")),
                )
                for i, f in enumerate(frames)
            ]
    if "PixelData" in ds:
        del ds.PixelData
    return slices, ds


def _palette_to_rgb(arr: np.ndarray, ds: Any, path: str) -> np.ndarray:
    """PALETTE COLOR (0028,0004): stored values are indices into the Red/Green/Blue Palette Color Lookup
    Tables; pydicom's ``apply_color_lut`` maps them (plain and segmented tables). Entries of more than 8
    bits (descriptor (0028,1101) third value, usually 16) are brought to 8-bit RGB by dropping the low bits,
    as DICOM viewers display them, so palette images join the 8-bit colour path like RGB and YBR files."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = np.asarray(apply_color_lut(arr, ds))
    except Exception as err:  # noqa: BLE001 - missing or inconsistent tables: a per-file rejection
        raise IngestError(
            f"{path}: PhotometricInterpretation (0028,0004) is PALETTE COLOR but the palette lookup tables "
            f"(0028,1101-1103, 0028,1201-1203 or 1221-1223) cannot be applied ({type(err).__name__}); "
            "expected complete Red/Green/Blue tables",
            "bad_palette",
        ) from err
    rgb = rgb[..., :3]  # an alpha table, when present, is not image content
    if rgb.dtype.itemsize > 1:
        desc = ds.get("RedPaletteColorLookupTableDescriptor")
        bits = int(desc[2]) if desc is not None and len(desc) == 3 and int(desc[2]) > 8 else 16
        rgb = rgb.astype(np.uint32) >> (bits - 8)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _invert_monochrome1(arr: np.ndarray, ds: Any) -> np.ndarray:
    """MONOCHROME1 (0028,0004): low values are bright; invert so every image reads as MONOCHROME2."""
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind in "iu":
        return (int(hi + lo) - arr.astype(np.int64)).astype(np.int32)
    return (hi + lo - arr).astype(np.float32)
