"""Workspace layout and the per-stage output folders.

A workspace holds every stage's outputs, each in a folder named by the hash of what it depends on::

    <workspace>/
      private/                 mode 0700: pseudonym key, source mapping, per-file ingest summary
      cache/volumes/           decoded volumes (.npy) keyed by a content fingerprint, shared by snapshots
      cache/weights_sha256.json  sha256 of pretrained weight files, keyed by (absolute path, size, mtime_ns)
      ingest/<digest>/         manifest.csv, ingest_report.json, volumes.json
      augment/<digest>/        tensors/*.npy, index.csv, transform_spec.json, preview.png
      finetune/<digest>/       model.pt, model_info.json, history.csv, train_summary.json
      evaluate/<digest>/       predictions.csv, metrics.json, report.html, model_card.md
      ops/warm_start.json      the champion each (augment digest, training config) starts from
      runs/                    one JSON record per run

Digests: ingest = hash(task, data options, split, ingest options, key fingerprint, data snapshot);
augment = hash(ingest digest, preprocess, augment, backbone preprocessing facts);
finetune = hash(augment digest, model, train, sha256 of the pretrained weights used, warm-start source)
(:func:`finetune_digest`, the one recipe, also used by the scarce-label study); evaluate = hash(finetune
digest, evaluate, report, promotion holdout). Fields that do not change results (runtime section, device,
processes, absolute paths, the weights' path) are not hashed.

Planning is pure: :func:`plan_stages` decides from the config and a :class:`PlanInputs` (key, weights
digest, warm-start table, champion) and writes nothing. :func:`gather_plan_inputs` reads those inputs
(creating the key on a new workspace only when asked), and :func:`record_plan_choices` persists what a plan
chose (the warm-start entry, the weights digest memo); the Luigi side calls both under the workspace lock.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from models.errors import WeightsError
from models.locate import locate_weights, sha256_file
from pipeline.config import Config
from pipeline.config.digests import STAGE_VERSIONS, finetune_digest
from pipeline.errors import ConfigError

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
    #: sha256 of the pretrained weight file training loads ("none": model.pretrained is false).
    weights_sha256: str = "none"
    #: Where that file is (absolute; never hashed, never written into shared outputs).
    weights_path: str | None = None
    #: ``(key, FineTune folder name or None)`` to add to ``ops/warm_start.json`` (a first choice), or None.
    warm_start_choice: tuple[str, str | None] | None = None

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


def external_snapshots(cfg: Config) -> list[list[str]]:
    """``[name, snapshot]`` of each ``evaluate.external`` source: its files and labels stand for it in the
    Evaluate digest and the night's config hash, as the data snapshot stands for ``data.source``."""
    return [[e.name, data_snapshot(Path(e.source), Path(e.labels_csv))] for e in cfg.evaluate.external]


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


def backbone_spec(cfg: Config):
    """The :class:`models.BackboneSpec` training builds for ``cfg`` (the 3D twin of a 2D name when asked).

    Imports the model registry (torch, timm): only a night that plans its stages pays for it.
    """
    from models import get_spec, list_backbones

    spec = get_spec(cfg.model.backbone)
    twin = f"inflated_{cfg.model.backbone}"
    if cfg.preprocess.spatial_dims != spec.spatial_dims and twin in list_backbones():
        spec = get_spec(twin)
    return spec


def backbone_preprocessing(cfg: Config) -> dict:
    """The backbone's preprocessing facts that the cached tensors depend on."""
    from models import get_spec

    spec = get_spec(cfg.model.backbone)
    return {"mean": list(spec.mean), "std": list(spec.std), "intensity": spec.intensity}


# ------------------------------------------------------------------------------------ pretrained weights
WEIGHTS_MEMO = Path("cache") / "weights_sha256.json"
#: Entries kept in the memo (the most recently used); a workspace sees a handful of weight files.
WEIGHTS_MEMO_SIZE = 64


def weights_memo_key(path: str) -> str:
    """Memo key of a weight file: a hash of its absolute path, size and mtime (ns).

    A swapped file (new mtime or size) gets a new key. The path itself is not stored in the workspace
    (folder names may carry names); its hash is enough to find the entry again.
    """
    st = os.stat(path)
    stamp = f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}"
    return hashlib.sha256(stamp.encode("utf-8")).hexdigest()[:32]


