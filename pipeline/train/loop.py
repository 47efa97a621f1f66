"""The fine-tuning loop: strategies, early stopping on validation AUROC, resumable checkpoints.

Reproducibility: every RNG is seeded from ``train.seed`` (weights of the new head, epoch order, each
sample's augmentation, dropout), and the checkpoint written after every epoch holds model, optimizer,
scheduler, early-stopping state and the torch RNG state, so a run killed at any point resumes from its last
finished epoch and ends with the same weights as an uninterrupted run (on the same device and threads).

Checkpoints are loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.augment.stage import read_index
from pipeline.augment.transforms import build_train_transform, sample_seed
from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import atomic_path, write_bytes, write_json, write_text
from pipeline.train.data import (
    AugmentedDataset,
    SplitData,
    balanced_order,
    concat,
    epoch_order,
    label_subset,
    load_split,
    patient_folds,
    repeated_order,
    subset,
)
from pipeline.train.strategies import (
    CHEAPEST_FIRST,
    fit_linear_probe,
    make_optimizer,
    pick_candidate,
    reestimate_bn,
    set_frozen_bn_eval,
    setup_trainable,
)

log = logging.getLogger(__name__)

HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_auroc",
    "lr",
    "seconds",
    "images_per_s",
    "data_wait_share",
    "best",
]


def select_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise MedtlError(
            "train.device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'"
        )
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
    """Validation AUROC: the positive class's (binary), macro one-vs-rest otherwise (NaN if undefined)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        return float(roc_auc_score(y == pos, probs[:, pos]))
    try:
        return float(
            roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
        )
    except ValueError:
        return float("nan")


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits ``(N, K)`` for inputs ``x`` ``(N, 1, *spatial)`` (no augmentation)."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size].astype(np.float32)).to(device)
        with _autocast(device, True):
            out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _autocast(device: torch.device, enabled: bool = True):
    if device.type == "cuda" and enabled:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


