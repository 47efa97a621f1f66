"""MedMNIST benchmark through the real pipeline (the same code as ``medtl run``).

    python bench/medmnist.py --npz ../shared/data/medmnist/breastmnist.npz [--config CONFIG]
        [--label-fraction F [--supervised-only]] [--seeds N] [--first-seed S]
        [--out results.json] [--workdir DIR]

Converts a MedMNIST-format ``.npz`` (``{train,val,test}_images`` uint8, 2D ``(N, H, W[, 3])`` or 3D
``(N, D, H, W)``; ``{split}_labels`` ``(N, 1)``) into a medtl dataset: 2D images as PNG files, 3D volumes
as NIfTI files (voxel order written so that the network sees the array's ``(D, H, W)``), and a labels CSV
with the official split column and one pseudo-patient per image. Then, for each seed, it writes a config
(the defaults below, the ``--config`` YAML merged over them) and calls ``tasks.cli.run_pipeline``. Test
AUC and ACC are recomputed from the run's ``predictions.csv`` with MedMNIST's definitions (binary: AUC of
the class-1 score, ACC of the arg-max; multi-class/ordinal: macro one-vs-rest AUC, arg-max ACC), from the
uncalibrated probabilities (``p_raw_*``) as MedMNIST does, and from the calibrated ones (``p_cal_*``).

``--label-fraction F`` keeps a stratified share F of the training and of the validation images labelled
(per class, seeded by the seed) and gives the rest as unlabelled cases: their label cells are left empty
in that seed's labels CSV, so the pipeline never sees those labels and its defaults use the cases
(semi-supervised training). ``--supervised-only`` runs the same setting with ``train.semi_supervised: off``
for the supervised-only figure. Test labels are always kept.

``results.json`` keys: ``dataset``, ``npz``, ``label_fraction``, ``config`` (the effective config of seed
0), ``seeds`` (list of ``{seed, test_auc, test_acc, test_acc_calibrated, pipeline_auroc, val_auroc,
strategy, strategy_selection, train_cases, seconds}``), ``mean`` and ``std`` (over seeds, of ``test_auc``,
``test_acc``, ``test_acc_calibrated``, ``seconds``), ``published`` (the MedMNIST v2 rows of this dataset).
Multi-label MedMNIST sets (ChestMNIST) are not supported.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED = ROOT.parent / "shared" / "data" / "medmnist"

#: The configuration medtl would ship for MedMNIST-like data, per dimensionality (merged under --config).
DEFAULTS: dict[int, dict[str, Any]] = {
    2: {
        "preprocess": {"spatial_dims": 2, "image_size": 64, "intensity": "window", "window": [0, 255]},
        "augment": {"preset": "standard"},
        "model": {"backbone": "efficientnet_lite0", "pretrained": True},
        "train": {
            # 5-fold cross-validation over train+val patients, ensemble of the 5 fine-tuned models
            "strategy": "finetune",
            "folds": 5,
            "epochs": 20,
            "patience": 6,
            "min_steps_per_epoch": 15,
            "batch_size": 32,
            "lr": 0.001,
            "backbone_lr_mult": 0.3,
            "tta": "flip",
        },
        "evaluate": {"calibration": "temperature", "n_bootstrap": 200},
    },
    3: {
        "preprocess": {"spatial_dims": 3, "image_size": 28, "intensity": "window", "window": [0, 255]},
        # orientation-free masks: flips about every axis, small 3D rotations and shifts
        "augment": {"preset": "standard", "flip_all_axes": True, "translate": 0.1},
        "model": {"backbone": "resnet10_3d_compact", "pretrained": False},
        "train": {
            # compact 3D ResNet-10 from scratch (no MedicalNet weights offline; inflated ImageNet
            # EfficientNet-Lite0 fine-tuned reached 0.665, its linear probe 0.620)
            "strategy": "scratch",
            "epochs": 40,
            "patience": 15,
            "batch_size": 32,
            "lr": 0.003,
            "weight_decay": 0.05,
            "schedule": "onecycle",
            "warmup_epochs": 6,
            "tta": "flip_all",
        },
        "evaluate": {"calibration": "temperature", "n_bootstrap": 200},
    },
}


#: MedMNIST sets whose info may be missing beside the npz (task as MedMNIST's INFO states it).
KNOWN_TASKS: dict[str, tuple[str, str, dict[str, str]]] = {
    "retinamnist": ("RetinaMNIST", "ordinal", {str(g): f"grade_{g}" for g in range(5)}),
}


def dataset_info(npz: Path) -> dict[str, Any]:
    """Name, task kind and class names from MedMNIST's info (when present beside the npz) or the labels."""
    stem = npz.stem.lower()
    base = stem[:-3] if stem.endswith(("_64", "_28")) else stem
    base = base.rsplit("_", 1)[0] if base.endswith(("_128", "_224")) else base
    for folder in (npz.parent, SHARED):
        f = folder / "medmnist_info_subset.json"
        if f.is_file():
            info = json.loads(f.read_text())
            if base in info:
                i = info[base]
                kind = {
                    "binary-class": "binary",
                    "multi-class": "multiclass",
                    "ordinal-regression": "ordinal",
                }.get(i["task"])
                if kind is None:
                    raise SystemExit(f"{npz}: MedMNIST task {i['task']!r} is not supported (multi-label)")
                return {"name": i.get("python_class", base), "kind": kind, "classes": i["label"]}
    if base in KNOWN_TASKS:
        name, kind, classes = KNOWN_TASKS[base]
        return {"name": name, "kind": kind, "classes": classes}
    data = np.load(npz)
    labels = np.unique(data["train_labels"])
    if data["train_labels"].ndim == 2 and data["train_labels"].shape[1] > 1:
        raise SystemExit(f"{npz}: multi-label MedMNIST data is not supported")
    kind = "binary" if len(labels) == 2 else "multiclass"
    return {"name": base, "kind": kind, "classes": {str(int(v)): f"class_{int(v)}" for v in labels}}


