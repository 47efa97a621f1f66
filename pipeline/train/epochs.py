"""One strategy's epochs: optimizer steps with augmentation, early stopping on validation AUROC, resumable
checkpoints, DDP, TensorBoard.

Reproducibility: every RNG is seeded from ``train.seed`` (epoch order, each sample's augmentation,
dropout), and the checkpoint written after every epoch holds model, optimizer, scheduler, early-stopping
state and the torch RNG state, so a run killed at any point resumes from its last finished epoch and ends
with the same weights as an uninterrupted run (on the same device and threads). Checkpoints are loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.augment.transforms import build_train_transform, sample_seed
from pipeline.config import Config
from pipeline.io import atomic_path, write_text
from pipeline.train.data import AugmentedDataset, SplitData, balanced_order, epoch_order, repeated_order
from pipeline.train.strategies import make_optimizer, set_frozen_bn_eval, setup_trainable
from pipeline.train.validation import val_score
from pipeline.trained.device import autocast
from pipeline.trained.nets import with_tta
from pipeline.trained.scorer import predict_logits

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


class ExtraLoss(Protocol):
    """An extra term of the training loss on extra inputs (the hook of semi-supervised consistency).

    Per micro-batch, the extra inputs go through the network in the same forward pass as the labelled
    micro-batch (one BatchNorm batch, one DDP forward), and :meth:`loss` turns their logits into a term
    added to the labelled loss. See :mod:`pipeline.train.mean_teacher`.
    """

    def batches(
        self, epoch: int, micro_sizes: list[list[int]], transform
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """One ``(inputs, payload)`` per micro-batch of the epoch, in order.

        Args:
            epoch: The epoch (0-based).
            micro_sizes: This process's labelled micro-batch sizes, per optimizer step.
            transform: The run's random train transform (MONAI Compose).
        """
        ...

    def loss(self, logits: torch.Tensor, payload: Any, teacher: nn.Module | None) -> torch.Tensor:
        """The term of one micro-batch, scaled like the labelled loss (its share of the step's mean).

        Args:
            logits: The network's outputs for the extra inputs.
            payload: What :meth:`batches` gave with them.
            teacher: The EMA of the weights (``train.ema_decay`` > 0), else None.
        """
        ...


def ema_model(model: nn.Module, decay: float) -> nn.Module:
    """Exponential moving average of ``model``'s parameters and buffers, updated by ``update_parameters``
    after each optimizer step (the first update copies the weights)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


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
    extra_loss: ExtraLoss | None = None,
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
        extra_loss: An extra loss term on extra inputs (semi-supervised consistency), or None.

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
    transform = build_train_transform(
        cfg.augment, cfg.preprocess.spatial_dims, cfg.preprocess.image_size, channels=int(train.x.shape[1]),
        colour=not cfg.data.channels,  # named channels (MR sequences) are never colour-jittered
    )
    dataset = AugmentedDataset(train, transform, tc.seed)
    bs = min(tc.batch_size, len(train))
    # small training sets: an epoch draws the cases several times to make train.min_steps_per_epoch steps
    repeats = max(1, math.ceil(tc.min_steps_per_epoch * bs / len(train)))
    steps_per_epoch = max(1, (repeats * len(train)) // bs)
    sched = _scheduler(opt, tc, steps_per_epoch)
    loss_fn = (
        _bce_loss_fn(tc, train.ym, device) if cfg.task.multilabel else _loss_fn(tc, train.y, num_classes, device)
    )
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
    ema = ema_model(model, tc.ema_decay) if tc.ema_decay > 0 else None
    last = work_dir / "last.pt"
    resumed = None
    if last.exists():
        state = _resume(last, model, schedule, opt, sched, scaler, ema, device)
        resumed = state["epoch"]
        log.info("FineTune[%s]: resuming after epoch %d from %s", strategy, state["epoch"], last)

    tb = _TBLog(work_dir / "tensorboard", enabled=dist.main)
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
        extra = None
        if extra_loss is not None:
            extra = (extra_loss, extra_loss.batches(epoch, [[len(m) for m in st] for st in steps], transform))
        net.train()
        if strategy in ("partial", "gradual"):
            set_frozen_bn_eval(model)
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(steps),
            desc=f"{strategy} epoch {epoch + 1}/{tc.epochs}",
            leave=False,
            disable=not (progress and dist.main),
            unit="step",
        )
        total, n_seen, waited = _optimizer_steps(
            net, model, loader, steps, loss_fn, opt, sched, scaler, ema, device, dist, tc.amp, bar, extra,
            mixup_alpha=tc.mixup_alpha,
        )
        bar.close()
        seconds = time.perf_counter() - t0
        judged = ema.module if ema is not None else model  # the EMA weights are the ones kept
        score, vloss = judge(cfg, judged, val, device)
        key_score = score if not math.isnan(score) else -vloss
        improved = key_score > state["best_score"] + 1e-4
        if improved:
            state.update(best_score=key_score, best_epoch=epoch, bad_epochs=0)
            if dist.main:
                save_state_dict(judged, work_dir / "best.pt")
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
            "%s epoch %d/%d: train loss %.4f, val loss %.4f, val AUROC %.4f%s (%.1f s, %.0f img/s)",
            strategy,
            epoch + 1,
            tc.epochs,
            row["train_loss"],
            vloss,
            score,
            " *" if improved else "",
            seconds,
            row["images_per_s"],
        )
        if dist.main:
            _save_checkpoint(last, model, opt, sched, scaler, ema, state, device)
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