def _scheduler(opt: torch.optim.Optimizer, tc, steps_per_epoch: int):
    """Per-optimizer-step LR schedule: cosine after linear warm-up, one-cycle, or constant after warm-up."""
    total = max(1, tc.epochs * steps_per_epoch)
    warm = tc.warmup_epochs * steps_per_epoch
    if tc.schedule == "onecycle":
        pct = min(0.5, max(0.05, warm / total)) if warm else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, pct_start=pct
        )

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if tc.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class DistInfo:
    """This process's place in a (torchrun) process group; world 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> DistInfo:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
        return cls()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _batches(order: list[int], bs: int, dist: DistInfo, accumulate: int) -> list[list[list[int]]]:
    """Optimizer steps of one epoch: each a list of this rank's micro-batches (lists of indices).

    Global batch ``b`` is ``order[b*bs:(b+1)*bs]`` (last partial batch dropped: BatchNorm needs > 1
    sample); rank ``r`` takes every ``world``-th sample of it, split into ``accumulate`` micro-batches of
    at least 2 samples.
    """
    steps = []
    for b in range(len(order) // bs):
        local = order[b * bs : (b + 1) * bs][dist.rank :: dist.world]
        n_micro = max(1, min(accumulate, len(local) // 2))
        steps.append(
            [c.tolist() for c in np.array_split(np.asarray(local, dtype=np.int64), n_micro) if len(c)]
        )
    return steps


def _wrap_ddp(model: nn.Module, dist: DistInfo, device: torch.device) -> nn.Module:
    if dist.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


class _TBLog:
    """TensorBoard scalars when the ``tensorboard`` package is installed (else nothing)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, row: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k in ("train_loss", "val_loss", "val_auroc", "lr", "images_per_s"):
            v = row.get(k)
            if isinstance(v, (int, float)) and not math.isnan(v):
                self.writer.add_scalar(k, v, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_epochs(
    cfg: Config,
    model: nn.Module,
    strategy: str,
    train: SplitData,
    val: SplitData,
    work_dir: Path,
    device: torch.device,
    dist: DistInfo | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train ``model`` with ``strategy`` (not ``linear_probe``), early stopping on validation AUROC.

    Resumable: ``work_dir/last.pt`` (model, optimizer, scheduler, scaler, torch RNG, early-stopping state
    and history) is written after every epoch; a call that finds it continues after that epoch and ends
    with the same weights as an uninterrupted run. ``work_dir/best.pt`` holds the best weights, which are
    loaded into ``model`` before returning.

    Args:
        cfg: The run config (``train``, ``augment``, ``preprocess`` sections).
        model: The network (on ``device``; trainable parameters set here).
        strategy: ``partial``, ``gradual``, ``finetune`` or ``scratch``.
        train: Training cases (inputs ``(N, 1, *spatial)``).
        val: Validation cases.
        work_dir: Folder of checkpoints and logs.
        device: Where to train.
        dist: Process group info (DistributedDataParallel when ``world > 1``); only rank 0 writes.
        progress: Show a tqdm progress bar.

    Returns:
        ``best_score``, ``best_epoch`` (1-based), ``epochs_run``, ``stopped_by``, ``history``,
        ``resumed_after_epoch`` (None when the run started fresh).
    """
    from tqdm.auto import tqdm

    tc = cfg.train
    dist = dist or DistInfo()
    num_classes = len(cfg.task.classes)
    pretrained = cfg.model.pretrained and strategy != "scratch"
    schedule = setup_trainable(model, strategy, tc)
    opt = make_optimizer(model, strategy, tc, pretrained)
    transform = build_train_transform(cfg.augment, cfg.preprocess.spatial_dims, cfg.preprocess.image_size)
    dataset = AugmentedDataset(train, transform, tc.seed)
    bs = min(tc.batch_size, len(train))
    # small training sets: an epoch draws the cases several times to make train.min_steps_per_epoch steps
    repeats = max(1, math.ceil(tc.min_steps_per_epoch * bs / len(train)))
    steps_per_epoch = max(1, (repeats * len(train)) // bs)
    sched = _scheduler(opt, tc, steps_per_epoch)
    counts = np.bincount(train.y, minlength=num_classes).astype(np.float64)
    weights = None
    if tc.class_weighting == "balanced":
        weights = torch.tensor(
            len(train.y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device
        )
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=tc.label_smoothing, reduction="sum")
    scaler = torch.amp.GradScaler(
        "cuda", enabled=device.type == "cuda" and tc.amp and not torch.cuda.is_bf16_supported()
    )

    work_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "epoch": 0,
        "best_score": -math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
    }
    ema = None
    if tc.ema_decay > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    last = work_dir / "last.pt"
    resumed = None
    if last.exists():
        ck = torch.load(last, map_location=device, weights_only=True)
        model.load_state_dict(ck["model"])
        state = json.loads(ck["state"])
        if schedule is not None:  # the trainable set of the last finished epoch, before the optimizer state
            schedule.apply(model, max(0, state["epoch"] - 1))
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["torch_rng"])
        if device.type == "cuda" and "cuda_rng" in ck:
            torch.cuda.set_rng_state(ck["cuda_rng"], device)
        resumed = state["epoch"]
        log.info("FineTune[%s]: resuming after epoch %d from %s", strategy, state["epoch"], last)

    tb = _TBLog(work_dir / "tensorboard", enabled=dist.main)
    pos = cfg.task.positive_index
    net = _wrap_ddp(model, dist, device)
    n_trainable = None
    while state["epoch"] < tc.epochs and state["bad_epochs"] < tc.patience:
        epoch = state["epoch"]
        if schedule is not None:
            n = schedule.apply(model, epoch)
            if n != n_trainable and dist.world > 1:
                net = _wrap_ddp(model, dist, device)  # DDP registers hooks for the trainable set only
            n_trainable = n
        dataset.set_epoch(epoch)
        def draw(r: int, epoch: int = epoch) -> list[int]:
            e = epoch if r == 0 else sample_seed(tc.seed, epoch, 1_000_000 + r)
            if tc.sampler == "balanced":
                return balanced_order(train.y, tc.seed, e, num_classes)
            return epoch_order(len(train), tc.seed, e)

        order = repeated_order(draw, len(train), repeats)
        steps = _batches(order, bs, dist, tc.accumulate_steps)
        micro = [m for step in steps for m in step]
        loader = DataLoader(dataset, batch_sampler=micro, num_workers=cfg.runtime.num_workers)
        net.train()
        if strategy in ("partial", "gradual"):
            set_frozen_bn_eval(model)
        t0 = time.perf_counter()
        total, n_seen, waited = 0.0, 0, 0.0
        bar = tqdm(
            total=len(steps),
            desc=f"{strategy} epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=not (progress and dist.main),
            unit="step",
        )
        it = iter(loader)
        for step in steps:
            n_local = sum(len(m) for m in step)
            opt.zero_grad(set_to_none=True)
            for j in range(len(step)):
                tw = time.perf_counter()
                xb, yb = next(it)
                waited += time.perf_counter() - tw
                xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                if device.type == "cuda":
                    xb = xb.contiguous(
                        memory_format=torch.channels_last if xb.ndim == 4 else torch.channels_last_3d
                    )
                sync = j == len(step) - 1 or dist.world == 1
                ctx = net.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    with _autocast(device, tc.amp):
                        loss = loss_fn(net(xb), yb) / n_local
                    scaler.scale(loss).backward()
                total += float(loss.detach()) * n_local
                n_seen += len(yb)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            bar.update(1)
            bar.set_postfix(loss=f"{total / max(1, n_seen):.4f}")
        bar.close()
        seconds = time.perf_counter() - t0
        judged = ema.module if ema is not None else model  # the EMA weights are the ones kept
        logits = predict_logits(with_tta(judged, tc.tta, cfg.preprocess.spatial_dims), val.x, device)
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        vloss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.y)))
        score = val_score(val.y, probs, pos)
        key_score = score if not math.isnan(score) else -vloss
        improved = key_score > state["best_score"] + 1e-4
        if improved:
            state.update(best_score=key_score, best_epoch=epoch, bad_epochs=0)
            if dist.main:
                _save_state_dict(judged, work_dir / "best.pt")
        else:
            state["bad_epochs"] += 1
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(1, n_seen),
            "val_loss": vloss,
            "val_auroc": score,
            "lr": opt.param_groups[-1]["lr"],
            "seconds": seconds,
            "images_per_s": n_seen * dist.world / max(seconds, 1e-9),
            "data_wait_share": waited / max(seconds, 1e-9),
            "best": improved,
        }
        state["history"].append(row)
        state["epoch"] = epoch + 1
        log.info(
            "%s epoch %d: train loss %.4f, val loss %.4f, val AUROC %.4f%s (%.1f s, %.0f img/s)",
            strategy,
            epoch + 1,
            row["train_loss"],
            vloss,
            score,
            " *" if improved else "",
            seconds,
            row["images_per_s"],
        )
        if dist.main:
            ck = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "state": json.dumps(state),
            }
            if ema is not None:
                ck["ema"] = ema.state_dict()
            if device.type == "cuda":
                ck["cuda_rng"] = torch.cuda.get_rng_state(device)
            with atomic_path(last) as tmp:
                torch.save(ck, tmp)
            write_history(work_dir / "history.csv", state["history"])
            tb.epoch(row)
        dist.barrier()
    tb.close()
    dist.barrier()
    best = torch.load(work_dir / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(best)
    return {
        "best_score": state["best_score"],
        "best_epoch": state["best_epoch"] + 1,
        "epochs_run": state["epoch"],
        "stopped_by": "early_stopping" if state["bad_epochs"] >= tc.patience else "max_epochs",
        "history": state["history"],
        "resumed_after_epoch": resumed,
    }


def run_strategy(
    cfg: Config,
    strategy: str,
    train: SplitData,
    val: SplitData,
    work_dir: Path,
    device: torch.device,
    dist: DistInfo | None = None,
    progress: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a fresh network and train it with one strategy; resumable through ``work_dir``.

    A finished strategy leaves ``work_dir/result.json`` and ``best.pt``; calling again returns them without
    training (``auto`` and k-fold runs resume candidate by candidate).

    Returns:
        The trained network (best weights, on ``device``) and its result: ``strategy``, ``val_auroc``
        (NaN-safe score used for selection), ``seconds``, ``epochs_run``, ``best_epoch``, ``history``, ...
    """
    dist = dist or DistInfo()
    tc = cfg.train
    num_classes = len(cfg.task.classes)
    pretrained = cfg.model.pretrained and strategy != "scratch"
    torch.manual_seed(tc.seed)
    model = build_model(cfg, num_classes, pretrained=pretrained, seed=tc.seed)
    if strategy != "scratch":
        warm_start_into(model, work_dir)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(
            memory_format=torch.channels_last if cfg.preprocess.spatial_dims == 2 else torch.channels_last_3d
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    done = work_dir / "result.json"
    if done.exists() and (work_dir / "best.pt").exists():
        model.load_state_dict(torch.load(work_dir / "best.pt", map_location=device, weights_only=True))
        return model, json.loads(done.read_text())
    t0 = time.perf_counter()
    result: dict[str, Any] = {"strategy": strategy, "pretrained": pretrained}
    if tc.bn_reestimate and pretrained:
        n_bn = reestimate_bn(model, train.x, device)
        result["bn_reestimated_layers"] = n_bn
    if strategy == "linear_probe":
        probe = fit_linear_probe(
            model, train.x, train.y, val.x, val.y, tc, num_classes, cfg.task.positive_index, device
        )
        logits = predict_logits(with_tta(model, tc.tta, cfg.preprocess.spatial_dims), val.x, device)
        probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
        score = val_score(val.y, probs, cfg.task.positive_index)
        vloss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.y)))
        seconds = time.perf_counter() - t0
        history = [
            {
                "epoch": 1,
                "train_loss": float("nan"),
                "val_loss": vloss,
                "val_auroc": score,
                "lr": float("nan"),
                "seconds": seconds,
                "images_per_s": len(train) / max(seconds, 1e-9),
                "data_wait_share": 0.0,
                "best": True,
            }
        ]
        result.update(
            val_auroc=score if not math.isnan(score) else -vloss,
            probe=probe.to_dict(),
            epochs_run=1,
            best_epoch=1,
            stopped_by="closed_form",
            history=history,
            resumed_after_epoch=None,
        )
        if dist.main:
            _save_state_dict(model, work_dir / "best.pt")
            write_history(work_dir / "history.csv", history)
    else:
        if tc.probe_init and pretrained and not (work_dir / "last.pt").exists():
            probe = fit_linear_probe(
                model, train.x, train.y, val.x, val.y, tc, num_classes, cfg.task.positive_index, device
            )
            result["probe_init"] = probe.to_dict()
        out = train_epochs(cfg, model, strategy, train, val, work_dir, device, dist, progress)
        result.update(val_auroc=out.pop("best_score"), **out)
    result["seconds"] = time.perf_counter() - t0
    if dist.main:
        write_json(done, result)
    dist.barrier()
    return model, result