def convert(npz: Path, folder: Path) -> tuple[int, int]:
    """Write the npz as a medtl dataset under ``folder`` (idempotent); returns (cases, spatial dims).

    Layout: ``folder/images/<split>/<split>_<i>.png|.nii.gz`` and ``folder/labels.csv`` with columns
    ``path, label, split, patient``.
    """
    data = np.load(npz)
    sample = data["train_images"]
    dims = 3 if (sample.ndim == 4 and sample.shape[-1] not in (3,)) else 2
    done = folder / "labels.csv"
    if done.is_file():
        return sum(1 for _ in open(done)) - 1, dims
    import nibabel as nib
    from PIL import Image

    rows = []
    for split in ("train", "val", "test"):
        images, labels = (
            data[f"{split}_images"],
            data[f"{split}_labels"].reshape(len(data[f"{split}_labels"]), -1),
        )
        out = folder / "images" / split
        out.mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels[:, 0], strict=True)):
            name = f"{split}_{i:05d}"
            if dims == 2:
                rel = f"{split}/{name}.png"
                Image.fromarray(np.ascontiguousarray(img)).save(folder / "images" / rel)
            else:
                rel = f"{split}/{name}.nii.gz"
                # array (D, H, W) -> NIfTI (X, Y, Z) = (W, H, D): preprocessing transposes back to (D, H, W)
                vol = np.ascontiguousarray(np.transpose(img, (2, 1, 0)))
                nii = nib.Nifti1Image(vol, np.eye(4))
                nii.header.set_sform(np.eye(4), code=1)
                nii.header.set_qform(np.eye(4), code=1)
                nib.save(nii, folder / "images" / rel)
            rows.append({"path": rel, "label": int(lab), "split": split, "patient": name})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "label", "split", "patient"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    done.write_text(buf.getvalue())
    return len(rows), dims


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_config(
    info: dict[str, Any],
    dims: int,
    data_dir: Path,
    workspace: Path,
    seed: int,
    fraction: float,
    user: dict[str, Any],
) -> dict[str, Any]:
    classes = {str(k): v.replace(",", "").replace(" ", "_") for k, v in info["classes"].items()}
    task: dict[str, Any] = {"kind": info["kind"], "classes": classes}
    if info["kind"] == "binary":
        task["positive_class"] = list(classes)[1]
    cfg = {
        "name": f"bench-{info['name']}",
        "task": task,
        "data": {
            "source": str(data_dir / "images"),
            "labels_csv": str(data_dir / "labels.csv"),
            "id_column": "path",
            "id_type": "path",
            "label_column": "label",
            "split_column": "split",
            "patient_column": "patient",
            "kinds": ["image"] if dims == 2 else ["nifti"],
        },
        "split": {"calibration_from_train": 0.1},
        "augment": {"preview": 8},
        # the whole official test set is scored: no share of it locked away for promotion decisions
        # (by default Evaluate leaves the promotion holdout, half the test patients, out of its metrics)
        "ops": {"promotion": {"holdout_fraction": 0.0}},
        "runtime": {"workspace": str(workspace), "threads": 2},
    }
    cfg = _merge(cfg, DEFAULTS[dims])
    cfg = _merge(cfg, user)
    cfg["train"] = dict(cfg["train"], seed=seed)
    if fraction < 1.0:
        cfg["data"]["labels_csv"] = str(data_dir / f"labels_f{fraction:g}_s{seed}.csv")
    return cfg


