"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017): consistency between the student and an EMA teacher on
unlabelled cases (``train.semi_supervised: mean_teacher``).

The recipe, fitted to :mod:`pipeline.train.semi` (same fold structure, out-of-fold predictions and harm
guard as pseudo-labelling):

1. **Start.** The student starts from the fold's (or single) supervised model, like the self-training
   student, and trains for ``ceil(train.epochs * train.ssl_student_epochs)`` epochs with the same strategy
   (a ``linear_probe`` teacher has no gradient training: its student trains the head, ``partial`` with one
   group).
2. **Teacher.** The EMA of the student's weights (decay ``train.ssl_ema_decay`` per optimizer step; the
   training loop's ``train.ema_decay`` machinery, :func:`pipeline.train.epochs.ema_model`). As in the
   paper, the teacher is the model validated, early-stopped (validation AUROC, the validation labels used
   only as supervised training uses them) and kept.
3. **Steps.** Each optimizer step sees a labelled batch (the usual loss and augmentation) and as many
   unlabelled cases (USB's ``uratio`` 1), drawn from a seeded sample of at most
   ``train.ssl_unlabelled_per_labelled`` per labelled case. Each unlabelled case is seen under two
   independent draws of the same MONAI train transform (different per-sample seeds): the student sees
   view 1 in the labelled forward pass, the teacher view 2 without gradient.
4. **Consistency.** The squared difference of the two softmax outputs, averaged over classes and
   unlabelled cases (the reference code's ``softmax_mse_loss``), weighted by ``train.ssl_consistency_weight``
   times the sigmoid ramp-up ``exp(-5 (1 - t)^2)`` (Laine & Aila 2017, used by the paper) over the first
   :data:`RAMPUP_SHARE` of the student's steps.

The teacher predicts in eval mode (BatchNorm running statistics): its targets are those of the model that
is validated and kept; the two augmentations are the noise. The student's ``history.csv`` train loss
includes the consistency term. Cost per fold: about
``ssl_student_epochs`` x 2.3 supervised epochs (the student's forward/backward on twice the cases, plus the
teacher's forward): ~1.2 supervised trainings at the default 0.5, before early stopping.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.augment.transforms import sample_seed
from pipeline.train.data import AugmentedDataset, SplitData, epoch_order, repeated_order
from pipeline.train.epochs import DistInfo

if TYPE_CHECKING:
    from pipeline.train.semi import StudentJob

log = logging.getLogger(__name__)

#: Share of the student's optimizer steps over which the consistency weight ramps up (USB's
#: ``unsup_warm_up`` 0.4; the student starts from a trained model, so a long ramp is not needed).
RAMPUP_SHARE = 0.4


def sigmoid_rampup(t: float) -> float:
    """``exp(-5 (1 - t)^2)`` for ``t`` clipped to [0, 1] (Laine & Aila 2017): ~0.007 at 0, 1 at 1."""
    t = min(1.0, max(0.0, t))
    return math.exp(-5.0 * (1.0 - t) ** 2)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-case squared difference of the softmax outputs, averaged over classes, ``(N,)``; no gradient
    reaches the teacher's side."""
    s = torch.softmax(student_logits.float(), dim=1)
    t = torch.softmax(teacher_logits.detach().float(), dim=1)
    return ((s - t) ** 2).mean(dim=1)


class Consistency:
    """The Mean-Teacher consistency term, an :class:`~pipeline.train.epochs.ExtraLoss`.

    Stateless between epochs (the unlabelled order and augmentations are pure functions of the seed, the
    epoch and the index), so a resumed run replays the same batches.

    Args:
        unlabelled: The unlabelled cases this student may use (already sampled and leak-checked).
        seed: The run's seed (``train.seed``); the unlabelled draws use seeds derived from it.
        epochs: The student's maximum epochs (the ramp-up is a share of all its steps).
        weight: ``train.ssl_consistency_weight``.
        dist: Process group info: each process takes its own share of every step's unlabelled batch.
        num_workers: DataLoader workers (``runtime.num_workers``).
    """

    def __init__(
        self,
        unlabelled: SplitData,
        seed: int,
        epochs: int,
        weight: float,
        dist: DistInfo | None = None,
        num_workers: int = 0,
    ) -> None:
        if len(unlabelled) == 0:
            raise ValueError("Consistency: expected at least one unlabelled case")
        self.unlabelled = unlabelled
        self.seed = sample_seed(seed, -3, 0)  # not the labelled draws' seed
        self.epochs = epochs
        self.weight = weight
        self.dist = dist or DistInfo()
        self.num_workers = num_workers

    def weight_at(self, progress: float) -> float:
        """The consistency weight after ``progress`` (share of the student's steps done, 0..1)."""
        return self.weight * sigmoid_rampup(progress / RAMPUP_SHARE)

    def micro_batches(self, epoch: int, micro_sizes: list[list[int]]) -> list[list[list[int]]]:
        """Per step and micro-batch, the dataset indices of view 1 then view 2 of its unlabelled cases.

        The epoch's order of the unlabelled cases (reshuffled each pass when a pass is not enough) is
        dealt to the processes; case ``k`` of pass ``c`` is index ``k + 2cN`` in view 1 and
        ``k + (2c + 1)N`` in view 2, so every view of every draw has its own augmentation seed
        (:class:`~pipeline.train.data.AugmentedDataset`).
        """
        n, world, rank = len(self.unlabelled), self.dist.world, self.dist.rank
        need = sum(sum(s) for s in micro_sizes)
        passes = max(1, math.ceil(need * world / n))
        order = repeated_order(lambda r: epoch_order(n, self.seed, epoch * passes + r), n, passes)
        mine = order[rank::world][:need]
        out, pos = [], 0
        for step in micro_sizes:
            micros = []
            for m in step:
                g = np.asarray(mine[pos : pos + m], dtype=np.int64)
                pos += m
                k, c = g % n, g // n
                micros.append((k + 2 * c * n).tolist() + (k + (2 * c + 1) * n).tolist())
            out.append(micros)
        return out

    def batches(
        self, epoch: int, micro_sizes: list[list[int]], transform
    ) -> Iterator[tuple[torch.Tensor, Any]]:
        """Per micro-batch: view 1 (the student's) and ``(view 2, weight / the step's unlabelled cases)``."""
        steps = self.micro_batches(epoch, micro_sizes)
        dataset = AugmentedDataset(self.unlabelled, transform, self.seed)
        dataset.set_epoch(epoch)
        flat = [m for step in steps for m in step]
        loader = DataLoader(dataset, batch_sampler=flat, num_workers=self.num_workers)
        it = iter(loader)
        for s, step in enumerate(steps):
            scale = self.weight_at((epoch * len(steps) + s) / max(1, self.epochs * len(steps))) / sum(
                len(m) // 2 for m in step
            )
            for _ in step:
                x, _ = next(it)
                half = len(x) // 2
                yield x[:half], (x[half:], scale)

    def loss(self, logits: torch.Tensor, payload: Any, teacher: nn.Module | None) -> torch.Tensor:
        """``scale * sum over cases of softmax_mse(student, teacher)`` for one micro-batch."""
        if teacher is None:
            raise ValueError("Consistency.loss: the Mean Teacher needs the EMA teacher (train.ema_decay > 0)")
        x2, scale = payload
        x2 = x2.to(logits.device, non_blocking=True)
        if logits.device.type == "cuda":
            x2 = x2.contiguous(memory_format=torch.channels_last if x2.ndim == 4 else torch.channels_last_3d)
        teacher.eval()  # see the module doc
        with torch.no_grad():
            t_logits = teacher(x2)
        return scale * softmax_mse(logits, t_logits).sum()


def train_mean_teacher(job: StudentJob) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A Mean-Teacher student of the job's teacher on its labelled and unlabelled cases (see module doc).

    Returns:
        The kept network (the EMA teacher's best weights), its training result and what was used (counts,
        no ids).
    """
    from pipeline.train.loop import run_strategy
    from pipeline.train.semi import student_config

    cfg, u, strategy = job.cfg, job.unlabelled, job.strategy
    tc = cfg.train
    update: dict[str, Any] = {"ema_decay": tc.ssl_ema_decay}
    if strategy == "linear_probe":  # closed form, no steps: train the head by gradient instead
        strategy, update["trainable_groups"] = "partial", 1
    scfg = student_config(cfg, job.teacher, job.work_dir, **update)
    extra = Consistency(
        u, tc.seed, scfg.train.epochs, tc.ssl_consistency_weight, job.dist, cfg.runtime.num_workers
    )
    student, result = run_strategy(
        scfg, strategy, job.train, job.val, job.work_dir, job.device, job.dist, job.progress, extra_loss=extra
    )
    info = {
        "unlabelled_used": len(u),
        "student_strategy": strategy,
        "consistency_weight": tc.ssl_consistency_weight,
        "consistency_rampup_share": RAMPUP_SHARE,
        "ema_decay": tc.ssl_ema_decay,
        "student_epochs_run": result.get("epochs_run"),
    }
    log.info(
        "FineTune Mean Teacher (fold %d): %d unlabelled cases, %s epoch(s)",
        job.fold,
        len(u),
        result.get("epochs_run"),
    )
    return student, result, info
