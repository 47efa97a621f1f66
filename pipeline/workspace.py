"""Workspace layout and the per-stage output folders.

A workspace holds every stage's outputs, each in a folder named by the hash of what it depends on::

    <workspace>/
      private/                 mode 0700: pseudonym key, source mapping, per-file ingest summary
      cache/volumes/           decoded volumes (.npy) keyed by a content fingerprint, shared by snapshots
      ingest/<digest>/         manifest.csv, ingest_report.json, volumes.json
      augment/<digest>/        tensors/*.npy, index.csv, transform_spec.json, preview.png
      finetune/<digest>/       model.pt, model_info.json, history.csv, train_summary.json
      evaluate/<digest>/       predictions.csv, metrics.json, report.html, model_card.md
      runs/                    one JSON record per run

Digests: ingest = hash(task, data options, split, ingest options, key fingerprint, data snapshot);
augment = hash(ingest digest, preprocess, augment, backbone preprocessing facts);
finetune = hash(augment digest, model, train); evaluate = hash(finetune digest, evaluate, report).
Fields that do not change results (runtime section, device, processes, absolute paths) are not hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pipeline.config import Config
from pipeline.ingest.deid import ensure_private_dir, key_fingerprint, load_or_create_key

# Bump when a stage's code changes what it writes, so old folders are not reused.
STAGE_VERSIONS = {"ingest": 1, "augment": 1, "finetune": 1, "evaluate": 1}
DATA_SUFFIXES_IGNORED = (".tmp", ".part", ".swp")


@dataclass(frozen=True)
class StagePlan:
    """The output folder of every stage for one config and data snapshot."""

    workspace: Path
    snapshot: str
    ingest: Path
    augment: Path
    finetune: Path
    evaluate: Path
    warm_start: Path | None = None  # FineTune folder whose weights start training (ops.retrain.warm_start)

    @property
    def private(self) -> Path:
        return self.workspace / "private"

    @property
    def volume_cache(self) -> Path:
        return self.workspace / "cache" / "volumes"


def data_snapshot(source: Path, labels_csv: Path) -> str:
    """Fingerprint of the data: every file's relative path, size and mtime, plus the labels CSV bytes.

    Reading metadata only (no pixel data) keeps this cheap enough to call on every scheduling pass:
    about 10 ms per 1,000 files on a local disk.
    """
    st = labels_csv.stat()
    return _snapshot_cached(str(source), str(labels_csv), st.st_size, st.st_mtime_ns, _tree_stamp(source))


def _tree_stamp(source: Path) -> tuple[tuple[str, int, int], ...]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for name in sorted(filenames):
            if name.startswith(".") or name.endswith(DATA_SUFFIXES_IGNORED):
                continue
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, source), st.st_size, st.st_mtime_ns))
    return tuple(entries)


@lru_cache(maxsize=32)
def _snapshot_cached(source: str, labels_csv: str, size: int, mtime: int, tree: tuple) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(tree, separators=(",", ":")).encode())
    with open(labels_csv, "rb") as fh:
        h.update(hashlib.sha256(fh.read()).digest())
    return h.hexdigest()[:12]


def backbone_preprocessing(cfg: Config) -> dict:
    """The backbone's preprocessing facts that the cached tensors depend on."""
    from models import get_spec

    spec = get_spec(cfg.model.backbone)
    return {"mean": list(spec.mean), "std": list(spec.std), "intensity": spec.intensity}


def warm_start_source(cfg: Config, ws: Path, key: str) -> Path | None:
    """The champion FineTune folder a retraining starts from, fixed once per (augment digest, train config).

    The choice is recorded in ``<workspace>/ops/warm_start.json`` the first time a plan needs it, so the
    FineTune digest does not change when tonight's model later becomes the champion itself.
    """
    if cfg.ops.retrain.warm_start != "champion":
        return None
    import json as _json

    from pipeline.io import write_json

    path = ws / "ops" / "warm_start.json"
    table = _json.loads(path.read_text()) if path.exists() else {}
    if key not in table:
        champion = None
        if (ws / "ops" / "registry.sqlite").exists():
            from pipeline.ops.registry import Registry

            champ = Registry(ws).champion()
            if champ is not None and (ws / "finetune" / champ["finetune"] / "model.pt").exists():
                champion = champ["finetune"]
        table[key] = champion
        write_json(path, table)
    return ws / "finetune" / table[key] if table[key] else None


def plan_stages(cfg: Config) -> StagePlan:
    """Compute every stage's output folder for ``cfg`` and the current data snapshot."""
    ws = Path(cfg.runtime.workspace)
    private = ensure_private_dir(ws / "private")
    key = load_or_create_key(private, cfg.deid.key_env)
    snap = data_snapshot(Path(cfg.data.source), Path(cfg.data.labels_csv))
    ingest = cfg.hashed(
        "task",
        "data",
        "split",
        "ingest",
        "deid",
        extra={"snapshot": snap, "key": key_fingerprint(key), "v": STAGE_VERSIONS["ingest"]},
    )
    augment = cfg.hashed(
        "preprocess",
        "augment",
        extra={"ingest": ingest, "backbone": backbone_preprocessing(cfg), "v": STAGE_VERSIONS["augment"]},
    )
    warm = warm_start_source(cfg, ws, f"{augment}-{cfg.hashed('model', 'train')}")
    extra = {"augment": augment, "v": STAGE_VERSIONS["finetune"]}
    if warm is not None:
        extra["warm_start"] = warm.name
    finetune = cfg.hashed("model", "train", extra=extra)
    holdout = {"fraction": cfg.ops.promotion.holdout_fraction, "min": cfg.ops.promotion.min_holdout_cases}
    evaluate = cfg.hashed(
        "evaluate",
        "report",
        extra={"finetune": finetune, "holdout": holdout, "v": STAGE_VERSIONS["evaluate"]},
    )
    return StagePlan(
        workspace=ws,
        snapshot=snap,
        ingest=ws / "ingest" / ingest,
        augment=ws / "augment" / augment,
        finetune=ws / "finetune" / finetune,
        evaluate=ws / "evaluate" / evaluate,
        warm_start=warm,
    )