def run_finetune(
    cfg: Config, augment_dir: Path, out_dir: Path, work_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Train with the configured strategy; write ``model.pt`` (best), ``model_info.json``, ``history.csv``.

    ``train.strategy: auto`` trains each of ``train.auto_candidates`` (cheapest first) and keeps the one
    with the best validation AUROC (the cheaper one within ``auto_tolerance``); every candidate's score and
    the reason are in ``train_summary.json`` under ``strategy_selection``. ``train.folds >= 2`` trains one
    model per patient-level fold of train+val and saves their ensemble (see :class:`FoldEnsemble`).

    Args:
        cfg: The run config.
        augment_dir: The Augment stage folder.
        out_dir: Folder receiving the final artefacts (the caller publishes it atomically); only the
            rank-0 process writes it.
        work_dir: Persistent folder for per-epoch checkpoints; a rerun after a crash resumes from it.
        progress: Show a progress bar.

    Returns:
        The training summary (also ``train_summary.json``).
    """
    tc = cfg.train
    dist = DistInfo.current()
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    torch.manual_seed(tc.seed)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    device = select_device(cfg.train.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    rows = read_index(augment_dir)
    num_classes = len(cfg.task.classes)
    train = label_subset(load_split(augment_dir, rows, "train"), tc.label_fraction, tc.seed)
    val = load_split(augment_dir, rows, "val")
    if len(train) == 0 or len(val) == 0:
        raise MedtlError(f"FineTune: train ({len(train)}) and val ({len(val)}) splits must both hold cases")
    t_start = time.perf_counter()
    selection = None
    folds_info = None
    if tc.folds > 1:
        model, result, folds_info = _run_folds(cfg, train, val, work_dir, device, dist, progress)
    elif tc.strategy == "auto":
        results: dict[str, dict[str, Any]] = {}
        models: dict[str, nn.Module] = {}
        for name in sorted(tc.auto_candidates, key=CHEAPEST_FIRST.index):
            m, r = run_strategy(cfg, name, train, val, work_dir / name, device, dist, progress)
            results[name] = r
            models[name] = m.cpu()
        chosen, reason = pick_candidate({k: r["val_auroc"] for k, r in results.items()}, tc.auto_tolerance)
        model, result = models[chosen].to(device), results[chosen]
        selection = {
            "chosen": chosen,
            "reason": reason,
            "tolerance": tc.auto_tolerance,
            "candidates": [
                {
                    "strategy": k,
                    "val_auroc": r["val_auroc"],
                    "seconds": r["seconds"],
                    "epochs_run": r["epochs_run"],
                    "best_epoch": r["best_epoch"],
                }
                for k, r in results.items()
            ],
        }
        log.info("FineTune auto: chose %s: %s", chosen, reason)
    else:
        model, result = run_strategy(cfg, tc.strategy, train, val, work_dir, device, dist, progress)

    counts = np.bincount(train.y, minlength=num_classes)
    history = result["history"]
    summary = {
        "schema_version": 2,
        "strategy": result["strategy"],
        "strategy_requested": tc.strategy,
        "strategy_selection": selection,
        "folds": folds_info,
        "backbone": cfg.model.backbone,
        "pretrained": result.get("pretrained", cfg.model.pretrained),
        "weights": _weights_info(model) if result.get("pretrained", cfg.model.pretrained) else None,
        "device": device.type,
        "processes": dist.world,
        "epochs_run": result["epochs_run"],
        "best_epoch": result["best_epoch"],
        "best_val_auroc": result["val_auroc"],
        "stopped_by": result["stopped_by"],
        "resumed_after_epoch": result.get("resumed_after_epoch"),
        "probe": result.get("probe"),
        "probe_init": result.get("probe_init"),
        "ema_decay": tc.ema_decay,
        "bn_reestimated_layers": result.get("bn_reestimated_layers"),
        "train_cases": len(train),
        "train_class_counts": counts.astype(int).tolist(),
        "label_fraction": tc.label_fraction,
        "val_cases": len(val),
        "seconds_this_session": time.perf_counter() - t_start,
        "seconds_training": result.get("seconds"),
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
    }
    oof = folds_info.pop("_oof") if folds_info else None
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _save_state_dict(model, out_dir / "model.pt")
        info = model_info(cfg, num_classes)
        info["strategy"] = result["strategy"]
        if folds_info:
            info["ensemble"] = {"folds": tc.folds, "combine": "mean_probability"}
            _save_oof(out_dir / OOF_FILE, *oof)
        write_json(out_dir / "model_info.json", info)
        write_history(out_dir / "history.csv", history)
        write_json(out_dir / "train_summary.json", summary)
        _publish_tensorboard(work_dir, out_dir / "tensorboard")
    dist.barrier()
    return summary


def _publish_tensorboard(work_dir: Path, dest: Path) -> None:
    """Copy the TensorBoard event folders of the work folder (one per strategy/fold) into the outputs."""
    import shutil

    for tb in sorted(work_dir.rglob("tensorboard")):
        rel = tb.parent.relative_to(work_dir)
        shutil.copytree(tb, dest / rel if str(rel) != "." else dest, dirs_exist_ok=True)


class FoldEnsemble(nn.Module):
    """Ensemble of fold models: ``forward`` returns ``log(mean_k softmax(model_k(x)))``.

    These are valid logits (their softmax is the mean probability), so evaluation, calibration and
    ``predict_logits`` treat the ensemble like any network. State dict keys: ``members.<k>.<key>``.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probability([m(x) for m in self.members])


def log_mean_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """``log(mean_k softmax(logits_k))``: logits whose softmax is the mean probability of the inputs."""
    probs = torch.stack([torch.softmax(z.float(), 1) for z in logits]).mean(0)
    return torch.log(probs.clamp_min(1e-12))


class FlipTTA(nn.Module):
    """Test-time augmentation by mirroring: ``forward`` returns ``log(mean softmax)`` over flipped copies.

    Every combination of the mirrored ``axes`` is evaluated (2 passes for one axis, 8 for three), as
    nnU-Net mirrors at inference. The output is a valid logit vector, so calibration, conformal sets and
    ``predict_logits`` treat the wrapped model like any network. Not saved: ``model.pt`` holds the inner
    network and ``model_info.json`` the ``tta`` mode that :func:`load_trained_model` re-applies.

    Args:
        model: The network (or :class:`FoldEnsemble`).
        axes: Tensor axes to mirror (2 = the first spatial axis of ``(N, C, ...)``).
    """

    def __init__(self, model: nn.Module, axes: tuple[int, ...]) -> None:
        super().__init__()
        self.model = model
        self.combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return log_mean_probability([self.model(x.flip(c) if c else x) for c in self.combos])


def tta_axes(mode: str, spatial_dims: int) -> tuple[int, ...]:
    """Tensor axes mirrored by ``train.tta``: ``flip`` = the left-right (last) axis, ``flip_all`` = all."""
    if mode == "none":
        return ()
    if mode == "flip":
        return (spatial_dims + 1,)
    if mode == "flip_all":
        return tuple(range(2, spatial_dims + 2))
    raise ValueError(f"train.tta={mode!r}; expected 'none', 'flip' or 'flip_all'")


def with_tta(model: nn.Module, mode: str, spatial_dims: int) -> nn.Module:
    """``model`` wrapped in :class:`FlipTTA` for ``mode`` (unchanged for ``none``)."""
    axes = tta_axes(mode, spatial_dims)
    return FlipTTA(model, axes) if axes else model


def without_tta(model: nn.Module) -> nn.Module:
    """The network inside a :class:`FlipTTA` (for Grad-CAM, which needs one forward pass per input)."""
    return model.model if isinstance(model, FlipTTA) else model


OOF_FILE = "oof_predictions.npz"
WARM_START_FILE = "warm_start.pt"


def warm_start_into(model: nn.Module, work_dir: Path) -> bool:
    """Load ``warm_start.pt`` (a champion's ``model.pt``) from ``work_dir`` or its parent into ``model``.

    The FineTune task puts the file there when ``ops.retrain.warm_start: champion`` (k-fold runs train in
    ``work_dir/fold<k>``, hence the parent). A k-fold champion (``members.<k>.*`` keys) gives its first
    member. Loading is strict: a champion of another backbone or class count is an error, never a partial
    load.

    Returns:
        True when weights were loaded.
    """
    path = next((p for p in (work_dir / WARM_START_FILE, work_dir.parent / WARM_START_FILE) if p.is_file()), None)
    if path is None:
        return False
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("members.") for k in sd):
        sd = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("members.0.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise MedtlError(
            f"ops.retrain.warm_start: the champion's weights ({path}) do not fit this network "
            f"({type(model).__name__}, {cfg_summary(model)}); expected the same backbone and classes. "
            "Use warm_start: pretrained after changing the backbone or the classes"
        ) from err
    log.info("FineTune: warm start from the champion's weights")
    return True


