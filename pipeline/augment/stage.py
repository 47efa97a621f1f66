"""The Augment stage: the cached deterministic part, the transform spec and a preview sheet.

Outputs (in the stage folder): ``tensors/<case_id>.npy`` (float16, channel-first network inputs, see
:mod:`pipeline.augment.preprocess` for the axis order), ``index.csv`` (case_id, patient_id, split,
label_index and subgroup columns), ``transform_spec.json`` (deterministic preprocessing and the random
training transforms with their parameters) and ``preview.png`` (augmented training samples for visual QA).
Cases whose volume cannot be preprocessed (e.g. a 3D volume in a 2D task) are reported and left out.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.augment.preprocess import make_spec, preprocess
from pipeline.augment.transforms import apply, build_train_transform, describe, sample_seed
from pipeline.config import Config
from pipeline.errors import IngestError
from pipeline.ingest.stage import read_manifest
from pipeline.io import write_bytes, write_json, write_text

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["case_id", "patient_id", "split", "label_index", "sex", "age_band", "manufacturer", "modality"]


def run_augment(cfg: Config, ingest_dir: Path, out_dir: Path, workspace: Path) -> dict[str, Any]:
    """Preprocess every manifest case into ``out_dir`` and write the spec and preview.

    Returns:
        A summary (cases written, cases left out with their reason).
    """
    from models import get_spec

    spec = make_spec(cfg.preprocess, get_spec(cfg.model.backbone))
    rows = read_manifest(ingest_dir)
    cache = workspace / "cache" / "volumes"
    tensor_dir = out_dir / "tensors"
    tensor_dir.mkdir(parents=True, exist_ok=True)
    kept, skipped = [], []
    for row in rows:
        vol_path = cache / row["volume"]
        try:
            meta = json.loads(vol_path.with_suffix(".json").read_text())
            arr = np.load(vol_path, allow_pickle=False)
            x = preprocess(arr, meta.get("axis4"), spec)
        except IngestError as err:
            skipped.append({"case_id": row["case_id"], "code": err.code, "reason": err.reason})
            continue
        except (OSError, ValueError) as err:
            skipped.append({"case_id": row["case_id"], "code": "cache_unreadable", "reason": f"cached volume unreadable: {err}"})
            continue
        buf = io.BytesIO()
        np.save(buf, x.astype(np.float16), allow_pickle=False)
        write_bytes(tensor_dir / f"{row['case_id']}.npy", buf.getvalue())
        kept.append(row)
    if not kept:
        reasons = sorted({s["reason"] for s in skipped})[:3]
        raise IngestError(f"Augment: no case could be preprocessed; e.g. {reasons}", code="nothing_preprocessed")
    group_cols = [c for c in rows[0] if c.startswith("group_")]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=INDEX_COLUMNS + group_cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    write_text(out_dir / "index.csv", buf.getvalue())

    train_tf = build_train_transform(cfg.augment, spec.spatial_dims, spec.image_size)
    write_json(
        out_dir / "transform_spec.json",
        {
            "schema_version": 1,
            "deterministic": spec.to_dict(),
            "backbone": cfg.model.backbone,
            "input_layout": "(1, H, W) = (1, Y, X)" if spec.spatial_dims == 2 else "(1, D, H, W) = (1, Z, Y, X)",
            "train_random": describe(train_tf),
            "random_state": "per sample: seed = sha256(train.seed, epoch, index); independent of worker count",
            "eval": "deterministic part only",
            "cases": len(kept),
            "skipped": skipped,
        },
    )
    train_rows = [r for r in kept if r["split"] == "train"]
    if cfg.augment.preview and train_rows:
        _preview(out_dir, train_rows, train_tf, cfg, spec.spatial_dims)
    log.info("Augment: %d case(s) preprocessed, %d left out", len(kept), len(skipped))
    return {"cases": len(kept), "skipped": skipped}


def _preview(out_dir: Path, rows: list[dict], tf, cfg: Config, dims: int) -> None:
    """Sheet of original (top of each pair) and augmented (below) training samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(cfg.augment.preview, len(rows))
    cols = min(8, n)
    pairs = (n + cols - 1) // cols
    fig, axes = plt.subplots(2 * pairs, cols, figsize=(1.4 * cols, 1.5 * 2 * pairs), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(n):
        x = np.load(out_dir / "tensors" / f"{rows[i]['case_id']}.npy").astype(np.float32)
        y = apply(tf, x, sample_seed(cfg.train.seed, 0, i))
        r, c = 2 * (i // cols), i % cols
        for k, img in enumerate((x, y)):
            sl = img[0] if dims == 2 else img[0, img.shape[1] // 2]
            axes[r + k, c].imshow(sl, cmap="gray", vmin=float(x.min()), vmax=float(x.max()))
        axes[r, c].set_title(f"label {rows[i]['label_index']}", fontsize=7)
    fig.suptitle("Training samples: original (upper) / augmented (lower)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    write_bytes(out_dir / "preview.png", buf.getvalue())


def read_index(stage_dir: Path) -> list[dict[str, str]]:
    """Read a published Augment index."""
    with open(stage_dir / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))
