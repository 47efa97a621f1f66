"""Housekeeping: remove stage folders and cached volumes that nothing kept still needs.

Kept, always: every stage folder of a registered model with status champion or candidate (and retired
ones with ``ops.retention.keep_retired``), their bundles, the stage folders named by the last
``ops.retention.keep_runs`` nightly records, and every decoded volume referenced by a kept Ingest manifest.
Removed: other stage folders, leftovers of killed runs (``.<digest>.tmp-*`` folders, FineTune ``.work``
folders whose stage is finished or older than ``cache_days``), and unreferenced cached volumes older than
``ops.retention.cache_days``. Nothing is removed while another run holds the workspace lock.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.config import RetentionPolicy
from pipeline.ops.registry import Registry

STAGES = ("ingest", "augment", "finetune", "evaluate")


def _folder_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def plan_gc(workspace: Path, policy: RetentionPolicy, now: float | None = None) -> dict[str, Any]:
    """What :func:`run_gc` would remove and keep (nothing is touched).

    Returns:
        ``{"keep": {stage: [digests]}, "remove": [paths relative to the workspace], "reasons": {...}}``.
    """
    ws = Path(workspace)
    now = time.time() if now is None else now
    keep: dict[str, set[str]] = {s: set() for s in STAGES}
    why: dict[str, str] = {}
    statuses = ("champion", "candidate") + (("retired", "rejected") if policy.keep_retired else ())
    for m in Registry(ws).models():
        if m["status"] in statuses:
            for s in STAGES:
                keep[s].add(m[s])
                why.setdefault(f"{s}/{m[s]}", f"model {m['id']} ({m['status']})")
    records = sorted((ws / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for rec in records[: policy.keep_runs]:
        try:
            stages = json.loads(rec.read_text()).get("stages", {})
        except (OSError, ValueError):
            continue
        for s, rel in stages.items():
            if s in keep:
                keep[s].add(Path(rel).name)
                why.setdefault(f"{s}/{Path(rel).name}", f"run record {rec.name}")
    remove: list[str] = []
    for s in STAGES:
        root = ws / s
        if not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            name = d.name
            if name.startswith(".") and ".tmp-" in name:
                remove.append(f"{s}/{name}")  # leftover of a killed run
            elif name.endswith(".work"):
                # Per-epoch checkpoints: useless once the stage is published; an unfinished one is what
                # a rerun resumes from, so it is kept until it is older than the cache horizon.
                finished = (root / name.removesuffix(".work")).exists()
                if finished or d.stat().st_mtime < now - policy.cache_days * 86400.0:
                    remove.append(f"{s}/{name}")
            elif d.is_dir() and name not in keep[s]:
                remove.append(f"{s}/{name}")
    # Cached volumes referenced by kept manifests.
    needed: set[str] = set()
    for digest in keep["ingest"]:
        manifest = ws / "ingest" / digest / "manifest.csv"
        if manifest.is_file():
            import csv

            with open(manifest, newline="") as fh:
                needed.update(r["volume"] for r in csv.DictReader(fh))
    cache = ws / "cache" / "volumes"
    if cache.is_dir():
        horizon = now - policy.cache_days * 86400.0
        for f in sorted(cache.iterdir()):
            stem = f.name.split(".")[0]
            if f"{stem}.npy" in needed:
                continue
            if f.name.startswith(".") or f.stat().st_mtime < horizon:
                remove.append(f"cache/volumes/{f.name}")
                recipe = ws / "private" / "cache" / f"{stem}.json"  # how to rebuild it: goes with it
                if f.name.endswith(".npy") and recipe.is_file():
                    remove.append(f"private/cache/{recipe.name}")
    return {"keep": {s: sorted(v) for s, v in keep.items()}, "remove": remove, "reasons": why}


def run_gc(workspace: Path, policy: RetentionPolicy, dry_run: bool = False) -> dict[str, Any]:
    """Apply the retention policy under the workspace lock; return the plan with bytes freed."""
    from pipeline.ops.lock import RunLock

    ws = Path(workspace)
    with RunLock(ws, purpose="medtl gc"):
        plan = plan_gc(ws, policy)
        freed = 0
        for rel in plan["remove"]:
            p = ws / rel
            if p.is_dir():
                freed += _folder_size(p)
                if not dry_run:
                    shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                freed += p.stat().st_size
                if not dry_run:
                    p.unlink()
        plan["bytes_freed"] = freed
        plan["dry_run"] = dry_run
    return plan