def load_weights_memo(workspace: Path) -> dict[str, str]:
    """The remembered weight digests of a workspace (empty when none or unreadable)."""
    try:
        memo = json.loads((Path(workspace) / WEIGHTS_MEMO).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in memo.items()} if isinstance(memo, dict) else {}


def pretrained_weights(cfg: Config, memo: dict[str, str]) -> tuple[str, str | None]:
    """``(sha256, path)`` of the weight file training would load for ``cfg``; ``("none", None)`` from scratch.

    The file is chosen by :func:`models.locate.locate_weights`, the same rule, with the same config
    options, that training applies through :func:`models.create_backbone` (explicit ``model.weights``,
    else the offline search; a file is trusted by a digest pinned in code or by ``model.weights_sha256``,
    an unpinned one only with ``model.allow_unpinned``). Digests are computed once per (path, size,
    mtime) and remembered in ``memo`` (a dict the caller persists, see :func:`record_plan_choices`).

    Raises:
        WeightsError: The backbone has no pretrained weights, no file is found, a pinned file does not
            match, or only unpinned files were found.
    """
    if not cfg.model.pretrained:
        return "none", None
    spec = backbone_spec(cfg)
    if spec.weights is None:
        raise WeightsError(
            f"model.backbone: {cfg.model.backbone!r} has no known pretrained weights; expected "
            "model.pretrained: false or an explicit model.weights file",
            code="weights_missing",
        )

    def remembered(path: str) -> str:
        key = weights_memo_key(path)
        digest = memo.pop(key, None) or sha256_file(path)
        memo[key] = digest  # (re)inserted last: the memo keeps the most recently used entries
        return digest

    chosen = locate_weights(
        spec.weights,
        cfg.model.weights,
        weights_sha256=cfg.model.weights_sha256,
        allow_unpinned=cfg.model.allow_unpinned,
        hasher=remembered,
    )
    return chosen.sha256, chosen.path


# ------------------------------------------------------------------------------------ planning inputs
@dataclass(frozen=True)
class PlanInputs:
    """Everything planning reads besides the config and the data snapshot.

    Attributes:
        key: The pseudonymisation key (its fingerprint names the Ingest folder).
        weights_sha256: sha256 of the pretrained weights training loads, or ``"none"``.
        weights_path: Absolute path of that file (None from scratch).
        warm_start_table: ``ops/warm_start.json``: warm-start key -> FineTune folder name (or None).
        champion_finetune: The registry champion's FineTune folder name (when its ``model.pt`` exists and
            ``ops.retrain.warm_start`` is ``champion``), else None.
        weights_memo: The digest memo after this lookup (for :func:`record_plan_choices`).
    """

    key: bytes
    weights_sha256: str = "none"
    weights_path: str | None = None
    warm_start_table: Mapping[str, str | None] = field(default_factory=dict)
    champion_finetune: str | None = None
    weights_memo: Mapping[str, str] = field(default_factory=dict)


def read_key(cfg: Config, workspace: Path) -> bytes:
    """The pseudonymisation key, read without creating anything.

    Raises:
        ConfigError: ``deid.key_env`` is unusable, or the workspace has no key file yet.
    """
    from pipeline.ingest.deid import KEY_FILE, load_or_create_key

    if cfg.deid.key_env:
        return load_or_create_key(workspace / "private", cfg.deid.key_env)
    path = workspace / "private" / KEY_FILE
    if not path.is_file():
        raise ConfigError(
            f"runtime.workspace: no pseudonymisation key in this workspace's private folder yet; expected "
            f"{KEY_FILE} there (`medtl run` creates it on a new workspace)",
            code="no_key",
        )
    return path.read_bytes().strip()