def withhold_labels(data_dir: Path, fraction: float, seed: int) -> Path:
    """``labels_f<F>_s<seed>.csv``: a stratified share F of the train and of the val rows keeps its label
    (per class, at least one, in a seeded order); the other train/val rows get an empty label cell
    (:func:`pipeline.demo.withhold_labels`, the rule of ``medtl demo --label-fraction``)."""
    from pipeline.demo import withhold_labels as withhold

    out = data_dir / f"labels_f{fraction:g}_s{seed}.csv"
    with open(data_dir / "labels.csv", newline="") as fh:
        rows = withhold(list(csv.DictReader(fh)), fraction, seed)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "label", "split", "patient"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    out.write_text(buf.getvalue())
    return out


def test_scores(
    pred_csv: Path, kind: str, class_names: list[str], expected_cases: int | None = None
) -> dict[str, float]:
    """MedMNIST-style test AUC / ACC from a run's ``predictions.csv``."""
    from sklearn.metrics import roc_auc_score

    with open(pred_csv, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "test"]
    y = np.array([int(r["label_index"]) for r in rows])
    raw = np.array([[float(r[f"p_raw_{n}"]) for n in class_names] for r in rows])
    cal = np.array([[float(r[f"p_cal_{n}"]) for n in class_names] for r in rows])
    if expected_cases is not None and len(y) != expected_cases:
        raise RuntimeError(
            f"{pred_csv}: {len(y)} test predictions; expected the whole official test set ({expected_cases})"
        )
    if raw.shape[1] == 2:
        auc = roc_auc_score(y, raw[:, 1])
    else:
        auc = roc_auc_score(y, raw, multi_class="ovr", average="macro")
    return {
        "test_auc": float(auc),
        "test_acc": float(np.mean(raw.argmax(1) == y)),
        "test_acc_calibrated": float(np.mean(cal.argmax(1) == y)),
        "test_cases": len(y),
    }