def cfg_summary(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return f"{getattr(head, 'out_features', '?')} outputs"


def _save_oof(path: Path, case_ids: list[str], logits: np.ndarray) -> None:
    """Out-of-fold logits (log-probabilities) per pseudonymous case id, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, case_id=np.array(case_ids, dtype=str), logits=logits.astype(np.float64))
    write_bytes(path, buf.getvalue())


def load_oof(finetune_dir: Path) -> dict[str, np.ndarray] | None:
    """``case_id -> out-of-fold logits`` of a k-fold FineTune folder, or None for a single model."""
    path = Path(finetune_dir) / OOF_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return dict(zip(z["case_id"].tolist(), z["logits"], strict=True))


def _run_folds(cfg, train, val, work_dir, device, dist, progress):
    """K-fold cross-validation over train+val patients; returns the ensemble, its result and per-fold info."""
    tc = cfg.train
    pool = concat(train, val)
    fold = patient_folds(pool, tc.folds, tc.seed)
    members, per_fold, history = [], [], []
    oof = np.full((len(pool), len(cfg.task.classes)), np.nan)
    for k in range(tc.folds):
        tr, va = subset(pool, np.flatnonzero(fold != k)), subset(pool, np.flatnonzero(fold == k))
        m, r = run_strategy(cfg, tc.strategy, tr, va, work_dir / f"fold{k}", device, dist, progress)
        m_tta = with_tta(m, tc.tta, cfg.preprocess.spatial_dims)
        oof[fold == k] = torch.softmax(torch.from_numpy(predict_logits(m_tta, va.x, device)), 1).numpy()
        members.append(m)
        history.extend(r["history"])
        per_fold.append(
            {
                "fold": k,
                "train_cases": len(tr),
                "val_cases": len(va),
                "val_auroc": r["val_auroc"],
                "epochs_run": r["epochs_run"],
                "best_epoch": r["best_epoch"],
            }
        )
    oof_score = val_score(pool.y, oof, cfg.task.positive_index)
    ensemble = FoldEnsemble(members).to(device)
    history = [dict(h, epoch=i + 1) for i, h in enumerate(history)]  # folds one after the other
    result = {
        "strategy": tc.strategy,
        "val_auroc": oof_score,
        "epochs_run": sum(f["epochs_run"] for f in per_fold),
        "best_epoch": None,
        "stopped_by": "k_fold",
        "history": history,
        "seconds": None,
    }
    info = {
        "k": tc.folds,
        "out_of_fold_auroc": oof_score,
        "per_fold": per_fold,
        "note": "train+val patients pooled; each fold's held-out part drove its early stopping",
        # Out-of-fold predictions (popped before the summary is written): the Evaluate stage uses them for
        # the validation split, whose cases the ensemble has trained on.
        "_oof": (list(pool.case_ids), np.log(np.clip(oof, 1e-12, None))),
    }
    return ensemble, result, info


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
        "tta": cfg.train.tta,
    }


def load_trained_model(
    finetune_dir: Path, device: torch.device | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network (or fold ensemble) from ``model_info.json``; load ``model.pt`` (weights only)."""
    from models import create_backbone

    info = json.loads((finetune_dir / "model_info.json").read_text())

    def one() -> nn.Module:
        return create_backbone(
            info["backbone"],
            num_classes=info["num_classes"],
            in_chans=info["in_chans"],
            spatial_dims=info["spatial_dims"],
            pretrained=False,
        )

    ens = info.get("ensemble")
    model = FoldEnsemble([one() for _ in range(int(ens["folds"]))]) if ens else one()
    sd = torch.load(finetune_dir / "model.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    model = with_tta(model, info.get("tta", "none"), int(info["spatial_dims"]))
    model.to(device or torch.device("cpu")).eval()
    return model, info


def _save_state_dict(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})
    write_text(path, buf.getvalue())
