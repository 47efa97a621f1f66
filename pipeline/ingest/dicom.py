"""DICOM header scanning, series grouping (as dcm2niix does) and pixel decoding.

Two phases keep scanning fast:

* :func:`read_header` reads one file without its pixels (``stop_before_pixels``) and returns a picklable
  :class:`HeaderRecord` (or a :class:`~pipeline.ingest.sources.Rejected`-style ``(code, reason)``);
  :func:`group_series` splits the records into series/volumes.
* :func:`load_dicom_files` decodes the pixels of one group and hands the slices to
  :mod:`pipeline.ingest.dicom_geometry`, which sorts, checks and assembles them.

Tags used (keyword and number), so a reader can check the logic against the standard:

* grouping: StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E), SeriesNumber (0020,0011),
  EchoNumbers (0018,0086), ImageType (0008,0008), ImageOrientationPatient (0020,0037), Rows (0028,0010),
  Columns (0028,0011). AcquisitionNumber (0020,0012) is *not* a split key (dcm2niix does not split on it
  by default: GE CT gives every slice its own number); it orders the volumes of a 4D series together with
  InstanceNumber (0020,0013) and TemporalPositionIdentifier (0020,0100).
* geometry: ImagePositionPatient (0020,0032), PixelSpacing (0028,0030), SliceThickness (0018,0050),
  SpacingBetweenSlices (0018,0088), GantryDetectorTilt (0018,1120); enhanced multi-frame files carry them
  in SharedFunctionalGroupsSequence (5200,9229) / PerFrameFunctionalGroupsSequence (5200,9230):
  PlanePositionSequence (0020,9113), PlaneOrientationSequence (0020,9116), PixelMeasuresSequence
  (0028,9110), PixelValueTransformationSequence (0028,9145), FrameContentSequence (0020,9111).
* pixels: BitsAllocated (0028,0100), BitsStored (0028,0101), PixelRepresentation (0028,0103),
  PhotometricInterpretation (0028,0004), RescaleSlope (0028,1053), RescaleIntercept (0028,1052),
  ModalityLUTSequence (0028,3000), NumberOfFrames (0028,0008), TransferSyntaxUID (0002,0010).
* Siemens mosaic: ImageType contains ``MOSAIC`` and the CSA image header (0029,1010) holds
  ``NumberOfImagesInMosaic`` and ``SliceNormalVector`` (parsed with :mod:`nibabel.nicom.csareader`).
* DICOMDIR: MediaStorageSOPClassUID (0002,0002) = 1.2.840.10008.1.3.10 (Media Storage Directory).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import IngestError

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: SOP classes / modalities whose pixels may carry burned-in text (ultrasound, secondary capture).
REVIEW_MODALITIES = {"US", "SC", "XC", "OT"}
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture family
IOP_TOL = 1e-3  # max abs difference of ImageOrientationPatient cosines within one series

_UNCOMPRESSED_TS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}


def _quiet_dcmread(source: Any, **kwargs: Any) -> Any:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(source, **kwargs)


def _f(value: Any, default: float | None = None) -> float | None:
    try:
        if value is None or value == "":
            return default
        out = float(value)
        return out if math.isfinite(out) else default
    except (TypeError, ValueError):
        return default


def _i(value: Any, default: int | None = None) -> int | None:
    try:
        if value is None or value == "":
            return default
        return int(float(value))
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _s(value: Any) -> str:
    return "" if value is None else str(value).strip()


def parse_age(value: Any) -> float | None:
    """Age in years from PatientAge (0010,1010), an AS string such as ``045Y``/``006M``/``003W``/``002D``."""
    text = _s(value).upper()
    if len(text) < 2 or not text[:-1].isdigit():
        return None
    n = int(text[:-1])
    return {"Y": float(n), "M": n / 12.0, "W": n * 7 / 365.25, "D": n / 365.25}.get(text[-1])


def _sex(value: Any) -> str | None:
    text = _s(value).upper()
    return text if text in {"M", "F", "O"} else None


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


def public_facts(ds: Any) -> dict[str, Any]:
    """Non-identifying header facts of a dataset (safe to publish).

    Reads Modality (0008,0060), Manufacturer (0008,0070), ManufacturerModelName (0008,1090),
    BodyPartExamined (0018,0015), PatientSex (0010,0040), PatientAge (0010,1010; never BirthDate),
    PhotometricInterpretation (0028,0004), BitsStored (0028,0101), TransferSyntaxUID (0002,0010),
    GantryDetectorTilt (0018,1120), BurnedInAnnotation (0028,0301), SOPClassUID (0008,0016).
    """
    meta = getattr(ds, "file_meta", None)
    ts = _s(getattr(meta, "TransferSyntaxUID", None)) if meta is not None else ""
    modality = _s(ds.get("Modality")) or None
    flags: list[str] = []
    burned = _s(ds.get("BurnedInAnnotation")).upper() == "YES"
    sop = _s(ds.get("SOPClassUID"))
    if burned:
        flags.append("burned_in_annotation")
    if burned or (modality in REVIEW_MODALITIES) or sop.startswith(SC_SOP_PREFIX):
        flags.append("needs_pixel_review")
    return {
        "modality": modality,
        "manufacturer": _s(ds.get("Manufacturer")) or None,
        "manufacturer_model": _s(ds.get("ManufacturerModelName")) or None,
        "body_part": _s(ds.get("BodyPartExamined")) or None,
        "sex": _sex(ds.get("PatientSex")),
        "age_years": parse_age(ds.get("PatientAge")),
        "photometric": _s(ds.get("PhotometricInterpretation")) or None,
        "bits_stored": _i(ds.get("BitsStored")),
        "transfer_syntax": ts or None,
        "gantry_tilt_deg": _f(ds.get("GantryDetectorTilt")),
        "flags": flags,
    }


def private_ids(ds: Any) -> dict[str, str]:
    """PRIVATE identifiers: PatientID (0010,0020), StudyInstanceUID (0020,000D), SeriesInstanceUID
    (0020,000E), AccessionNumber (0008,0050)."""
    out = {}
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"):
        value = _s(ds.get(key))
        if value:
            out[key] = value
    return out


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


def _first(seq: Any) -> Any:
    try:
        return seq[0] if seq else None
    except (TypeError, IndexError):
        return None


def _fg(ds: Any, frame_item: Any, seq_name: str) -> Any:
    """An item of a functional-group macro, per-frame first, then shared."""
    if frame_item is not None and seq_name in frame_item:
        return _first(frame_item.get(seq_name))
    shared = _first(ds.get("SharedFunctionalGroupsSequence"))
    if shared is not None and seq_name in shared:
        return _first(shared.get(seq_name))
    return None


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


def _iop_close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= IOP_TOL


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def item_key(parts: list[Any]) -> str:
    """A stable, non-identifying key: sha256 over the grouping keys and file set, 16 hex characters."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _split_duplicates(group: list[HeaderRecord]) -> list[list[HeaderRecord]]:
    """Copies of the same images (repeated SOPInstanceUID (0008,0018), e.g. an export holding the same
    series in several transfer syntaxes) are split by folder, then by TransferSyntaxUID, then one file each,
    so a copy never becomes a fake 4D volume."""
    uids = [r.sop_uid for r in group if r.sop_uid]
    if len(uids) == len(set(uids)):
        return [group]
    out: list[list[HeaderRecord]] = []
    for keyf in (lambda r: os.path.dirname(r.path), lambda r: r.transfer_syntax):
        sub: dict[str, list[HeaderRecord]] = {}
        for r in group:
            sub.setdefault(keyf(r), []).append(r)
        if len(sub) > 1:
            for g in sub.values():
                out.extend(_split_duplicates(g))
            return out
    return [[r] for r in group]


