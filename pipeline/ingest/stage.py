"""The Ingest stage: source tree + labels CSV -> de-identified manifest, cached volumes, report.

Flow: scan headers (no pixels) -> match label rows -> decode matched items in a process pool into the
workspace's volume cache (keyed by a content fingerprint, so later snapshots reuse them) -> pseudonyms and
splits -> ``manifest.csv`` and ``ingest_report.json`` in the stage folder, and the source mapping under
``private/``. Bad files and bad label rows are reported with their reason; the run goes on with the rest.
Shared outputs never hold a raw identifier or a source path: reasons that name a file are rewritten to an
opaque file token, and the token's path is in ``private/``.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import IngestError
from pipeline.ingest.deid import ensure_private_dir, load_or_create_key, pseudonym
from pipeline.ingest.labels import LabelRow, normalise_ref, read_labels
from pipeline.ingest.splits import assign_splits
from pipeline.io import write_bytes, write_json, write_text

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "case_id", "patient_id", "label", "label_index", "class_name", "split", "kind", "modality",
    "manufacturer", "sex", "age_band", "shape", "spacing", "orientation", "flags", "volume",
]
CACHE_VERSION = 1


@dataclass(frozen=True)
class _Job:
    item: Any  # SourceItem
    cache_file: str
    options: Any  # LoadOptions


def _decode_to_cache(job: _Job) -> dict[str, Any]:
    """Decode one item and save its voxels to the cache (runs in a worker process)."""
    from pipeline.ingest.sources import load_item

    cache_file = Path(job.cache_file)
    meta_file = cache_file.with_suffix(".json")
    if cache_file.exists() and meta_file.exists():
        return json.loads(meta_file.read_text())
    vol = load_item(job.item, job.options)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(vol.array), allow_pickle=False)
    write_bytes(cache_file, buf.getvalue())
    meta = dict(vol.meta)
    meta["affine"] = vol.affine.tolist()
    meta["shape"] = list(vol.array.shape)
    write_json(meta_file, meta)
    return json.loads(meta_file.read_text())


def _fingerprint(key: bytes, item: Any, options: Any) -> str:
    stats = []
    for f in item.files:
        st = os.stat(f)
        stats.append((f, st.st_size, st.st_mtime_ns))
    blob = json.dumps([item.key, stats, repr(options), CACHE_VERSION], separators=(",", ":"))
    return hmac.new(key, blob.encode(), hashlib.sha256).hexdigest()[:24]


def _file_token(key: bytes, path: str) -> str:
    return pseudonym(path, key, prefix="F")


def _redact(reason: str, paths: list[str], key: bytes, root: Path) -> str:
    """Replace every source path (absolute or relative to the source root) in ``reason`` by its token."""
    for p in sorted(paths, key=len, reverse=True):
        token = f"<file {_file_token(key, p)}>"
        reason = reason.replace(p, token)
        try:
            reason = reason.replace(os.path.relpath(p, root), token)
        except ValueError:
            pass
    return reason


def age_band(age_years: Any) -> str:
    """Coarse age band ('<18', '18-39', '40-59', '60-79', '>=80') or '' when unknown."""
    if age_years is None or age_years == "":
        return ""
    a = float(age_years)
    if a < 18:
        return "<18"
    if a < 40:
        return "18-39"
    if a < 60:
        return "40-59"
    if a < 80:
        return "60-79"
    return ">=80"


def _case_refs(item: Any, root: Path, id_type: str) -> list[str]:
    """The references under which a labels CSV row may name this item."""
    if id_type != "path":
        value = (item.ids or {}).get(id_type)
        return [value.strip()] if value else []
    rels = [normalise_ref(os.path.relpath(f, root), "path") for f in item.files]
    refs = list(rels)
    parent = os.path.commonpath(rels) if len(rels) > 1 else os.path.dirname(rels[0])
    if len(rels) > 1 and parent:
        refs.append(normalise_ref(parent, "path"))
    return refs


def run_ingest(cfg: Config, out_dir: Path, workspace: Path) -> dict[str, Any]:
    """Run the Ingest stage into ``out_dir`` (a temporary folder the caller publishes atomically).

    Returns:
        The ingestion report (also written to ``out_dir/ingest_report.json``).

    Raises:
        IngestError: No case could be ingested (the message sums up why), or the splits are unusable.
    """
    from pipeline.ingest.sources import LoadOptions, scan_sources

    root = Path(cfg.data.source)
    private = ensure_private_dir(workspace / "private")
    key = load_or_create_key(private, cfg.deid.key_env)
    cache_dir = workspace / "cache" / "volumes"
    cache_dir.mkdir(parents=True, exist_ok=True)

    items, rejected = scan_sources(root, kinds=tuple(cfg.data.kinds))
    labels, label_problems = read_labels(cfg.data, cfg.task)
    log.info("Ingest: %d item(s) assembled, %d file(s) rejected while scanning", len(items), len(rejected))

    files_status: list[dict[str, Any]] = []  # private: per source file
    problems: list[dict[str, Any]] = []  # shared: redacted
    for r in rejected:
        token = _file_token(key, r.path)
        files_status.append({"path": r.path, "file": token, "status": "rejected", "code": r.code, "reason": r.reason})
        problems.append({"file": token, "code": r.code, "reason": _redact(r.reason, [r.path], key, root)})

    # Match label rows to items.
    ref_to_item: dict[str, int] = {}
    for idx, item in enumerate(items):
        for ref in _case_refs(item, root, cfg.data.id_type):
            ref_to_item.setdefault(ref, idx)
    matched: dict[int, LabelRow] = {}
    for ref, row in labels.items():
        idx = ref_to_item.get(ref)
        if idx is None:
            problems.append({"code": "label_without_case", "reason": f"labels CSV names a case ({cfg.data.id_type}) that is not among the readable inputs; row ignored"})
            continue
        if idx in matched:
            problems.append({"code": "conflicting_duplicate", "reason": "two label rows name the same input; the first is used"})
            continue
        matched[idx] = row
    for p in label_problems:
        problems.append({"code": p.code, "reason": f"labels CSV {p.reason}"})

    options = LoadOptions(tilt=cfg.ingest.tilt, uneven_spacing=cfg.ingest.uneven_spacing)
    jobs: list[tuple[int, _Job]] = []
    for idx, item in enumerate(items):
        token = _file_token(key, item.files[0])
        if idx not in matched:
            problems.append({"file": token, "code": "no_label", "reason": f"{item.kind} input ({len(item.files)} file(s)) has no row in the labels CSV; left out"})
            for f in item.files:
                files_status.append({"path": f, "file": _file_token(key, f), "status": "unlabelled", "code": "no_label"})
            continue
        fp = _fingerprint(key, item, options)
        jobs.append((idx, _Job(item, str(cache_dir / f"{fp}.npy"), options)))

    results = _run_jobs([j for _, j in jobs], cfg.ingest.processes)

    rows: list[dict[str, Any]] = []
    source_map: list[dict[str, str]] = []
    for (idx, job), res in zip(jobs, results, strict=True):
        item = items[idx]
        label_row = matched[idx]
        if isinstance(res, IngestError):
            token = _file_token(key, item.files[0])
            problems.append({"file": token, "code": res.code, "reason": _redact(res.reason, list(item.files), key, root)})
            for f in item.files:
                files_status.append({"path": f, "file": _file_token(key, f), "status": "failed", "code": res.code, "reason": res.reason})
            continue
        meta = res
        patient_raw = label_row.patient or (item.ids or {}).get("PatientID") or item.key
        case_id = pseudonym(item.key, key, prefix="C")
        row = {
            "case_id": case_id,
            "patient_id": pseudonym(patient_raw, key, prefix="P"),
            "label": label_row.label,
            "label_index": cfg.task.label_values.index(label_row.label),
            "class_name": cfg.task.classes[label_row.label],
            "fixed_split": label_row.split,
            "kind": item.kind,
            "modality": meta.get("modality") or "",
            "manufacturer": meta.get("manufacturer") or "",
            "sex": meta.get("sex") or "",
            "age_band": age_band(meta.get("age_years")),
            "shape": "x".join(str(s) for s in meta.get("shape", [])),
            "spacing": "x".join(f"{s:.4g}" for s in meta.get("spacing", []) or []),
            "orientation": "".join(meta.get("orientation") or []),
            "flags": ";".join(meta.get("flags") or []),
            "volume": Path(job.cache_file).name,
            **{f"group_{k}": v for k, v in label_row.groups.items()},
        }
        rows.append(row)
        source_map.append({"case_id": case_id, "files": ";".join(item.files)})
        for f in item.files:
            files_status.append({"path": f, "file": _file_token(key, f), "status": "ingested", "case_id": case_id})

    n_inputs = len(items) + len(rejected)
    if not rows:
        counts = Counter(p["code"] for p in problems)
        raise IngestError(
            f"Ingest: no case could be ingested from {n_inputs} input(s) under data.source "
            f"({len(labels)} usable label row(s)). Reasons: "
            + ", ".join(f"{c} x{n}" for c, n in counts.most_common())
            + ". See the ingestion summary in the workspace's private/ folder.",
            code="nothing_ingested",
        )

    splits = assign_splits([r["patient_id"] for r in rows], [r.pop("fixed_split") for r in rows], key, cfg.split)
    for r, s in zip(rows, splits, strict=True):
        r["split"] = s
    rows.sort(key=lambda r: r["case_id"])
    _check_splits(rows, cfg)

    group_cols = [f"group_{c}" for c in cfg.data.group_columns]
    _write_csv(out_dir / "manifest.csv", rows, MANIFEST_COLUMNS + group_cols)
    report = _report(cfg, rows, problems, n_inputs, len(labels))
    write_json(out_dir / "ingest_report.json", report)

    digest = out_dir.name.split(".tmp-")[0].lstrip(".")
    priv = ensure_private_dir(private / "ingest" / digest)
    write_json(priv / "files.json", files_status, mode=0o600)
    _write_csv(priv / "source_map.csv", source_map, ["case_id", "files"], mode=0o600)
    log.info(
        "Ingest: %d case(s) in the manifest, %d problem(s) reported (details in %s)",
        len(rows), len(problems), priv,
    )
    return report


def _run_jobs(jobs: list[_Job], processes: int) -> list[Any]:
    """Decode jobs in order; an IngestError is returned in place of the result, other errors propagate."""

    def one(job: _Job) -> Any:
        try:
            return _decode_to_cache(job)
        except IngestError as err:
            return err

    if processes <= 1 or len(jobs) < 8:
        return [one(j) for j in jobs]
    out: list[Any] = []
    with ProcessPoolExecutor(max_workers=processes) as pool:
        futures = [pool.submit(_decode_to_cache, j) for j in jobs]
        for f in futures:
            try:
                out.append(f.result())
            except IngestError as err:
                out.append(err)
    return out


def _check_splits(rows: list[dict[str, Any]], cfg: Config) -> None:
    counts = Counter((r["split"], r["label"]) for r in rows)
    train_labels = {lab for (s, lab) in counts if s == "train"}
    if len(train_labels) < 2:
        raise IngestError(
            f"Ingest: the train split holds label(s) {sorted(train_labels)} only; expected at least two classes "
            f"(check data.labels_csv and split fractions)",
            code="unusable_split",
        )
    for split in ("val", "test"):
        if not any(s == split for (s, _) in counts):
            raise IngestError(
                f"Ingest: the {split} split is empty ({len(rows)} cases in all); expected some cases there: "
                f"raise split.{split} or add cases",
                code="unusable_split",
            )


def _report(cfg: Config, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n_inputs: int, n_labels: int) -> dict:
    splits: dict[str, dict[str, Any]] = {}
    for s in ("train", "val", "calibration", "test"):
        sel = [r for r in rows if r["split"] == s]
        splits[s] = {
            "cases": len(sel),
            "patients": len({r["patient_id"] for r in sel}),
            "per_class": {cfg.task.classes[v]: sum(r["label"] == v for r in sel) for v in cfg.task.label_values},
        }
    review = [r["case_id"] for r in rows if "needs_pixel_review" in r["flags"] or "burned_in_annotation" in r["flags"]]
    return {
        "schema_version": 1,
        "inputs": n_inputs,
        "label_rows": n_labels,
        "cases": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "splits": splits,
        "kinds": dict(Counter(r["kind"] for r in rows)),
        "modalities": dict(Counter(r["modality"] for r in rows)),
        "problems_by_code": dict(Counter(p["code"] for p in problems)),
        "problems": problems,
        "pixel_review": review,
        "split_rule": (
            "fixed split column, calibration carved from train by keyed hash"
            if cfg.data.split_column
            else "keyed hash of the patient pseudonym (stable as data grows)"
        ),
        "deidentification": (
            "Patient and case identifiers replaced by keyed HMAC-SHA256 pseudonyms; no names, identifiers, "
            "dates, institutions or source paths in shared outputs (paths only under private/)."
        ),
    }


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str], mode: int | None = None) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    write_text(path, buf.getvalue(), mode=mode)


def read_manifest(stage_dir: Path) -> list[dict[str, str]]:
    """Read a published manifest (all values as strings)."""
    with open(stage_dir / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))
