"""Convert a folder of DICOM/NIfTI/images into pseudonymised NIfTI + JSON side-cars.

``convert_tree`` shows a user exactly what ingestion assembles from their export (like dcm2niix does),
without leaking identifiers:

* ``OUTPUT/<P-pseudonym>_<S-pseudonym>.nii.gz``: one file per assembled series/volume/image, voxels in
  NIfTI order ``(i, j, k[, t/c])`` with the RAS+ affine as sform and qform;
* ``OUTPUT/<same name>.json``: geometry and non-identifying facts (modality, manufacturer, spacing,
  orientation, flags, the patient pseudonym); no names, ids, UIDs, dates, institution, free text or
  source paths;
* ``OUTPUT/convert_report.json``: counts per outcome and refusal code (no paths);
* ``OUTPUT/private/convert_summary.json`` (folder mode 0700, file 0600): per input file, which output it
  went into or why it was refused. Source paths and raw ids appear only there.

All files are written atomically (:mod:`pipeline.io`). The input tree is only read.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, IngestError
from pipeline.ingest.decode_jobs import check_values, unexpected_failure
from pipeline.ingest.deid import ensure_private_dir, pseudonym
from pipeline.ingest.sources import LoadOptions, SourceItem, load_item, scan_sources
from pipeline.io import write_json

#: Volume.meta keys copied into the public side-car (all non-identifying).
SIDECAR_KEYS = (
    "modality",
    "manufacturer",
    "manufacturer_model",
    "body_part",
    "sex",
    "age_years",
    "photometric",
    "bits_stored",
    "transfer_syntax",
    "n_files",
    "gantry_tilt_deg",
    "measured_tilt_deg",
    "flags",
    "axis4",
    "geometry",
    "source_kind",
    "slice_gaps_mm",
    "dtype",
)


def _output_stem(item: SourceItem, key: bytes) -> tuple[str, str]:
    """(patient pseudonym, file stem). The patient is PatientID (0010,0020) when present, else the path."""
    raw_patient = item.ids.get("PatientID") or item.files[0]
    patient = pseudonym(raw_patient, key, prefix="P")
    series = pseudonym(f"{item.kind}|{item.key}", key, prefix="S")
    return patient, f"{patient}_{series}"


def _sidecar(vol: Any, patient: str, item: SourceItem) -> dict[str, Any]:
    side = {k: vol.meta.get(k) for k in SIDECAR_KEYS if k in vol.meta}
    side.update(
        {
            "pseudonym": patient,
            "kind": item.kind,
            "shape": [int(s) for s in vol.array.shape],
            "spacing_mm": [round(float(s), 6) for s in vol.spacing],
            "orientation": "".join(vol.orientation),
            "affine_ras": [[round(float(v), 6) for v in row] for row in vol.affine],
            "axis_order": "i, j, k" + (", " + str(vol.meta.get("axis4")) if vol.array.ndim == 4 else ""),
            "converter": "medtl.pipeline.ingest.convert",
        }
    )
    return side


def _load(item: SourceItem, options: LoadOptions) -> Any:
    """:func:`load_item`, with an unexpected reader failure turned into a per-item ``decode_failed``
    IngestError (as Ingest does): one odd file never ends the conversion with a traceback. The stored
    values get Ingest's check (:func:`check_values`: ``empty``, ``non_finite``, ``constant`` are refused)."""
    try:
        vol = load_item(item, options)
        check_values(vol.array, item.files[0] if len(item.files) == 1 else f"series starting {item.files[0]}")
        return vol
    except IngestError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a bad file, or a reader bug: reported, conversion goes on
        raise unexpected_failure(item, err) from err