def published(name: str) -> list[dict[str, Any]]:
    f = SHARED / "medmnist_v2_benchmark.csv"
    if not f.is_file():
        return []
    with open(f, newline="") as fh:
        return [
            {"method": r["method"], "test_auc": float(r["test_AUC"]), "test_acc": float(r["test_ACC"])}
            for r in csv.DictReader(fh)
            if r["dataset"].lower() == name.lower()
        ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", required=True, type=Path, help="MedMNIST-format .npz")
    ap.add_argument(
        "--config", type=Path, help="YAML merged over the defaults (same sections as a medtl config)"
    )
    ap.add_argument(
        "--label-fraction",
        type=float,
        default=1.0,
        help="share of train and val labels kept; the rest become unlabelled cases (default 1)",
    )
    ap.add_argument(
        "--supervised-only", action="store_true", help="with --label-fraction: train.semi_supervised off"
    )
    ap.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="seeds run are FIRST..FIRST+N-1 (default 0), to add seeds"
    )
    ap.add_argument("--out", type=Path, help="results JSON")
    ap.add_argument(
        "--workdir", type=Path, help="dataset + workspace folder (default /tmp/medtl-bench/<npz stem>)"
    )
    args = ap.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.workspace import plan_stages
    from tasks.cli import _setup_logging, run_pipeline

    _setup_logging(False)
    npz = args.npz.resolve()
    info = dataset_info(npz)
    work = (args.workdir or Path("/tmp/medtl-bench") / npz.stem).resolve()
    n, dims = convert(npz, work / "data")
    user = yaml.safe_load(args.config.read_text()) if args.config else {}
    print(
        f"{info['name']}: {n} cases, {dims}D, {info['kind']}, label fraction {args.label_fraction}",
        flush=True,
    )
    with np.load(npz) as z:
        n_test = len(z["test_labels"])
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        if args.label_fraction < 1.0:
            withhold_labels(work / "data", args.label_fraction, seed)
        cfg = make_config(info, dims, work / "data", work / "ws", seed, args.label_fraction, user)
        if args.supervised_only:
            cfg["train"]["semi_supervised"] = "off"
        tag = "_sup" if args.supervised_only else ""
        path = work / f"config_f{args.label_fraction:g}{tag}_s{seed}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0 = time.perf_counter()
        rc = run_pipeline(path)
        seconds = time.perf_counter() - t0
        plan = plan_stages(load_config(path))
        if rc != 0:
            if not (plan.evaluate / "predictions.csv").is_file():
                print(f"seed {seed}: the pipeline failed (exit {rc})", file=sys.stderr)
                return rc
            print(
                f"seed {seed}: the run wrapper failed (exit {rc}) after the Evaluate stage finished; "
                "scoring its predictions",
                file=sys.stderr,
            )
        loaded = load_config(path)
        scores = test_scores(
            plan.evaluate / "predictions.csv", info["kind"], loaded.task.class_names, expected_cases=n_test
        )
        metrics = json.loads((plan.evaluate / "metrics.json").read_text())
        summary = json.loads((plan.finetune / "train_summary.json").read_text())
        disc = metrics["evaluation"]["test"]["uncalibrated"]["discrimination"]
        auroc = (disc.get("auroc") or disc.get("macro_auroc") or {}).get("value")
        results.append(
            {
                "seed": seed,
                **scores,
                "pipeline_auroc": auroc,
                "val_auroc": summary["best_val_auroc"],
                "strategy": summary["strategy"],
                "strategy_selection": summary.get("strategy_selection"),
                "train_cases": summary["train_cases"],
                "semi_supervised": (summary.get("semi_supervised") or {}).get("harm_guard"),
                "seconds": seconds,
            }
        )
        print(
            f"seed {seed}: test AUC {scores['test_auc']:.4f}  ACC {scores['test_acc']:.4f} "
            f"(calibrated {scores['test_acc_calibrated']:.4f})  strategy {summary['strategy']}  "
            f"val AUROC {summary['best_val_auroc']:.4f}  {seconds:.0f} s",
            flush=True,
        )
    keys = ("test_auc", "test_acc", "test_acc_calibrated", "seconds")
    mean = {k: float(np.mean([r[k] for r in results])) for k in keys}
    std = {k: float(np.std([r[k] for r in results], ddof=1)) if len(results) > 1 else 0.0 for k in keys}
    pub = published(info["name"])
    print(f"\n{info['name']} (label fraction {args.label_fraction:g}, {len(results)} seeds)")
    print(
        f"  medtl          AUC {mean['test_auc']:.3f} +- {std['test_auc']:.3f}   "
        f"ACC {mean['test_acc']:.3f} +- "
        f"{std['test_acc']:.3f}   ({mean['seconds']:.0f} s per seed)"
    )
    for p in pub:
        print(f"  {p['method']:<22s} AUC {p['test_auc']:.3f}           ACC {p['test_acc']:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)  # e.g. bench/results/, which git ignores
        args.out.write_text(
            json.dumps(
                {
                    "dataset": info["name"],
                    "npz": npz.name,
                    "label_fraction": args.label_fraction,
                    "supervised_only": args.supervised_only,
                    "config": make_config(info, dims, Path("data"), Path("ws"), 0, args.label_fraction, user),
                    "seeds": results,
                    "mean": mean,
                    "std": std,
                    "published": pub,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
