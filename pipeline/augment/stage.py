"""The Augment stage: the cached deterministic part, the transform spec and a preview sheet.

Outputs (in the stage folder): ``tensors/<case_id>.npy`` (float16, channel-first network inputs, see
:mod:`pipeline.augment.preprocess` for the axis order), ``index.csv`` (case_id, patient_id, split,
label_index and subgroup columns), ``tensor_digests.json`` (each tensor's sha256),
``transform_spec.json`` (deterministic preprocessing and the random training transforms with their
parameters) and ``preview.png`` (augmented training samples for visual QA).
Cases whose volume cannot be preprocessed (e.g. a 3D volume in a 2D task) are reported and left out. Cached
volumes are verified against their digest and rebuilt from the source when unusable (``cache`` in the spec).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.augment.preprocess import channel_count, colour_counts, make_spec, preprocess
from pipeline.augment.transforms import apply, build_train_transform, describe, sample_seed
from pipeline.config import Config
from pipeline.errors import IngestError
from pipeline.ingest.stage import read_manifest
from pipeline.ingest.volume_cache import load_volume
from pipeline.io import write_bytes, write_json, write_text

log = logging.getLogger(__name__)

#: ``{"tensors": {case_id: {"sha256", "volume"}}}``: each tensor's digest, checked when it is loaded
#: (:func:`pipeline.train.data.load_split`), and the cached volume it is rebuilt from.
TENSOR_DIGESTS = "tensor_digests.json"
INDEX_COLUMNS = ["case_id", "patient_id", "split", "label_index", "sex", "age_band", "manufacturer", "modality"]
INDEX_COLUMNS.insert(4, "label")  # a multilabel case's finding vector "0;1" (pipeline/ingest/labels.py)


def run_augment(cfg: Config, ingest_dir: Path, out_dir: Path, workspace: Path) -> dict[str, Any]:
    """Preprocess every manifest case into ``out_dir`` and write the spec and preview.

    Returns:
        A summary (cases written, cases left out with their reason).
    """
    from models import get_spec

    rows = read_manifest(ingest_dir)
    cache = workspace / "cache" / "volumes"
    backbone = get_spec(cfg.model.backbone)
    colour = colour_counts(rows, cache)
    names = colour.get("channel_names", ())  # data.channels: the named images of multi-image cases
    channels = channel_count(cfg.preprocess, colour["share"], backbone, names)
    spec = make_spec(cfg.preprocess, backbone, channels, target_spacing(cfg, rows, cache, workspace), names)
    tensor_dir = out_dir / "tensors"
    tensor_dir.mkdir(parents=True, exist_ok=True)
    kept, skipped = [], []
    audit: Counter = Counter()
    digests: dict[str, dict[str, str]] = {}
    from pipeline.progress import track

    for row in track(rows, len(rows), "Augment: preprocessing"):
        try:  # verified against its recorded sha256; rebuilt from the source when unusable
            arr, meta = load_volume(workspace, row["volume"], audit)
            x = preprocess(arr, meta.get("axis4"), spec, meta.get("affine"))
        except IngestError as err:  # incl. cache_lost: the volume is unusable and cannot be rebuilt
            skipped.append({"case_id": row["case_id"], "code": err.code, "reason": err.reason})
            continue
        data = tensor_bytes(x)
        write_bytes(tensor_dir / f"{row['case_id']}.npy", data)
        digests[row["case_id"]] = {"sha256": hashlib.sha256(data).hexdigest(), "volume": row["volume"]}
        kept.append(row)
    if audit:
        log.warning("Augment: cached volumes rebuilt from their sources: %s", dict(sorted(audit.items())))
    if not kept:
        reasons = sorted({s["reason"] for s in skipped})[:3]
        raise IngestError(f"Augment: no case could be preprocessed; e.g. {reasons}", code="nothing_preprocessed")
    group_cols = [c for c in rows[0] if c.startswith("group_")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS + group_cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    write_text(out_dir / "index.csv", buf.getvalue())
    write_json(out_dir / TENSOR_DIGESTS, {"schema_version": 1, "tensors": digests})

    train_tf = build_train_transform(
        cfg.augment, spec.spatial_dims, spec.image_size, spec.channels, colour=not spec.channel_names
    )
    write_json(
        out_dir / "transform_spec.json",
        {
            "schema_version": 1,
            "deterministic": spec.to_dict(),
            "backbone": cfg.model.backbone,
            "input_layout": f"({channels}, H, W) = (C, Y, X)" if spec.spatial_dims == 2 else f"({channels}, D, H, W) = (C, Z, Y, X)",
            "colour": dict(
                colour,
                channels=channels,
                rule="preprocess.channels: auto = three channels when at least half of the cases are colour "
                "(grey ones replicated), else one (colour ones become luminance)",
            ),
            "train_random": describe(train_tf),
            "random_state": "per sample: seed = sha256(train.seed, epoch, index); independent of worker count",
            "eval": "deterministic part only",
            "cases": len(kept),
            "skipped": skipped,
            "cache": dict(sorted(audit.items())),  # cached volumes rebuilt, by cause (cache_rebuilt: total)
        },
    )
    train_rows = [r for r in kept if r["split"] == "train"]
    if cfg.augment.preview and train_rows:
        _preview(out_dir, train_rows, train_tf, cfg, spec.spatial_dims, spec.target_spacing)
    log.info(
        "Augment: %d case(s) preprocessed, %d left out; %d colour and %d grey case(s) -> %d input channel(s)",
        len(kept), len(skipped), colour["colour"], colour["grey"], channels,
    )
    return {"cases": len(kept), "skipped": skipped, "channels": channels, "colour": colour}


def tensor_bytes(x: np.ndarray) -> bytes:
    """The ``.npy`` bytes of one network input as stored in ``tensors/`` (float16)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x.astype(np.float16)), allow_pickle=False)
    return buf.getvalue()