def group_series(records: list[HeaderRecord]) -> tuple[list[list[HeaderRecord]], list[tuple[str, str, str]]]:
    """Split header records into series/volumes as dcm2niix does.

    Files share a group when StudyInstanceUID, SeriesInstanceUID, SeriesNumber, EchoNumbers, ImageType,
    Rows/Columns and Modality agree and ImageOrientationPatient agrees within 1e-3. Groups that differ only
    in Rows/Columns whose slices interleave (lie inside the other group's slab) are a broken series: the
    smaller group's files are rejected with code ``mixed_sizes``.

    Returns:
        (groups, rejected) where each group is a list of records sorted by path and rejected holds
        ``(path, code, reason)``.
    """
    by_key: dict[tuple, list[list[HeaderRecord]]] = {}
    for rec in sorted(records, key=lambda r: r.path):
        clusters = by_key.setdefault(rec.group_key, [])
        for cluster in clusters:
            if _iop_close(cluster[0].iop, rec.iop):
                cluster.append(rec)
                break
        else:
            clusters.append([rec])
    groups = []
    for clusters in by_key.values():
        for c in clusters:
            groups.extend(_split_duplicates(c))

    # mixed sizes inside one series: same key except Rows/Columns (indices 5, 6)
    rejected: list[tuple[str, str, str]] = []
    family: dict[tuple, list[list[HeaderRecord]]] = {}
    for g in groups:
        k = g[0].group_key
        fam_key = k[:5] + k[7:]
        family.setdefault(fam_key, []).append(g)
    drop: set[int] = set()
    for fam in family.values():
        if len(fam) < 2:
            continue
        fam = sorted(fam, key=lambda g: (-len(g), g[0].path))
        main = fam[0]
        if main[0].iop is None or any(r.position is None for r in main):
            continue
        n = _normal(main[0].iop)
        proj = [float(np.dot(r.position, n)) for r in main]
        lo, hi = min(proj), max(proj)
        for other in fam[1:]:
            if other[0].iop is None or not _iop_close(other[0].iop, main[0].iop):
                continue
            op = [float(np.dot(r.position, n)) for r in other if r.position is not None]
            if op and all(lo - 1e-3 <= p <= hi + 1e-3 for p in op) and len(other) < len(main):
                drop.add(id(other))
                for r in other:
                    rejected.append(
                        (
                            r.path,
                            "mixed_sizes",
                            f"{r.path}: Rows (0028,0010) x Columns (0028,0011) = {r.rows} x {r.columns} inside "
                            f"a series whose other {len(main)} slices are {main[0].rows} x {main[0].columns} "
                            "(same SeriesInstanceUID (0020,000E), slice within the series' slab); expected one "
                            "image size per series",
                        )
                    )
    groups = [g for g in groups if id(g) not in drop]
    groups.sort(key=lambda g: g[0].path)
    return groups, rejected


# --------------------------------------------------------------------------------------------- decoding


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


def _decode(ds: Any, path: str) -> np.ndarray:
    """Decoded stored values (BitsStored masked, signed per PixelRepresentation), frames first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder errors become IngestError
        ts = _s(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None))
        msg = str(err)
        code = (
            "truncated"
            if ("length" in msg.lower() or "expected" in msg.lower() or "end" in msg.lower())
            else "decode_failed"
        )
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
        if spp == 1:
            frames = [_classic_modality_lut(f, ds) for f in frames]
        if _s(ds.get("PhotometricInterpretation")).upper() == "MONOCHROME1":
            frames = [_invert_monochrome1(f, ds) for f in frames]
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        ps = _floats(ds.get("PixelSpacing"), 2) or _floats(ds.get("ImagerPixelSpacing"), 2)
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


def _invert_monochrome1(arr: np.ndarray, ds: Any) -> np.ndarray:
    """MONOCHROME1 (0028,0004): low values are bright; invert so every image reads as MONOCHROME2."""
    lo, hi = float(arr.min()), float(arr.max())
    if arr.dtype.kind in "iu":
        return (int(hi + lo) - arr.astype(np.int64)).astype(np.int32)
    return (hi + lo - arr).astype(np.float32)