def convert_tree(
    input_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    key: bytes,
    options: LoadOptions | None = None,
    data: Any = None,
) -> dict[str, Any]:
    """Convert every series/volume/image under ``input_dir`` into ``output_dir`` (see module doc).

    Args:
        input_dir: Folder to scan (read-only).
        output_dir: Destination; must not lie inside ``input_dir``.
        key: Pseudonymisation key (:func:`pipeline.ingest.deid.load_or_create_key`).
        options: Tilt / uneven-spacing policy; defaults to correcting both.
        data: A config's ``data`` section (``medtl convert --config``): with ``series_description``
            channels, each case's channels are also combined as Ingest combines them
            (:func:`pipeline.ingest.channels.load_case`) and written as ``<P>_<C-case>.nii.gz``
            ``(i, j, k, channels)`` with its side-car; cases without exactly one series per channel are
            counted by code.

    Returns:
        Public summary (no paths, no ids): ``converted`` (outputs written), ``refused`` (items that
        failed to load), ``rejected_files`` (files refused at scan), ``codes`` (count per refusal code),
        ``outputs`` (file names written), and with channels ``cases`` (``converted``, ``codes``,
        ``outputs``).

    Raises:
        ConfigError: ``input_dir`` missing or ``output_dir`` inside it.
    """
    options = options or LoadOptions()
    src = Path(input_dir).resolve()
    out = Path(output_dir).resolve()
    if not src.exists():
        raise ConfigError(f"convert: input {src} does not exist; expected a folder of DICOM/NIfTI/images")
    if src.is_dir() and (out == src or src in out.parents):
        raise ConfigError(
            f"convert: output {out} lies inside input {src}; expected a separate folder (a re-run would "
            "read its own outputs)"
        )
    out.mkdir(parents=True, exist_ok=True)
    private = ensure_private_dir(out / "private")

    items, rejected = scan_sources(src)
    per_file: dict[str, dict[str, Any]] = {}
    codes: dict[str, int] = {}
    outputs: list[str] = []
    private_items: list[dict[str, Any]] = []
    for r in rejected:
        per_file[r.path] = {"status": "rejected", "code": r.code, "reason": r.reason}
        codes[r.code] = codes.get(r.code, 0) + 1

    from pipeline.ingest.nifti import write_nifti

    n_refused = 0
    for item in items:
        patient, stem = _output_stem(item, key)
        try:
            vol = _load(item, options)
        except IngestError as err:
            n_refused += 1
            codes[err.code] = codes.get(err.code, 0) + 1
            for f in item.files:
                per_file[f] = {"status": "refused", "code": err.code, "reason": err.reason, "item": stem}
            private_items.append(
                {"output": None, "files": list(item.files), "ids": item.ids, "code": err.code}
            )
            continue
        nii = f"{stem}.nii.gz"
        write_nifti(vol, out / nii)
        write_json(out / f"{stem}.json", _sidecar(vol, patient, item))
        outputs.append(nii)
        for f in item.files:
            per_file[f] = {"status": "converted", "output": nii}
        private_items.append({"output": nii, "files": list(item.files), "ids": item.ids, "code": None})

    cases = _convert_cases(items, out, key, options, data, private_items) if data is not None else None
    summary = {
        "converted": len(outputs),
        "refused": n_refused,
        "rejected_files": len(rejected),
        "codes": dict(sorted(codes.items())),
        "outputs": sorted(outputs),
        "options": {"tilt": options.tilt, "uneven_spacing": options.uneven_spacing},
    }
    if cases is not None:
        summary["cases"] = cases
    write_json(out / "convert_report.json", summary)
    write_json(
        private / "convert_summary.json",
        {"input": str(src), "files": dict(sorted(per_file.items())), "items": private_items},
        mode=0o600,
    )
    return summary


def _convert_cases(
    items: list[SourceItem],
    out: Path,
    key: bytes,
    options: LoadOptions,
    data: Any,
    private_items: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """The combined channel volumes of ``data.channels`` (see :func:`convert_tree`); None without channels
    or with CSV-column channels (their cases are named by the labels CSV, which convert does not read)."""
    from pipeline.ingest.channels import case_units, load_case
    from pipeline.ingest.nifti import write_nifti

    if not data.channels or data.channels[0].column is not None:
        return None
    problems: list[dict[str, Any]] = []
    units = case_units(data, items, key, problems)
    codes: dict[str, int] = {}
    for p in problems:
        codes[p["code"]] = codes.get(p["code"], 0) + 1
    outputs = []
    for unit_key, members in units:
        case_id = pseudonym(unit_key, key, prefix="C")
        patient = pseudonym((members[0].ids or {}).get("PatientID") or unit_key, key, prefix="P")
        try:
            vol = load_case(data, members, options, case_id)
        except IngestError as err:
            codes[err.code] = codes.get(err.code, 0) + 1
            continue
        stem = f"{patient}_{case_id}"
        write_nifti(vol, out / f"{stem}.nii.gz")
        side = _sidecar(vol, patient, members[0])
        side.update(channels=[c.name for c in data.channels], kind="case (channels combined)")
        write_json(out / f"{stem}.json", side)
        outputs.append(f"{stem}.nii.gz")
        private_items.append(
            {
                "output": f"{stem}.nii.gz",
                "files": [f for m in members for f in m.files],
                "ids": {},
                "code": None,
            }
        )
    return {"converted": len(outputs), "codes": dict(sorted(codes.items())), "outputs": sorted(outputs)}
