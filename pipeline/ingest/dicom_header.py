"""DICOM header scanning: read one file without its pixels and decide whether it is a usable image.

:func:`read_header` returns a picklable :class:`HeaderRecord` (or a ``(code, reason)`` rejection); the
Siemens mosaic helpers (CSA image header (0029,1010), ``NumberOfImagesInMosaic``) and the transfer-syntax
check live here too since both the scan and the decoder use them. Tags: see :mod:`pipeline.ingest.dicom`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import IngestError
from pipeline.ingest.dicom_values import (
    _fg,
    _first,
    _floats,
    _i,
    _quiet_dcmread,
    _s,
    private_ids,
    public_facts,
)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_UNCOMPRESSED_TS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


@dataclass(frozen=True)
class HeaderRecord:
    """What :func:`read_header` learns from one DICOM file without decoding pixels (picklable).

    ``ids`` is PRIVATE (PatientID etc.); ``facts`` holds only non-identifying values.
    """

    path: str
    group_key: tuple
    iop: tuple[float, ...] | None
    position: tuple[float, ...] | None
    rows: int
    columns: int
    n_frames: int
    is_mosaic: bool
    is_enhanced: bool
    order_key: tuple
    sop_uid: str = ""
    transfer_syntax: str = ""
    ids: dict = field(default_factory=dict)
    facts: dict = field(default_factory=dict)



def _is_mosaic(ds: Any) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return "MOSAIC" in image_type and (0x0029, 0x1010) in ds


def _csareader() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader
    return csareader


def _csa_image(ds: Any) -> dict:
    csareader = _csareader()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return csareader.get_csa_header(ds, "image") or {}
    except Exception:  # noqa: BLE001 - a broken CSA header means "not a usable mosaic"
        return {}


def mosaic_count(ds: Any, path: str) -> int:
    """NumberOfImagesInMosaic from the Siemens CSA image header (0029,1010)."""
    csareader = _csareader()

    csa = _csa_image(ds)
    n = None
    if csa:
        try:
            n = csareader.get_n_mosaic(csa)
        except Exception:  # noqa: BLE001
            n = None
    if not n:
        raise IngestError(
            f"{path}: ImageType (0008,0008) says MOSAIC but the Siemens CSA image header (0029,1010) has no "
            "NumberOfImagesInMosaic; expected a positive count of tiles",
            "bad_mosaic",
        )
    return int(n)



def _enhanced_iop(ds: Any) -> tuple[float, ...] | None:
    frames = ds.get("PerFrameFunctionalGroupsSequence")
    item = _fg(ds, _first(frames), "PlaneOrientationSequence")
    return _floats(item.get("ImageOrientationPatient") if item is not None else None, 6)


def _is_dicom_like(ds: Any, has_preamble: bool) -> bool:
    if has_preamble:
        return True
    keys = {int(t) for t in ds.keys()}
    must_any = {0x00080016, 0x00080060, 0x0020000D, 0x00280010, 0x00080018}
    return bool(keys & must_any)


def read_header(path: str) -> HeaderRecord | tuple[str, str]:
    """Read one file's header (no pixels) and decide whether it is a usable DICOM image.

    Files with or without the 128-byte preamble + ``DICM`` are accepted (``force=True``), but a file read
    that way must hold at least one of SOPClassUID (0008,0016), SOPInstanceUID (0008,0018), Modality
    (0008,0060), StudyInstanceUID (0020,000D) or Rows (0028,0010) to count as DICOM.

    Args:
        path: File path (never modified; opened read-only).

    Returns:
        A :class:`HeaderRecord`, or ``(code, reason)`` when the file is not a usable DICOM image
        (codes ``empty``, ``not_dicom``, ``dicomdir``, ``no_pixel_data``, ``truncated``,
        ``unsupported_transfer_syntax``, ``bad_mosaic``).
    """
    try:
        size = os.path.getsize(path)
    except OSError as err:
        return "unreadable", f"{path}: cannot stat file ({err})"
    if size == 0:
        return "empty", f"{path}: file is empty (0 bytes); expected a DICOM file"
    if os.path.basename(path).upper() == "DICOMDIR":
        return "dicomdir", f"{path}: DICOMDIR index file (media directory), not an image; ignored"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            has_preamble = len(head) == 132 and head[128:132] == b"DICM"
            fh.seek(0)
            ds = _quiet_dcmread(fh, stop_before_pixels=True, force=True)
            pixel_offset = fh.tell()
    except Exception as err:  # noqa: BLE001 - any parser failure means "not readable DICOM"
        return "not_dicom", f"{path}: not readable as DICOM ({type(err).__name__}: {err})"
    if not _is_dicom_like(ds, has_preamble):
        return "not_dicom", (
            f"{path}: no DICM preamble and none of SOPClassUID (0008,0016), Modality (0008,0060), "
            "StudyInstanceUID (0020,000D), Rows (0028,0010) found; not a DICOM file"
        )
    file_meta = getattr(ds, "file_meta", None)
    ms_sop = _s(getattr(file_meta, "MediaStorageSOPClassUID", None)) if file_meta is not None else ""
    if ms_sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "dicomdir", f"{path}: DICOMDIR (MediaStorageSOPClassUID (0002,0002) = {ms_sop}); ignored"

    # Is there a Pixel Data element (7FE0,0010) (or float/double variants) at the stop position?
    pixel_tag = b""
    with open(path, "rb") as fh:
        fh.seek(pixel_offset)
        pixel_tag = fh.read(12)
    tag_le = pixel_tag[:4]
    has_pixels = tag_le in (
        b"\xe0\x7f\x10\x00",
        b"\x7f\xe0\x00\x10",
        b"\xe0\x7f\x08\x00",
        b"\xe0\x7f\x09\x00",
    )
    ts_early = _s(getattr(file_meta, "TransferSyntaxUID", None)) if file_meta is not None else ""
    deflated = ts_early == "1.2.840.10008.1.2.1.99"
    if deflated:
        # the dataset is a zlib stream: file offsets mean nothing; inflate fully (rare syntax) to check
        try:
            full = _quiet_dcmread(path, force=True)
            has_pixels = "PixelData" in full
        except Exception as err:  # noqa: BLE001
            return (
                "truncated",
                f"{path}: deflated dataset (TransferSyntaxUID (0002,0010) = {ts_early}) cannot be inflated ({err})",
            )
    rows, cols = _i(ds.get("Rows")), _i(ds.get("Columns"))
    if not has_pixels:
        sop = _s(ds.get("SOPClassUID"))
        if _last_element_short(ds) or _is_image_sop(sop):
            return "truncated", (
                f"{path}: file ends at byte {size} before Pixel Data (7FE0,0010) although SOPClassUID "
                f"(0008,0016) = {sop or 'n/a'} is an image class; expected a complete DICOM image file "
                "(truncated, or pixel data stripped)"
            )
        return "no_pixel_data", (
            f"{path}: no Pixel Data (7FE0,0010) (SOPClassUID (0008,0016) = {_s(ds.get('SOPClassUID')) or 'n/a'}, "
            f"Modality (0008,0060) = {_s(ds.get('Modality')) or 'n/a'}, Rows (0028,0010) = {rows}, file size "
            f"{size} bytes); expected an image object"
        )
    if not (rows and cols):
        return "no_pixel_data", (
            f"{path}: Pixel Data present but Rows (0028,0010) = {rows!r}, Columns (0028,0011) = {cols!r}; "
            "expected positive integers"
        )
    ts = _s(getattr(file_meta, "TransferSyntaxUID", None)) if file_meta is not None else ""
    if not ts:
        ts = "1.2.840.10008.1.2"  # no meta header: implicit VR little endian (DICOM default)
    code_reason = _check_transfer_syntax(path, ts)
    if code_reason:
        return code_reason
    n_frames = _i(ds.get("NumberOfFrames"), 1) or 1
    if ts in _UNCOMPRESSED_TS and not deflated:
        bits = _i(ds.get("BitsAllocated"), 16) or 16
        spp = _i(ds.get("SamplesPerPixel"), 1) or 1
        expected = rows * cols * n_frames * spp * bits // 8
        if _s(ds.get("PhotometricInterpretation")) == "YBR_FULL_422":
            expected = expected * 2 // 3  # chroma subsampled 2:1 horizontally: 2 samples per pixel, not 3
        have = size - pixel_offset - 12 if pixel_tag[4:6].isalpha() else size - pixel_offset - 8
        if have < expected:
            return "truncated", (
                f"{path}: Pixel Data (7FE0,0010) holds {have} bytes; expected {expected} "
                f"(Rows {rows} x Columns {cols} x NumberOfFrames {n_frames} x SamplesPerPixel {spp} x "
                f"BitsAllocated {bits} / 8): truncated file"
            )

    is_enhanced = "PerFrameFunctionalGroupsSequence" in ds
    is_mosaic = _is_mosaic(ds)
    if is_enhanced:
        iop = _enhanced_iop(ds)
    else:
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
    position = None if is_enhanced else _floats(ds.get("ImagePositionPatient"), 3)
    image_type = image_type_key(ds.get("ImageType"))
    facts = public_facts(ds)
    if is_mosaic:
        try:
            facts["n_mosaic"] = mosaic_count(ds, path)
        except IngestError as err:
            return err.code, err.reason
    group_key = (
        _s(ds.get("StudyInstanceUID")),
        _s(ds.get("SeriesInstanceUID")),
        _i(ds.get("SeriesNumber"), -1),
        _s(ds.get("EchoNumbers")),
        image_type,
        rows,
        cols,
        _s(ds.get("Modality")),
        is_mosaic,
        is_enhanced,
        # an enhanced (multi-frame) file is a whole volume: never merged with another file
        _s(ds.get("SOPInstanceUID")) if (is_enhanced or n_frames > 1) else "",
        # images without patient geometry (CR/DX/US/SC) are each their own item
        "" if (position and iop) or is_enhanced else path,
    )
    order_key = (
        _i(ds.get("AcquisitionNumber"), 0) or 0,
        _i(ds.get("TemporalPositionIdentifier"), 0) or 0,
        _i(ds.get("InstanceNumber"), 0) or 0,
        os.path.basename(path),
    )
    return HeaderRecord(
        path=path,
        group_key=group_key,
        iop=iop,
        position=position,
        rows=rows,
        columns=cols,
        n_frames=n_frames,
        is_mosaic=is_mosaic,
        is_enhanced=is_enhanced,
        order_key=order_key,
        sop_uid=_s(ds.get("SOPInstanceUID")),
        transfer_syntax=ts,
        ids=private_ids(ds),
        facts=facts,
    )


_IMAGE_TYPE_TOKENS = {"P", "M", "R", "I", "PHASE", "MAGNITUDE", "REAL", "IMAGINARY", "LOCALIZER", "MOSAIC"}


def image_type_key(value: Any) -> tuple:
    """The parts of ImageType (0008,0008) that split series (as dcm2niix compares them): value 1
    (ORIGINAL/DERIVED) and the phase/magnitude/real/imaginary/localizer/mosaic tokens. Vendor extras
    such as GE's ``ADD`` on some slices of one CT series do not split it."""
    tokens = [_s(v).upper() for v in (value or [])]
    first = tokens[0] if tokens else ""
    return (first, tuple(sorted(set(tokens[1:]) & _IMAGE_TYPE_TOKENS)))