def _loss_fn(tc, y: np.ndarray, num_classes: int, device: torch.device) -> nn.Module:
    """Summed cross-entropy, with inverse-frequency class weights when ``train.class_weighting: balanced``."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    weights = None
    if tc.class_weighting == "balanced":
        weights = torch.tensor(len(y) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=tc.label_smoothing, reduction="sum")


def _bce_loss_fn(tc, ym: np.ndarray, device: torch.device) -> nn.Module:
    """Multilabel loss: summed binary cross-entropy over findings (one sigmoid each).

    ``train.class_weighting: balanced`` is the counterpart of the cross-entropy class weights: each
    finding's positives are weighted by its negative/positive ratio (``pos_weight``), so every finding's
    positives and negatives weigh equally; ``none`` leaves them unweighted. ``train.label_smoothing``
    moves the 0/1 targets towards 1/2 by the same share.
    """
    pos = ym.sum(axis=0)
    pos_weight = None
    if tc.class_weighting == "balanced":
        pos_weight = torch.tensor((len(ym) - pos) / np.maximum(pos, 1), dtype=torch.float32, device=device)
    bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")
    eps = float(tc.label_smoothing)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float()
        return bce(logits.float(), t * (1 - eps) + 0.5 * eps)

    return loss


def judge(cfg: Config, model: nn.Module, val: SplitData, device: torch.device) -> tuple[float, float]:
    """Validation AUROC (NaN when undefined; multilabel: the macro AUROC over findings) and loss of
    ``model`` with the run's TTA."""
    multilabel = cfg.task.multilabel
    logits = predict_logits(
        with_tta(model, cfg.train.tta, cfg.preprocess.spatial_dims, multilabel), val.x, device
    )
    z = torch.from_numpy(logits)
    if multilabel:
        vloss = float(nn.functional.binary_cross_entropy_with_logits(z, torch.from_numpy(val.ym)))
        return val_score(val.ym, torch.sigmoid(z).numpy(), None), vloss
    probs = torch.softmax(z, 1).numpy()
    vloss = float(nn.functional.cross_entropy(z, torch.from_numpy(val.y)))
    return val_score(val.y, probs, cfg.task.positive_index), vloss


def mixup(xb: torch.Tensor, yb: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) of one labelled micro-batch: ``lam * x + (1 - lam) * x[perm]`` with
    ``lam ~ Beta(alpha, alpha)``; returns the blended inputs, the partners' targets and ``lam``.

    Written here rather than with ``timm.data.Mixup`` (which draws from numpy's global generator, needs an
    even batch and returns label-smoothed soft targets): the blend must sit inside this loop's micro-batch
    accumulation, class-weighted summed loss and checkpointed torch RNG (the draws come from the global
    torch generator, whose state ``last.pt`` saves, so a resumed run mixes exactly as an uninterrupted one).
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(len(yb))
    return lam * xb + (1.0 - lam) * xb[perm], yb[perm], lam


def _optimizer_steps(
    net, model, loader, steps, loss_fn, opt, sched, scaler, ema, device, dist, amp, bar, extra=None,
    mixup_alpha: float = 0.0,
):
    """One epoch's optimizer steps (micro-batches accumulated); returns summed loss, cases seen, data wait.

    ``extra``: ``(ExtraLoss, its batches of this epoch)``; their inputs share the labelled forward pass.
    ``mixup_alpha`` > 0 blends each labelled micro-batch (:func:`mixup`); the loss is blended alike (the
    loss is linear in the target, so this equals the loss on blended targets).
    """
    total, n_seen, waited = 0.0, 0, 0.0
    it = iter(loader)
    for step in steps:
        n_local = sum(len(m) for m in step)
        opt.zero_grad(set_to_none=True)
        for j in range(len(step)):
            tw = time.perf_counter()
            xb, yb = next(it)
            n_lab = len(yb)
            partner, lam = None, 1.0
            if mixup_alpha > 0:
                xb, partner, lam = mixup(xb, yb, mixup_alpha)
                partner = partner.to(device, non_blocking=True)
            if extra is not None:
                xu, payload = next(extra[1])
                xb = torch.cat([xb, xu])
            waited += time.perf_counter() - tw
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if device.type == "cuda":
                xb = xb.contiguous(
                    memory_format=torch.channels_last if xb.ndim == 4 else torch.channels_last_3d
                )
            sync = j == len(step) - 1 or dist.world == 1
            ctx = net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with autocast(device, amp):
                    out = net(xb)
                    loss = loss_fn(out[:n_lab], yb)
                    if partner is not None:
                        loss = lam * loss + (1.0 - lam) * loss_fn(out[:n_lab], partner)
                    loss = loss / n_local
                    if extra is not None:
                        teacher = ema.module if ema is not None else None
                        loss = loss + extra[0].loss(out[n_lab:], payload, teacher)
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
    return total, n_seen, waited


def _save_checkpoint(path: Path, model, opt, sched, scaler, ema, state: dict[str, Any], device) -> None:
    """``last.pt``: everything a resumed run needs to continue exactly (written atomically)."""
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
    with atomic_path(path) as tmp:
        torch.save(ck, tmp)


def _resume(path: Path, model, schedule, opt, sched, scaler, ema, device) -> dict[str, Any]:
    """Load ``last.pt`` into the training objects; return the early-stopping state."""
    ck = torch.load(path, map_location=device, weights_only=True)
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
    return state



def save_state_dict(model: nn.Module, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)




def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    w.writeheader()
    for h in history:
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in h.items()})
    write_text(path, buf.getvalue())
