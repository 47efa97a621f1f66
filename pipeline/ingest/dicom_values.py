"""Reading DICOM tag values: tolerant number/string parsing, public facts and private identifiers, and
the functional-group lookups of enhanced multi-frame files.

Tags: Modality (0008,0060), Manufacturer (0008,0070), ManufacturerModelName (0008,1090), BodyPartExamined
(0018,0015), PatientSex (0010,0040), PatientAge (0010,1010), PhotometricInterpretation (0028,0004),
BitsStored (0028,0101), TransferSyntaxUID (0002,0010), GantryDetectorTilt (0018,1120), BurnedInAnnotation
(0028,0301), SOPClassUID (0008,0016); PRIVATE: PatientID (0010,0020), StudyInstanceUID (0020,000D),
SeriesInstanceUID (0020,000E), AccessionNumber (0008,0050). Functional groups: SharedFunctionalGroupsSequence
(5200,9229), PerFrameFunctionalGroupsSequence (5200,9230).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

#: SOP classes / modalities whose pixels may carry burned-in text (ultrasound, secondary capture).
REVIEW_MODALITIES = {"US", "SC", "XC", "OT"}
SC_SOP_PREFIX = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture family


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


def usable_spacing(pixel_spacing: Any) -> bool:
    """PixelSpacing (0028,0030) given with both values positive and finite (``"0\\0"`` is not)."""
    return pixel_spacing is not None and all(math.isfinite(v) and v > 0 for v in pixel_spacing)
