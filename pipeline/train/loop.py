"""The fine-tuning loop: strategies, early stopping on validation AUROC, resumable checkpoints.

Reproducibility: every RNG is seeded from ``train.seed`` (weights of the new head, epoch order, each
sample's augmentation, dropout), and the checkpoint written after every epoch holds model, optimizer,
scheduler, early-stopping state and the torch RNG state, so a run killed at any point resumes from its last
finished epoch and ends with the same weights as an uninterrupted run (on the same device and threads).

Checkpoints are loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.augment.stage import read_index
from pipeline.augment.transforms import build_train_transform
from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import atomic_path, write_json, write_text
from pipeline.train.data import AugmentedDataset, SplitData, epoch_order, label_subset, load_split

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_auroc", "lr", "seconds", "images_per_s", "best"]


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise MedtlError("train.device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_model(cfg: Config, num_classes: int, pretrained: bool | None = None, seed: int = 0) -> nn.Module:
    """The configured backbone with a new head, 1 input channel (see pipeline.augment.preprocess)."""
    from models import create_backbone

    use_pretrained = cfg.model.pretrained if pretrained is None else pretrained
    model = create_backbone(
        cfg.model.backbone,
        num_classes=num_classes,
        in_chans=1,
        spatial_dims=cfg.preprocess.spatial_dims,
        pretrained=use_pretrained,
        weights=str(cfg.model.weights) if (use_pretrained and cfg.model.weights) else None,
    )
    if use_pretrained:
        init_new_head(model, seed)
    return model


def init_new_head(model: nn.Module, seed: int) -> None:
    """Small-scale init of the new classifier (std 0.01, zero bias), seeded.

    timm's EfficientNet init scales the head by 1/sqrt(num_classes), which for 2 classes gives logits of
    +-30 on pretrained features and a loss that starts in the tens; a near-zero head starts at chance
    with calibrated-ish logits and keeps the pretrained features from being wrecked in the first steps.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
            head.bias.zero_()