def gather_plan_inputs(cfg: Config, *, create: bool = False, memo: dict[str, str] | None = None) -> PlanInputs:
    """Read what :func:`plan_stages` needs besides the config.

    Args:
        cfg: The config.
        create: Create the private folder and the key on a new workspace (the caller holds the lock).
            Without it nothing is written.
        memo: Weight digest memo to use and extend (default: the workspace's remembered one).
    """
    from pipeline.ingest.deid import ensure_private_dir, load_or_create_key

    ws = Path(cfg.runtime.workspace)
    if create:
        key = load_or_create_key(ensure_private_dir(ws / "private"), cfg.deid.key_env)
    else:
        key = read_key(cfg, ws)
    memo = dict(load_weights_memo(ws) if memo is None else memo)
    sha, path = pretrained_weights(cfg, memo)
    table: dict[str, str | None] = {}
    champion = None
    if cfg.ops.retrain.warm_start == "champion":
        table_path = ws / "ops" / "warm_start.json"
        if table_path.is_file():
            table = json.loads(table_path.read_text())
        if (ws / "ops" / "registry.sqlite").is_file():
            from pipeline.ops.registry import Registry

            champ = Registry(ws).champion()  # a read-only connection
            if champ is not None and (ws / "finetune" / champ["finetune"] / "model.pt").exists():
                champion = champ["finetune"]
    return PlanInputs(
        key=key,
        weights_sha256=sha,
        weights_path=path,
        warm_start_table=table,
        champion_finetune=champion,
        weights_memo=memo,
    )


def record_plan_choices(plan: StagePlan, inputs: PlanInputs) -> None:
    """Persist what planning chose: a first warm-start choice, and new weight digests (atomic writes).

    Call under the workspace lock, after :func:`plan_stages`. The warm-start entry is written once per key,
    so the FineTune digest does not change when tonight's model later becomes the champion itself.
    """
    from pipeline.io import write_json

    ws = plan.workspace
    if plan.warm_start_choice is not None:
        key, choice = plan.warm_start_choice
        path = ws / "ops" / "warm_start.json"
        table = json.loads(path.read_text()) if path.is_file() else {}
        if key not in table:
            table[key] = choice
            write_json(path, table)
    memo = dict(list(inputs.weights_memo.items())[-WEIGHTS_MEMO_SIZE:])
    if set(memo.items()) != set(load_weights_memo(ws).items()):
        write_json(ws / WEIGHTS_MEMO, memo)


# ------------------------------------------------------------------------------------ digests and the plan
def plan_stages(cfg: Config, inputs: PlanInputs | None = None) -> StagePlan:
    """Compute every stage's output folder for ``cfg`` and the current data snapshot; write nothing.

    Args:
        cfg: The config.
        inputs: Key, weights digest, warm-start table and champion (:func:`gather_plan_inputs`); by
            default read now without writing (the workspace must have its key already).
    """
    from pipeline.ingest.deid import key_fingerprint

    if inputs is None:
        inputs = gather_plan_inputs(cfg)
    ws = Path(cfg.runtime.workspace)
    snap = data_snapshot(Path(cfg.data.source), Path(cfg.data.labels_csv))
    ingest = cfg.hashed(
        "task",
        "data",
        "split",
        "ingest",
        "deid",
        extra={"snapshot": snap, "key": key_fingerprint(inputs.key), "v": STAGE_VERSIONS["ingest"]},
    )
    augment = cfg.hashed(
        "preprocess",
        "augment",
        extra={"ingest": ingest, "backbone": backbone_preprocessing(cfg), "v": STAGE_VERSIONS["augment"]},
    )
    warm, choice = None, None
    if cfg.ops.retrain.warm_start == "champion":
        # One champion per (augment digest, training config, weights), fixed the first time a plan needs it.
        key = f"{augment}-{cfg.hashed('model', 'train', extra={'weights': inputs.weights_sha256})}"
        if key in inputs.warm_start_table:
            warm = inputs.warm_start_table[key]
        else:
            warm = inputs.champion_finetune
            choice = (key, warm)
    finetune = finetune_digest(cfg, augment, inputs.weights_sha256, warm)
    holdout = {"fraction": cfg.ops.promotion.holdout_fraction, "min": cfg.ops.promotion.min_holdout_cases}
    extra: dict[str, Any] = {"finetune": finetune, "holdout": holdout, "v": STAGE_VERSIONS["evaluate"]}
    if cfg.evaluate.external:
        extra["external"] = external_snapshots(cfg)
    evaluate = cfg.hashed("evaluate", "report", extra=extra)
    return StagePlan(
        workspace=ws,
        snapshot=snap,
        ingest=ws / "ingest" / ingest,
        augment=ws / "augment" / augment,
        finetune=ws / "finetune" / finetune,
        evaluate=ws / "evaluate" / evaluate,
        warm_start=ws / "finetune" / warm if warm else None,
        weights_sha256=inputs.weights_sha256,
        weights_path=inputs.weights_path,
        warm_start_choice=choice,
    )