TARGET_SPACING_FILE = "target_spacing.json"


def target_spacing(cfg: Config, rows: list[dict], cache: Path, workspace: Path) -> tuple[float, ...] | None:
    """3D: the voxel size every volume is resampled to (``preprocess.target_spacing``).

    ``auto`` is the median RAS spacing of the training cases, computed on the first Augment run of the
    workspace and recorded in ``<workspace>/cache/target_spacing.json``; later runs reuse it, so a growing
    cohort does not invalidate every cached tensor each night. A configured value wins; ``none`` and 2D
    give None (resize by array shape).
    """
    from pipeline.augment.preprocess import check_spacing, target_spacing_of

    ts = cfg.preprocess.target_spacing
    if cfg.preprocess.spatial_dims != 3 or ts == "none":
        return None
    if isinstance(ts, tuple):
        return ts
    record = workspace / "cache" / TARGET_SPACING_FILE
    if record.is_file():
        return tuple(json.loads(record.read_text())["spacing"])
    spacings = []
    for r in rows:
        if r.get("split") != "train":
            continue
        try:
            meta = json.loads((cache / r["volume"]).with_suffix(".json").read_text())
            spacings.append(check_spacing(meta.get("affine"), r["case_id"]))
        except (OSError, ValueError, KeyError, IngestError):
            continue  # such a case is rejected (with its code) by the preprocessing loop
    value = target_spacing_of(spacings)
    write_json(record, {"spacing": list(value), "rule": "median RAS voxel size of the training cases",
                        "training_cases": len(spacings)})
    log.info("Augment: target voxel size %s mm (median of %d training volumes), recorded", value, len(spacings))
    return value


def _preview(
    out_dir: Path, rows: list[dict], tf, cfg: Config, dims: int, spacing: tuple[float, ...] | None = None
) -> None:
    """Sheet of original (top of each pair) and augmented (below) training samples.

    3D volumes show their middle axial slice drawn in physical proportions: with a target voxel size
    ``(x, y, z)`` mm the pixels are drawn ``y / x`` high, so anisotropic voxels are not squashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(cfg.augment.preview, len(rows))
    cols = min(8, n)
    pairs = (n + cols - 1) // cols
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(1.4 * cols, 1.5 * 2 * pairs), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    aspect = float(spacing[1]) / float(spacing[0]) if (dims == 3 and spacing) else 1.0
    for i in range(n):
        x = np.load(out_dir / "tensors" / f"{rows[i]['case_id']}.npy").astype(np.float32)
        y = apply(tf, x, sample_seed(cfg.train.seed, 0, i))
        r, c = 2 * (i // cols), i % cols
        lo, hi = float(x.min()), float(x.max())
        for k, img in enumerate((x, np.asarray(y, dtype=np.float32))):
            sl = img if dims == 2 else img[:, img.shape[1] // 2]
            if sl.shape[0] == 3:  # colour: shown in colour, one scale for all channels (hues kept)
                axes[r + k, c].imshow(
                    np.clip((np.moveaxis(sl, 0, -1) - lo) / max(hi - lo, 1e-6), 0, 1), aspect=aspect
                )
            else:
                axes[r + k, c].imshow(sl[0], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        axes[r, c].set_title(f"label {rows[i]['label_index']}", fontsize=7)
    title = "Training samples: original (upper) / augmented (lower)"
    if dims == 3:
        title += (
            f"; middle axial slice, voxel {' x '.join(f'{v:g}' for v in spacing)} mm, physical proportions"
            if spacing else "; middle axial slice, array proportions (preprocess.target_spacing: none)"
        )
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(out_dir / "preview.png", buf.getvalue())


def read_index(stage_dir: Path) -> list[dict[str, str]]:
    """Read a published Augment index."""
    with open(stage_dir / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))
