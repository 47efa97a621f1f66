"""Helpers for the training tests: a tiny Augment-stage folder with a learnable signal, and its config."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import yaml


def make_augment_dir(
    root: Path,
    n: int = 48,
    size: int = 16,
    dims: int = 2,
    classes: int = 2,
    seed: int = 0,
    val_share: float = 0.3,
    unlabelled: int = 0,
) -> Path:
    """Write ``tensors/<case>.npy`` ``(1, *[size]*dims)`` float16, ``index.csv`` and ``transform_spec.json``
    like the Augment stage.

    Class ``c`` carries a bright blob whose intensity grows with ``c`` (learnable, not trivial: noise).
    """
    rng = np.random.default_rng(seed)
    out = root / "augment"
    (out / "tensors").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = i % classes
        x = rng.normal(0, 1, (1,) + (size,) * dims).astype(np.float32)
        sl = (slice(None),) + tuple(slice(size // 4, size // 2) for _ in range(dims))
        x[sl] += 1.2 * label
        cid = f"case{i:03d}"
        np.save(out / "tensors" / f"{cid}.npy", x.astype(np.float16))
        split = "val" if rng.random() < val_share else "train"
        rows.append({"case_id": cid, "patient_id": f"p{i:03d}", "split": split, "label_index": label})
    for i in range(unlabelled):  # the same signal, label withheld (as Ingest writes unlabelled cases)
        label = i % classes
        x = rng.normal(0, 1, (1,) + (size,) * dims).astype(np.float32)
        x[(slice(None),) + tuple(slice(size // 4, size // 2) for _ in range(dims))] += 1.2 * label
        cid = f"unl{i:03d}"
        np.save(out / "tensors" / f"{cid}.npy", x.astype(np.float16))
        rows.append({"case_id": cid, "patient_id": f"u{i:03d}", "split": "unlabelled", "label_index": ""})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case_id", "patient_id", "split", "label_index"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (out / "index.csv").write_text(buf.getvalue())
    spec = {
        "spatial_dims": dims,
        "image_size": size,
        "intensity": "minmax",
        "window": None,
        "mean": 0.5,
        "std": 0.5,
        "clip_percentiles": [0.5, 99.5],
    }
    (out / "transform_spec.json").write_text(json.dumps({"deterministic": spec}))
    return out


def write_train_config(root: Path, classes: int = 2, dims: int = 2, size: int = 16, **train) -> Path:
    """A config whose data paths exist (unused: training reads the Augment folder)."""
    (root / "src").mkdir(exist_ok=True)
    (root / "labels.csv").write_text("path,label\n")
    task = (
        {"kind": "binary", "classes": {"0": "neg", "1": "pos"}, "positive_class": "pos"}
        if classes == 2
        else {"kind": "multiclass", "classes": {str(c): f"c{c}" for c in range(classes)}}
    )
    t = {"epochs": 2, "batch_size": 8, "lr": 0.003, "patience": 5, "seed": 0, "device": "cpu"}
    t.update(train)
    cfg = {
        "name": "train-test",
        "task": task,
        "data": {"source": "src", "labels_csv": "labels.csv"},
        "preprocess": {"spatial_dims": dims, "image_size": size},
        "model": {"backbone": "efficientnet_lite0", "pretrained": True},
        "train": t,
        "runtime": {"workspace": "ws", "threads": 1},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
