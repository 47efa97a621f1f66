"""The Ingest stage: source tree + labels CSV -> de-identified manifest, cached volumes, report.

Flow: scan headers (no pixels) -> match label rows -> decode every item in a process pool into the
workspace's volume cache (keyed by a content fingerprint, so later snapshots reuse them) -> pseudonyms and
splits (the private split ledger, :mod:`pipeline.ingest.splits`) -> ``manifest.csv`` and
``ingest_report.json`` in the stage folder, and the source mapping under ``private/``. An item with no
labels CSV row, or whose row has an empty label, is ingested as unlabelled (split ``unlabelled``, empty
``label_index``). Bad files and bad label rows are reported with their reason; the run goes on with the rest.
Shared outputs never hold a raw identifier or a source path: reasons that name a file are rewritten to an
opaque file token, and the token's path is in ``private/``. With ``data.channels`` a case is several images
(:mod:`pipeline.ingest.channels`): the cases, each one volume of all its channels, take the items' place in
the manifest rows, and the report gains a ``channels`` section.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import IngestError
from pipeline.ingest.decode_jobs import (
    CACHE_VERSION,
    DecodeJob,
    apply_mask_regions,
    file_stamps,
    fingerprint,
    mask_for,
    run_jobs,
)
from pipeline.ingest.deid import ensure_private_dir, load_or_create_key, pseudonym
from pipeline.ingest.index import SourceIndex
from pipeline.ingest.ingest_report import POOLING_RULE, age_band, build_report, check_splits, pool_rare_values
from pipeline.ingest.labels import (
    LabelRow,
    class_name_of,
    finding_prevalence,
    label_index_of,
    normalise_ref,
    read_labels,
)
from pipeline.ingest.sources import LoadOptions, scan_sources
from pipeline.ingest.splits import HELD_OUT, UNLABELLED, SplitLedger, assign_splits, seed_from_manifests
from pipeline.io import write_json, write_text

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "case_id",
    "patient_id",
    "label",
    "label_index",
    "class_name",
    "split",
    "kind",
    "modality",
    "manufacturer",
    "sex",
    "age_band",
    "shape",
    "spacing",
    "orientation",
    "flags",
    "volume",
]
#: Manifest columns whose values are copied from the inputs (DICOM tags; with the ``group_*`` columns from
#: the labels CSV): rare values are pooled (:func:`pipeline.ingest.ingest_report.pool_rare_values`).
POOLED_COLUMNS = ["modality", "manufacturer", "sex"]
__all__ = [
    "CACHE_VERSION",
    "MANIFEST_COLUMNS",
    "age_band",
    "apply_mask_regions",
    "read_manifest",
    "run_ingest",
    "scan_workers",
]


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


@dataclass(frozen=True)
class _Run:
    """Where one Ingest run reads and writes, and its pseudonymisation key (fixed for the run)."""

    cfg: Config
    out_dir: Path
    private: Path
    key: bytes
    cache_dir: Path
    root: Path

    def token(self, path: str) -> str:
        return _file_token(self.key, path)

    def redact(self, reason: str, paths: list[str]) -> str:
        return _redact(reason, paths, self.key, self.root)


@dataclass
class _Scanned:
    """What the header scan and the labels CSV gave: items, rejected files, label rows, the index."""

    items: list[Any]
    rejected: list[Any]
    labels: dict[str, LabelRow]
    label_problems: list[Any]
    index: SourceIndex
    stats: Any
    t0: float
    census: dict[str, Any] = field(default_factory=dict)  # every entry under the source, by code


@dataclass
class _Ledger:
    """What the run learns per source file (PRIVATE: paths) and the redacted problems (shared)."""

    files_status: list[dict[str, Any]] = field(default_factory=list)
    problems: list[dict[str, Any]] = field(default_factory=list)
    label_rows: list[dict[str, Any]] = field(default_factory=list)  # PRIVATE: CSV problems with cell values

    def failed(self, run: _Run, files: list[str], err: IngestError, **where: Any) -> None:
        """A case that could not be decoded: one shared problem (``where`` names it: a file token, or a case
        pseudonym and CSV row; the reason redacted of paths) and a private status per source file."""
        self.problems.append({**where, "code": err.code, "reason": run.redact(err.reason, list(files))})
        for f in files:
            self.files_status.append(
                {"path": f, "file": run.token(f), "status": "failed", "code": err.code, "reason": err.reason}
            )


def run_ingest(cfg: Config, out_dir: Path, workspace: Path) -> dict[str, Any]:
    """Run the Ingest stage into ``out_dir`` (a temporary folder the caller publishes atomically).

    Incremental: the header scan goes through the workspace's source index
    (``private/ingest/index-<root token>.sqlite``, :class:`~pipeline.ingest.index.SourceIndex`), so only
    new or changed files are opened; a volume is decoded only when no cached volume has its fingerprint
    (item grouping + file content hashes + options). Files that vanished since an earlier run are reported
    (code ``vanished``). ``report["incremental"]`` counts what was read, decoded and reused.

    Returns:
        The ingestion report (also written to ``out_dir/ingest_report.json``).

    Raises:
        IngestError: No case could be ingested (the message sums up why), or the splits are unusable.
    """
    root = Path(cfg.data.source)
    private = ensure_private_dir(workspace / "private")
    key = load_or_create_key(private, cfg.deid.key_env)
    cache_dir = workspace / "cache" / "volumes"
    cache_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(cfg, out_dir, private, key, cache_dir, root)

    t0 = time.perf_counter()
    labels, label_problems = read_labels(cfg.data, cfg.task, cfg.split.stratify_by)
    index_dir = ensure_private_dir(private / "ingest")
    index_file = index_dir / f"index-{pseudonym(str(root.resolve()), key, prefix='R')}.sqlite"
    census: dict[str, Any] = {}
    with SourceIndex(index_file, root.resolve()) as index:
        items, rejected = scan_sources(
            root,
            kinds=tuple(cfg.data.kinds),
            workers=scan_workers(cfg.ingest.processes),
            index=index,
            census=census,
        )
        stats = index.finish()
        return _ingest_items(run, _Scanned(items, rejected, labels, label_problems, index, stats, t0, census))


def scan_workers(processes: int) -> int:
    """Threads for reading the headers of new/changed files.

    Measured (``bench/ingest_incremental.py``, 1,000 files on a local disk, 2 cores): 1 thread reads
    about 2,400 headers/s, 2 threads 2,000/s, 4 threads 1,250/s, since header parsing is Python (GIL-bound).
    So the scan stays sequential; threads would only pay on a high-latency network share. Unchanged files
    are not opened at all (index), and pixel decoding, the real cost, uses ``processes`` processes.
    """
    del processes
    return 1


def _ingest_items(run: _Run, scan: _Scanned) -> dict[str, Any]:
    """Everything after the scan: match labels, decode, build the manifest, split, write the outputs."""
    cfg = run.cfg
    t_scan = time.perf_counter() - scan.t0
    stats = scan.stats
    log.info(
        "Ingest: %d item(s) assembled, %d file(s) rejected while scanning; %d header(s) read, %d file(s) "
        "unchanged, %d vanished",
        len(scan.items),
        len(scan.rejected),
        stats.headers_read,
        stats.unchanged + stats.touched,
        stats.vanished,
    )
    ledger = _Ledger()
    _record_rejected(run, scan, ledger)
    t1 = time.perf_counter()
    cache_audit: Counter = Counter()
    channel_stats = None
    if cfg.data.channels:  # several images per case (pipeline/ingest/channels.py): the cases become the items
        ch = _channel_cases(run, scan, ledger, cache_audit)
        scan = replace(scan, items=ch.items)
        matched, jobs, results, channel_stats = ch.matched, ch.jobs, ch.results, ch.stats
        n_decoded, n_volumes = ch.n_decoded, ch.n_volumes
    else:
        matched = _match_labels(run, scan, ledger)
        jobs = _plan_jobs(run, scan, matched, ledger)
        recipes = ensure_private_dir(run.private / "cache")
        results, n_decoded = run_jobs([j for _, j in jobs], cfg.ingest.processes, recipes, cache_audit)
        n_volumes = len(jobs)
    t_decode = time.perf_counter() - t1

    rows, source_map = _collect(run, scan, matched, jobs, results, ledger)
    _record_vanished(run, scan, source_map, ledger)

    n_inputs = len(scan.items) + len(scan.rejected)
    if not rows:
        counts = Counter(p["code"] for p in ledger.problems)
        raise IngestError(
            f"Ingest: no case could be ingested from {n_inputs} input(s) under data.source "
            f"({len(scan.labels)} usable label row(s)). Reasons: "
            + ", ".join(f"{c} x{n}" for c, n in counts.most_common())
            + ". See the ingestion summary in the workspace's private/ folder.",
            code="nothing_ingested",
        )

    ledger_file = ensure_private_dir(run.private / "splits") / "ledger.json"
    split_ledger = SplitLedger.load(ledger_file) or _seed_ledger(run)
    rows, n_held_unlabelled = _assign(run, rows, split_ledger)
    rows.sort(key=lambda r: r["case_id"])
    check_splits(rows, cfg)

    group_cols = [f"group_{c}" for c in cfg.data.group_columns]
    raw_values = [{c: r.get(c, "") for c in ["case_id", *POOLED_COLUMNS, *group_cols]} for r in rows]
    pooled = pool_rare_values(rows, POOLED_COLUMNS + group_cols)
    _write_csv(run.out_dir / "manifest.csv", rows, MANIFEST_COLUMNS + group_cols)
    report = build_report(cfg, rows, ledger.problems, n_inputs, len(scan.labels))
    report["unlabelled"]["left_out_held_out_patient"] = n_held_unlabelled
    report["subgroup_values"] = {"rule": POOLING_RULE, "pooled": pooled}
    report["incremental"] = {
        **stats.public(),
        "volumes_decoded": n_decoded,
        "volumes_reused": n_volumes - n_decoded,
        "scan_seconds": round(t_scan, 3),
        "decode_seconds": round(t_decode, 3),
        "total_seconds": round(time.perf_counter() - scan.t0, 3),
    }
    report["inputs"] = scan.census
    report["cache"] = dict(sorted(cache_audit.items()))  # cached volumes decoded again, by cause
    if channel_stats is not None:
        report["channels"] = channel_stats
    write_json(run.out_dir / "ingest_report.json", report)

    digest = run.out_dir.name.split(".tmp-")[0].lstrip(".")
    priv = ensure_private_dir(run.private / "ingest" / digest)
    write_json(priv / "files.json", ledger.files_status, mode=0o600)
    write_json(priv / "label_rows.json", ledger.label_rows, mode=0o600)
    _write_csv(priv / "subgroup_values.csv", raw_values, list(raw_values[0]), mode=0o600)
    _write_csv(priv / "source_map.csv", source_map, ["case_id", "files"], mode=0o600)
    split_ledger.save(ledger_file)
    log.info(
        "Ingest: %d case(s) in the manifest, %d problem(s) reported (details in %s)",
        len(rows),
        len(ledger.problems),
        priv,
    )
    return report


def _seed_ledger(run: _Run) -> SplitLedger:
    """A workspace without a ledger keeps its current assignments: seed from its published manifests."""
    ingest_root = run.private.parent / "ingest"
    published = [f for f in ingest_root.glob("*/manifest.csv") if not f.parent.name.startswith(".")]
    published.sort(key=lambda f: (f.stat().st_mtime_ns, f.parent.name))
    return seed_from_manifests(read_manifest(f.parent) for f in published)


def _assign(
    run: _Run, rows: list[dict[str, Any]], split_ledger: SplitLedger
) -> tuple[list[dict[str, Any]], int]:
    """Set every row's split through the ledger (updated in place). Unlabelled cases of a patient the ledger
    holds in val, calibration or test, with no labelled case in this snapshot, are left out (they must
    never be training data); returns the rows kept and how many were left out."""
    strata = [
        pseudonym("\x1f".join(r.pop("strata")), run.key, prefix="T") if run.cfg.split.stratify_by else ""
        for r in rows
    ]
    labels = [None if r["label_index"] == "" else r["label_index"] for r in rows]
    splits = assign_splits(
        [r["patient_id"] for r in rows],
        [r.pop("fixed_split") for r in rows],
        run.key,
        run.cfg.split,
        labels=labels,
        strata=strata,
        ledger=split_ledger,
    )
    for r, s in zip(rows, splits, strict=True):
        r["split"] = s
    # A held-out case in this snapshot lets training's own guard drop the patient's unlabelled cases; a
    # patient held out only in the ledger (its labelled cases gone from the source) is dropped here.
    held_now = {r["patient_id"] for r in rows if r["split"] in HELD_OUT}
    kept = [
        r
        for r in rows
        if r["split"] != UNLABELLED
        or r["patient_id"] in held_now
        or split_ledger.entries.get(r["patient_id"], {}).get("split") not in HELD_OUT
    ]
    return kept, len(rows) - len(kept)


def _record_rejected(run: _Run, scan: _Scanned, ledger: _Ledger) -> None:
    """Files the scan rejected: private status with the reason, shared problem with a redacted one."""
    for r in scan.rejected:
        token = run.token(r.path)
        ledger.files_status.append(
            {"path": r.path, "file": token, "status": "rejected", "code": r.code, "reason": r.reason}
        )
        ledger.problems.append({"file": token, "code": r.code, "reason": run.redact(r.reason, [r.path])})


def _match_labels(run: _Run, scan: _Scanned, ledger: _Ledger) -> dict[int, LabelRow | None]:
    """Item index -> its label row: an unlabelled row for items no row names, None for items left out
    (their rows disagree). Unmatched and duplicate rows and CSV problems go to the ledger."""
    id_type = run.cfg.data.id_type
    ref_to_item: dict[str, int] = {}
    for idx, item in enumerate(scan.items):
        for ref in _case_refs(item, run.root, id_type):
            ref_to_item.setdefault(ref, idx)
    matched: dict[int, LabelRow | None] = {}
    for ref in {p.ref for p in scan.label_problems if p.code == "conflicting_duplicate"}:
        if ref in ref_to_item:
            matched[ref_to_item[ref]] = None
    for ref, row in scan.labels.items():
        idx = ref_to_item.get(ref)
        if idx is None:
            ledger.problems.append(
                {
                    "code": "label_without_case",
                    "row": row.line,
                    "reason": f"labels CSV line {row.line}: names a case ({id_type}) that is not among the "
                    "readable inputs; row ignored",
                }
            )
            continue
        if idx in matched and matched[idx] is not None:
            ledger.problems.append(
                {
                    "code": "conflicting_duplicate",
                    "reason": "two label rows name the same input; the first is used",
                }
            )
            continue
        if idx not in matched:
            matched[idx] = row
    _record_label_problems(scan, ledger)
    for idx in range(len(scan.items)):
        matched.setdefault(idx, _unlabelled_row(run))
    return matched


def _record_label_problems(scan: _Scanned, ledger: _Ledger) -> None:
    for p in scan.label_problems:
        # the shared reason names the line and column only; the cell values stay in private/
        ledger.problems.append({"code": p.code, "row": p.row, "reason": f"labels CSV {p.reason}"})
        ledger.label_rows.append({"row": p.row, "code": p.code, "case": p.ref, "detail": p.detail})


def _unlabelled_row(run: _Run) -> LabelRow:
    """The label row of a case no labels CSV row names (unlabelled)."""
    return LabelRow("", "", None, None, {}, 0, ("",) * len(run.cfg.split.stratify_by))


def _channel_cases(run: _Run, scan: _Scanned, ledger: _Ledger, audit: Counter) -> Any:
    """``data.channels``: the cases, each channel decoded as an item is, combined into one volume per case
    (:func:`pipeline.ingest.channels.run_channel_cases`)."""
    from pipeline.ingest.channels import run_channel_cases

    _record_label_problems(scan, ledger)
    return run_channel_cases(
        run,
        scan,
        ledger,
        lambda item: _decode_job(run, scan, item),
        lambda item: _case_refs(item, run.root, "path"),
        _unlabelled_row(run),
        audit,
    )


def _plan_jobs(
    run: _Run, scan: _Scanned, matched: dict[int, LabelRow | None], ledger: _Ledger
) -> list[tuple[int, DecodeJob]]:
    """One decode job per item, labelled or not (cache file named by its fingerprint); items whose label
    rows disagree are left out."""
    cfg = run.cfg
    options = LoadOptions(tilt=cfg.ingest.tilt, uneven_spacing=cfg.ingest.uneven_spacing)
    jobs: list[tuple[int, DecodeJob]] = []
    for idx, item in enumerate(scan.items):
        if matched[idx] is None:
            for f in item.files:
                ledger.files_status.append(
                    {"path": f, "file": run.token(f), "status": "left_out", "code": "conflicting_duplicate"}
                )
            continue
        jobs.append((idx, _decode_job(run, scan, item, options)))
    return jobs


def _decode_job(run: _Run, scan: _Scanned, item: Any, options: LoadOptions | None = None) -> DecodeJob:
    """The decode job of one item (cache file named by its fingerprint)."""
    cfg = run.cfg
    options = options or LoadOptions(tilt=cfg.ingest.tilt, uneven_spacing=cfg.ingest.uneven_spacing)
    mask = mask_for(item, cfg)
    stamps = tuple(file_stamps(item, [scan.index.sha256(f) for f in item.files]))
    fp = fingerprint(run.key, item, options, list(stamps), mask)
    return DecodeJob(item, str(run.cache_dir / f"{fp}.npy"), options, mask, stamps)


def _collect(
    run: _Run,
    scan: _Scanned,
    matched: dict[int, LabelRow | None],
    jobs: list[tuple[int, DecodeJob]],
    results: list[Any],
    ledger: _Ledger,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Manifest rows (with ``fixed_split``) and the private source map from the decode results."""
    cfg, key = run.cfg, run.key
    rows: list[dict[str, Any]] = []
    source_map: list[dict[str, str]] = []
    prevalence = finding_prevalence(matched.values(), cfg.task)  # multilabel strata (else unused)
    for (idx, job), res in zip(jobs, results, strict=True):
        item = scan.items[idx]
        label_row = matched[idx]  # never None here: left-out items get no job
        if isinstance(res, IngestError):
            ledger.failed(run, list(item.files), res, file=run.token(item.files[0]))
            continue
        meta = _flag_4d(res)
        patient_raw = label_row.patient or (item.ids or {}).get("PatientID") or item.key
        case_id = pseudonym(item.key, key, prefix="C")
        row = {
            "case_id": case_id,
            "patient_id": pseudonym(patient_raw, key, prefix="P"),
            "label": label_row.label,
            "label_index": label_index_of(label_row, cfg.task, prevalence),
            "class_name": class_name_of(label_row, cfg.task),
            "fixed_split": label_row.split,
            "strata": label_row.strata,
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
            ledger.files_status.append(
                {"path": f, "file": run.token(f), "status": "ingested", "case_id": case_id}
            )
    return rows, source_map


def _flag_4d(meta: dict[str, Any]) -> dict[str, Any]:
    """A 4D series (time/echo volumes) gives the network its first volume only (Augment's rule): stated as
    the case flag ``4d_first_volume_only`` (counted in the report's ``case_flags``). With ``data.channels``,
    a channel's ``volume`` picks another one."""
    shape = meta.get("shape") or []
    if len(shape) == 4 and int(shape[3]) > 1 and meta.get("axis4") not in ("rgb", "channels"):
        flags = list(meta.get("flags") or [])
        if "4d_first_volume_only" not in flags:
            return dict(meta, flags=flags + ["4d_first_volume_only"])
    return meta


def _record_vanished(run: _Run, scan: _Scanned, source_map: list[dict[str, str]], ledger: _Ledger) -> None:
    """Store each file's case in the index, and report files that vanished since an earlier run."""
    index, stats = scan.index, scan.stats
    index.set_cases({f: r["case_id"] for r in source_map for f in r["files"].split(";")})
    for p in stats.vanished_paths:
        prev = index.previous_case(p)
        token = run.token(p)
        ledger.files_status.append({"path": p, "file": token, "status": "vanished", "case_id": prev})
        ledger.problems.append(
            {
                "file": token,
                "code": "vanished",
                "case_id": prev,
                "reason": "file seen by an earlier run is no longer in data.source"
                + (f" (it belonged to case {prev}, which is now left out or smaller)" if prev else ""),
            }
        )
    for p in stats.vanished_before:
        ledger.files_status.append(
            {
                "path": p,
                "file": run.token(p),
                "status": "vanished_earlier",
                "case_id": index.previous_case(p),
            }
        )


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