def _is_image_sop(uid: str) -> bool:
    """SOP classes named '... Image Storage' in pydicom's UID dictionary (CT, MR, CR, DX, US, SC ...)."""
    if not uid:
        return False
    from pydicom.uid import UID

    name = UID(uid).name
    return "Image Storage" in name


def _last_element_short(ds: Any) -> bool:
    """True when the last element read holds fewer value bytes than its header announced (file cut)."""
    try:
        raw = list(ds._dict.values())[-1] if ds._dict else None
    except Exception:  # noqa: BLE001
        return False
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if length is None or value is None or length == 0xFFFFFFFF or not isinstance(value, (bytes, bytearray)):
        return False
    return len(value) < length


def _check_transfer_syntax(path: str, ts: str) -> tuple[str, str] | None:
    from pydicom.pixels.decoders.base import get_decoder

    if ts in _UNCOMPRESSED_TS or ts == "1.2.840.10008.1.2.1.99":  # deflate is inflated by the parser
        return None
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        return "unsupported_transfer_syntax", (
            f"{path}: TransferSyntaxUID (0002,0010) = {ts} has no pixel decoder in pydicom; expected one of "
            "the syntaxes pydicom + pylibjpeg decode (implicit/explicit/big-endian, deflate, RLE, JPEG, "
            "JPEG-LS, JPEG 2000)"
        )
    if not decoder.is_available:
        return "unsupported_transfer_syntax", (
            f"{path}: TransferSyntaxUID (0002,0010) = {ts}: no decoder plugin installed "
            f"(missing: {decoder.missing_dependencies}); install pylibjpeg plugins"
        )
    return None


