"""Active-learning simulation on a MedMNIST file: labelling rounds per strategy, test AUC per round.

    python bench/active.py --npz ../shared/data/medmnist/breastmnist.npz --out results/active.json \
        [--seeds 3] [--start 20] [--per-round 20] [--rounds 4] [--strategies typiclust,entropy,coreset,random]
        [--epochs 6]

Each seed starts from a stratified labelled set of ``--start`` training images; the rest of the official
training split is the unlabelled pool (labels withheld, revealed only when a case is chosen). Every round
trains a model with the shipped 2D defaults of ``bench/medmnist.py`` through the pipeline's own functions
(:func:`pipeline.train.loop.run_finetune` on tensors made by :func:`pipeline.augment.preprocess.preprocess`),
with the simulation's reductions stated here: ``train.folds: 1`` and ``train.epochs: --epochs``, semi-supervised
training off (to isolate the choice of cases), early stopping on the official validation split. The model
scores the pool with :class:`pipeline.trained.scorer.Scorer` (probabilities calibrated by temperature on the
validation split, features from the backbone) and :func:`pipeline.active.rank.rank_candidates` -- the
function ``medtl suggest`` calls -- picks the next ``--per-round`` cases. Test AUC (MedMNIST's definition:
class-1 score for binary, macro one-vs-rest otherwise) is measured on the whole official test split.

JSON: ``{"default_strategy", "rounds" (labels per round), "seeds", "curves" (strategy -> mean test AUC per
round), "per_seed" (strategy -> seed -> AUCs), "paired_vs_random" (strategy -> mean difference over seeds x
rounds with a 95% t interval), "config", "seconds"}``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.medmnist import DEFAULTS, dataset_info  # noqa: E402


def _tensors(images: np.ndarray, spec) -> np.ndarray:
    from pipeline.augment.preprocess import preprocess

    out = []
    for img in images:
        arr = img.transpose(1, 0, 2)[:, :, None, :] if img.ndim == 3 else img.T[:, :, None]
        out.append(preprocess(arr, "rgb" if img.ndim == 3 else None, spec).astype(np.float16))
    return np.stack(out)


def _write_augment(folder: Path, x: np.ndarray, y: np.ndarray, ids: list[str], splits: list[str], spec) -> Path:
    (folder / "tensors").mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", "patient_id", "split", "label_index"])
    for xi, yi, cid, sp in zip(x, y, ids, splits, strict=True):
        np.save(folder / "tensors" / f"{cid}.npy", xi)
        w.writerow([cid, cid, sp, int(yi)])
    (folder / "index.csv").write_text(buf.getvalue())
    (folder / "transform_spec.json").write_text(json.dumps({"deterministic": spec.to_dict()}))
    return folder


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if p.shape[1] == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro"))


def _stratified_start(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    classes = np.unique(y)
    per = {c: max(1, round(n * np.mean(y == c))) for c in classes}
    order = sorted(range(len(y)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    picked, count = [], {c: 0 for c in classes}
    for i in order:
        if count[y[i]] < per[y[i]]:
            picked.append(i)
            count[y[i]] += 1
    return np.array(sorted(picked))


def simulate(args, strategy: str, seed: int, data, cfg_dict: dict[str, Any], work: Path) -> list[float]:
    from pipeline.active.rank import rank_candidates
    from pipeline.config.schema import Config
    from pipeline.train.loop import run_finetune
    from pipeline.trained.artefact import TrainedModel
    from pipeline.trained.calibration import make_calibrator
    from pipeline.trained.scorer import Scorer

    x_tr, y_tr, x_va, y_va, x_te, y_te, spec = data
    labelled = _stratified_start(y_tr, args.start, seed)
    aucs = []
    for r in range(args.rounds + 1):
        rdir = work / f"{strategy}-s{seed}-r{r}"
        ids = [f"tr{i:05d}" for i in labelled] + [f"va{i:05d}" for i in range(len(y_va))]
        aug = _write_augment(
            rdir / "augment", np.concatenate([x_tr[labelled], x_va]), np.concatenate([y_tr[labelled], y_va]),
            ids, ["train"] * len(labelled) + ["val"] * len(y_va), spec,
        )
        cfg = Config.model_validate(dict(cfg_dict, train=dict(cfg_dict["train"], seed=seed)))
        run_finetune(cfg, aug, rdir / "model", rdir / "work", progress=False)
        model = TrainedModel.load(rdir / "model")
        scorer = Scorer(model, "cpu")
        model.calibrator = make_calibrator("temperature").fit(scorer.logits(x_va), y_va)
        aucs.append(_auc(y_te, scorer.probabilities(x_te, calibrated=False)))
        print(f"{strategy} seed {seed} round {r}: {len(labelled)} labels, test AUC {aucs[-1]:.4f}", flush=True)
        if r == args.rounds:
            break
        pool = np.setdiff1d(np.arange(len(y_tr)), labelled)
        pick = rank_candidates(
            strategy, args.per_round, scorer.probabilities(x_tr[pool]), scorer.features(x_tr[pool]),
            scorer.features(x_tr[labelled]), y_tr[labelled], seed=seed * 1000 + r,
        )
        labelled = np.sort(np.concatenate([labelled, pool[pick]]))
    return aucs


def main(argv: list[str] | None = None) -> int:
    from pipeline.active.rank import DEFAULT_STRATEGY, STRATEGIES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--npz", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--start", type=int, default=20)
    ap.add_argument("--per-round", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--strategies", default="typiclust,entropy,coreset,random")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (to add seeds)")
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench" / "results" / "active-work")
    args = ap.parse_args(argv)
    strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"--strategies: unknown {unknown}; expected some of {', '.join(STRATEGIES)}")
    import torch

    from models import get_spec
    from pipeline.augment.preprocess import make_spec
    from pipeline.config.schema import Config

    torch.set_num_threads(2)
    info = dataset_info(args.npz)
    d = np.load(args.npz)
    if d["train_images"].ndim == 4 and d["train_images"].shape[-1] != 3:
        raise SystemExit("bench/active.py simulates 2D files (MedMNIST 3D: use a reduced config in a later run)")
    base = dict(DEFAULTS[2])
    cfg_dict = {
        **base,
        "task": {"kind": info["kind"], "classes": {str(k): v for k, v in info["classes"].items()}},
        "data": {"source": ".", "labels_csv": "labels.csv"},
        "train": dict(base["train"], folds=1, epochs=args.epochs, patience=args.epochs, semi_supervised="off", device="cpu"),
        "runtime": {"threads": 2},
    }
    if info["kind"] == "binary":
        cfg_dict["task"]["positive_class"] = cfg_dict["task"]["classes"]["1"]
    cfg = Config.model_validate(cfg_dict)
    spec = make_spec(cfg.preprocess, get_spec(cfg.model.backbone))
    y = {s: d[f"{s}_labels"].reshape(-1).astype(np.int64) for s in ("train", "val", "test")}
    x = {s: _tensors(d[f"{s}_images"], spec) for s in ("train", "val", "test")}
    data = (x["train"], y["train"], x["val"], y["val"], x["test"], y["test"], spec)
    t0 = time.perf_counter()
    per_seed: dict[str, dict[int, list[float]]] = {s: {} for s in strategies}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for s in strategies:
            per_seed[s][seed] = simulate(args, s, seed, data, cfg_dict, args.workdir / args.npz.stem)
    rounds = [args.start + r * args.per_round for r in range(args.rounds + 1)]
    curves = {s: np.mean(list(v.values()), axis=0).tolist() for s, v in per_seed.items()}
    paired = {}
    if "random" in per_seed:
        for s in strategies:
            if s == "random":
                continue
            diffs = np.array([np.array(per_seed[s][k]) - np.array(per_seed["random"][k]) for k in per_seed[s]])
            diffs = diffs[:, 1:].ravel()  # rounds after the first choice (round 0 is the same start)
            m, sd = float(diffs.mean()), float(diffs.std(ddof=1)) if len(diffs) > 1 else float("nan")
            from scipy.stats import t

            h = float(t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
            paired[s] = {"mean_difference": m, "ci": [m - h, m + h], "n": int(len(diffs))}
    out = {
        "dataset": info["name"],
        "npz": args.npz.name,
        "default_strategy": DEFAULT_STRATEGY,
        "rounds": rounds,
        "seeds": args.seeds,
        "curves": curves,
        "per_seed": {s: {str(k): v for k, v in ps.items()} for s, ps in per_seed.items()},
        "paired_vs_random": paired,
        "config": yaml.safe_load(yaml.safe_dump(cfg_dict)),
        "reductions": {"folds": 1, "epochs": args.epochs, "semi_supervised": "off"},
        "seconds": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("rounds", "curves", "paired_vs_random")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