def val_score(y: np.ndarray, probs: np.ndarray, positive_index: int | None) -> float:
    """Validation AUROC: the positive class's for binary tasks, macro one-vs-rest otherwise (NaN if undefined)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        return float(roc_auc_score(y == pos, probs[:, pos]))
    try:
        return float(roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))
    except ValueError:
        return float("nan")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits ``(N, K)`` for inputs ``x`` ``(N, 1, *spatial)`` (no augmentation)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size].astype(np.float32)).to(device)
        with _autocast(device):
            out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with discriminative learning rates: head at ``lr``, pretrained layers at ``lr * mult``."""
    from models import freeze, param_groups

    groups = param_groups(model)
    if cfg.train.strategy == "linear_probe":
        freeze(model, 1)
        return torch.optim.AdamW(groups[-1], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    body = [p for g in groups[:-1] for p in g]
    mult = cfg.train.backbone_lr_mult if cfg.model.pretrained else 1.0
    return torch.optim.AdamW(
        [
            {"params": body, "lr": cfg.train.lr * mult},
            {"params": groups[-1], "lr": cfg.train.lr},
        ],
        weight_decay=cfg.train.weight_decay,
    )


def _scheduler(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    warm = cfg.train.warmup_epochs * steps_per_epoch
    total = max(1, cfg.train.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _set_bn_eval_if_frozen(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def run_finetune(cfg: Config, augment_dir: Path, out_dir: Path, work_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train the configured backbone; write ``model.pt`` (best), ``model_info.json``, ``history.csv``.

    Args:
        cfg: The run config.
        augment_dir: The Augment stage folder.
        out_dir: Folder receiving the final artefacts (the caller publishes it atomically).
        work_dir: Persistent folder for per-epoch checkpoints; a rerun after a crash resumes from it.
        progress: Show a progress bar.

    Returns:
        The training summary (also ``train_summary.json``).
    """
    from tqdm.auto import tqdm

    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    device = select_device(cfg.train.device)
    rows = read_index(augment_dir)
    num_classes = len(cfg.task.classes)
    train = label_subset(load_split(augment_dir, rows, "train"), cfg.train.label_fraction, cfg.train.seed)
    val = load_split(augment_dir, rows, "val")
    if len(train) == 0 or len(val) == 0:
        raise MedtlError(f"FineTune: train ({len(train)}) and val ({len(val)}) splits must both hold cases")

    model = build_model(cfg, num_classes, seed=cfg.train.seed).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last if cfg.preprocess.spatial_dims == 2 else torch.channels_last_3d)
    opt = _optimizer(model, cfg)
    transform = build_train_transform(cfg.augment, cfg.preprocess.spatial_dims, cfg.preprocess.image_size)
    dataset = AugmentedDataset(train, transform, cfg.train.seed)
    bs = min(cfg.train.batch_size, len(train))
    steps = len(train) // bs  # drop_last: BatchNorm needs > 1 sample per batch
    sched = _scheduler(opt, cfg, max(1, steps))
    counts = np.bincount(train.y, minlength=num_classes).astype(np.float64)
    weights = None
    if cfg.train.class_weighting == "balanced":
        weights = torch.tensor(len(train.y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.train.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())

    work_dir.mkdir(parents=True, exist_ok=True)
    state = {"epoch": 0, "best_score": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}
    last = work_dir / "last.pt"
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        torch.set_rng_state(ck["torch_rng"])
        state = json.loads(ck["state"])
        log.info("FineTune: resuming after epoch %d from %s", state["epoch"], last)

    pos = cfg.task.positive_index
    t_start = time.perf_counter()
    while state["epoch"] < cfg.train.epochs and state["bad_epochs"] < cfg.train.patience:
        epoch = state["epoch"]
        dataset.set_epoch(epoch)
        order = epoch_order(len(train), cfg.train.seed, epoch)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, order), batch_size=bs, shuffle=False, drop_last=True,
            num_workers=cfg.runtime.num_workers, persistent_workers=False,
        )
        model.train()
        if cfg.train.strategy == "linear_probe":
            _set_bn_eval_if_frozen(model)
        t0 = time.perf_counter()
        total, n_seen = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False, disable=not progress, unit="batch")
        for xb, yb in bar:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if device.type == "cuda":
                xb = xb.contiguous(memory_format=torch.channels_last if xb.ndim == 4 else torch.channels_last_3d)
            opt.zero_grad(set_to_none=True)
            with _autocast(device):
                loss = loss_fn(model(xb), yb)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += float(loss.detach()) * len(yb)
            n_seen += len(yb)
            bar.set_postfix(loss=f"{total / n_seen:.4f}")
        seconds = time.perf_counter() - t0
        logits = predict_logits(model, val.x, device)
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        vloss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.y)))
        score = val_score(val.y, probs, pos)
        key_score = score if not math.isnan(score) else -vloss
        improved = key_score > state["best_score"] + 1e-4
        if improved:
            state.update(best_score=key_score, best_epoch=epoch, bad_epochs=0)
            _save_state_dict(model, work_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
        state["history"].append(
            {
                "epoch": epoch + 1, "train_loss": total / max(1, n_seen), "val_loss": vloss, "val_auroc": score,
                "lr": opt.param_groups[-1]["lr"], "seconds": seconds, "images_per_s": n_seen / max(seconds, 1e-9),
                "best": improved,
            }
        )
        state["epoch"] = epoch + 1
        log.info(
            "epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f%s (%.1f s, %.0f img/s)",
            epoch + 1, total / max(1, n_seen), vloss, score, " *" if improved else "", seconds, n_seen / max(seconds, 1e-9),
        )
        with atomic_path(last) as tmp:
            torch.save(
                {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), "state": json.dumps(state),
                },
                tmp,
            )
        _write_history(work_dir / "history.csv", state["history"])

    stopped = "early_stopping" if state["bad_epochs"] >= cfg.train.patience else "max_epochs"
    summary = {
        "schema_version": 1,
        "strategy": cfg.train.strategy,
        "backbone": cfg.model.backbone,
        "pretrained": cfg.model.pretrained,
        "weights": _weights_info(model),
        "device": device.type,
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"] + 1,
        "best_val_auroc": state["best_score"],
        "stopped_by": stopped,
        "train_cases": len(train),
        "train_class_counts": counts.astype(int).tolist(),
        "label_fraction": cfg.train.label_fraction,
        "val_cases": len(val),
        "seconds_this_session": time.perf_counter() - t_start,
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in state["history"]])) if state["history"] else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    best = torch.load(work_dir / "best.pt", map_location="cpu", weights_only=True)
    with atomic_path(out_dir / "model.pt") as tmp:
        torch.save(best, tmp)
    write_json(out_dir / "model_info.json", model_info(cfg, num_classes))
    _write_history(out_dir / "history.csv", state["history"])
    write_json(out_dir / "train_summary.json", summary)
    return summary


def _weights_info(model: nn.Module) -> dict[str, Any] | None:
    info = getattr(model, "pretrained_weights", None)
    if info is None:
        return None
    d = info.to_dict() if hasattr(info, "to_dict") else dict(info)
    if d.get("path"):
        d["path"] = os.path.basename(str(d["path"]))
    return d


def model_info(cfg: Config, num_classes: int) -> dict[str, Any]:
    """What is needed to rebuild the network and its inputs (no data, no identifiers)."""
    return {
        "schema_version": 1,
        "backbone": cfg.model.backbone,
        "num_classes": num_classes,
        "in_chans": 1,
        "spatial_dims": cfg.preprocess.spatial_dims,
        "image_size": cfg.preprocess.image_size,
        "class_names": cfg.task.class_names,
        "positive_class": cfg.task.positive_class,
        "task": cfg.task.kind,
    }


def load_trained_model(finetune_dir: Path, device: torch.device | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from ``model_info.json`` and load ``model.pt`` (weights only)."""
    from models import create_backbone

    info = json.loads((finetune_dir / "model_info.json").read_text())
    model = create_backbone(
        info["backbone"], num_classes=info["num_classes"], in_chans=info["in_chans"],
        spatial_dims=info["spatial_dims"], pretrained=False,
    )
    sd = torch.load(finetune_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model.to(device or torch.device("cpu")).eval()
    return model, info


def _save_state_dict(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})
    write_text(path, buf.getvalue())
