"""Semi-supervised training from unlabelled cases: self-training with pseudo-labels from the fold ensemble,
or Mean Teacher (:mod:`pipeline.train.mean_teacher`); both share steps 1, 4 (start) and 5 below.

The pseudo-label recipe (``train.semi_supervised: pseudo_label``; ``auto`` uses it whenever unlabelled
cases exist, until the bench says otherwise):

1. **Teacher.** Each supervised fold model (or the single model) scores the unlabelled cases with its TTA.
   In a k-fold ensemble the pseudo-labels for fold k come from fold k's own supervised model, which never
   saw fold k's labelled cases, so the out-of-fold comparison below stays honest.
2. **Distribution alignment** (Berthelot et al., ReMixMatch 2020): the teacher's probabilities are
   multiplied by ``prior / mean prediction`` and renormalised, so the pseudo-labels follow the labelled
   class prior instead of the teacher's bias towards the majority class.
3. **Confidence threshold and quota.** Only cases whose aligned confidence reaches
   ``train.ssl_threshold`` are kept, at most ``train.ssl_pseudo_per_labelled`` per labelled case, split
   across classes in proportion to the labelled prior (the most confident first).
4. **Student.** The teacher's weights are fine-tuned further on labelled + pseudo-labelled cases for
   ``train.ssl_student_epochs`` of the epochs, early-stopped on the same validation cases (validation
   labels are used only as supervised training uses them). Cost: about one more supervised training.
5. **Harm guard.** Supervised and semi-supervised predictions are compared on the same out-of-fold (or
   validation) cases: the paired (patient-cluster) bootstrap CI of the AUROC difference. When it lies
   below 0 the supervised model is kept; the difference and its CI are reported either way.

Unlabelled cases are never taken from a patient who has a case in val, calibration or test (the Ingest
stage never places them there; this module checks again). Scoring is bounded when unlabelled cases
outnumber labelled ones (``train.ssl_unlabelled_per_labelled``: a seeded sample per fold).
Calibration and test labels never reach this module.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.train.data import SplitData, concat, subset
from pipeline.trained.nets import with_tta
from pipeline.trained.scorer import predict_logits

log = logging.getLogger(__name__)

UNLABELLED = "unlabelled"
HELD_OUT_SPLITS = ("val", "calibration", "test")
METHODS = ("pseudo_label", "mean_teacher")


def method_for(requested: str, n_unlabelled: int) -> str | None:
    """The semi-supervised method to run (None: supervised only)."""
    if requested == "off" or n_unlabelled == 0:
        return None
    return "pseudo_label" if requested == "auto" else requested


def load_unlabelled(augment_dir: Path, rows: list[dict[str, str]]) -> tuple[SplitData, int]:
    """The cached unlabelled cases usable for training, and how many were left out for leakage.

    A case is left out when its patient has any case in val, calibration or test.
    """
    held = {r["patient_id"] for r in rows if r["split"] in HELD_OUT_SPLITS}
    sel = [r for r in rows if r["split"] == UNLABELLED]
    keep = [r for r in sel if r["patient_id"] not in held]
    if not keep:
        return SplitData([], [], np.zeros((0,), np.float16), np.zeros((0,), np.int64), []), len(sel)
    x = np.stack([np.load(augment_dir / "tensors" / f"{r['case_id']}.npy", allow_pickle=False) for r in keep])
    y = np.full(len(keep), -1, dtype=np.int64)
    return SplitData([r["case_id"] for r in keep], [r["patient_id"] for r in keep], x, y, keep), len(sel) - len(keep)


def sample_unlabelled(u: SplitData, n_max: int, seed: int, fold: int) -> SplitData:
    """At most ``n_max`` unlabelled cases, a seeded hash order per fold (deterministic, resumable)."""
    if len(u) <= n_max:
        return u
    order = sorted(range(len(u)), key=lambda i: hashlib.sha256(f"{seed}:{fold}:{u.case_ids[i]}".encode()).digest())
    return subset(u, np.array(sorted(order[:n_max])))


def align(probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Distribution alignment: ``p * prior / mean(p)`` per class, rows renormalised."""
    p = np.asarray(probs, dtype=np.float64)
    ratio = np.asarray(prior, dtype=np.float64) / np.clip(p.mean(axis=0), 1e-12, None)
    q = p * ratio
    return q / q.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class PseudoLabels:
    """Selected unlabelled cases: row indices, hard labels and aligned confidences."""

    index: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray


def select_pseudo_labels(probs: np.ndarray, prior: np.ndarray, threshold: float, max_total: int) -> PseudoLabels:
    """Confident pseudo-labels after distribution alignment, split across classes by the prior.

    Args:
        probs: Teacher probabilities of the unlabelled cases, (N, K).
        prior: Labelled class frequencies, (K,), summing to 1.
        threshold: Minimum aligned confidence.
        max_total: At most this many cases in all.
    """
    q = align(probs, prior)
    conf, lab = q.max(axis=1), q.argmax(axis=1)
    chosen = []
    for k, share in enumerate(prior):
        quota = int(math.floor(max_total * share + 0.5))
        idx = np.flatnonzero((lab == k) & (conf >= threshold))
        idx = idx[np.argsort(-conf[idx], kind="stable")][:quota]
        chosen.append(idx)
    index = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return PseudoLabels(index.astype(np.int64), lab[index].astype(np.int64), conf[index])


def student_config(cfg, teacher: nn.Module, work_dir: Path, **train_update: Any):
    """The config of a student that starts from ``teacher``'s weights (saved as the warm start in
    ``work_dir``): ``ssl_student_epochs`` of the epochs, no warm-up, probe or BatchNorm re-estimation."""
    from pipeline.train.network import WARM_START_FILE

    tc = cfg.train
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save({kk: v.detach().cpu() for kk, v in teacher.state_dict().items()}, work_dir / WARM_START_FILE)
    update = {
        "epochs": max(1, math.ceil(tc.epochs * tc.ssl_student_epochs)),
        "warmup_epochs": 0,
        "probe_init": False,
        "bn_reestimate": False,
    }
    return cfg.model_copy(update={"train": tc.model_copy(update=dict(update, **train_update))})


@dataclass(frozen=True)
class StudentJob:
    """One semi-supervised student: its teacher (a supervised model), its data and where it trains.

    ``unlabelled`` is already the fold's bounded sample (:func:`sample_unlabelled`).
    """

    cfg: Any
    strategy: str
    teacher: nn.Module
    train: SplitData
    val: SplitData
    unlabelled: SplitData
    work_dir: Path
    device: torch.device
    dist: Any
    progress: bool
    fold: int = 0


def train_student(
    method: str,
    cfg,
    strategy: str,
    teacher: nn.Module,
    train: SplitData,
    val: SplitData,
    unlabelled: SplitData,
    work_dir: Path,
    device: torch.device,
    dist,
    progress: bool,
    fold: int = 0,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """A student of ``teacher`` by semi-supervised ``method`` (one of :data:`METHODS`).

    At most ``train.ssl_unlabelled_per_labelled`` unlabelled cases per labelled one are used (a seeded
    sample per fold).

    Returns:
        The student network, its training result and what the method did (counts, no ids).
    """
    tc = cfg.train
    u = sample_unlabelled(unlabelled, max(1, tc.ssl_unlabelled_per_labelled * len(train)), tc.seed, fold)
    job = StudentJob(cfg, strategy, teacher, train, val, u, work_dir, device, dist, progress, fold)
    if method == "pseudo_label":
        return self_train(job)
    if method == "mean_teacher":
        from pipeline.train.mean_teacher import train_mean_teacher

        return train_mean_teacher(job)
    raise ValueError(f"train.semi_supervised: {method!r}; expected one of {list(METHODS)}")


def self_train(job: StudentJob) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Pseudo-label the job's unlabelled cases with its teacher and fine-tune a student from it (see
    module doc).

    Returns:
        The student network, its training result and what was pseudo-labelled (counts, no ids).
    """
    from pipeline.train.loop import run_strategy

    cfg, train, u, device = job.cfg, job.train, job.unlabelled, job.device
    tc = cfg.train
    k = len(cfg.task.classes)
    scorer = with_tta(job.teacher, tc.tta, cfg.preprocess.spatial_dims)
    probs = torch.softmax(torch.from_numpy(predict_logits(scorer, u.x, device)), 1).numpy()
    prior = np.bincount(train.y, minlength=k) / max(len(train), 1)
    pl = select_pseudo_labels(probs, prior, tc.ssl_threshold, int(tc.ssl_pseudo_per_labelled * len(train)))
    info: dict[str, Any] = {
        "unlabelled_scored": len(u),
        "pseudo_labelled": int(len(pl.index)),
        "pseudo_per_class": np.bincount(pl.labels, minlength=k).astype(int).tolist(),
        "mean_confidence": float(pl.confidence.mean()) if len(pl.index) else None,
    }
    pseudo = subset(u, pl.index)
    pseudo.y = pl.labels
    scfg = student_config(cfg, job.teacher, job.work_dir)
    student, result = run_strategy(
        scfg, job.strategy, concat(train, pseudo) if len(pseudo) else train, job.val, job.work_dir, device,
        job.dist, job.progress,
    )
    log.info(
        "FineTune semi-supervised (fold %d): %d of %d unlabelled cases pseudo-labelled %s",
        job.fold, info["pseudo_labelled"], len(u), info["pseudo_per_class"],
    )
    return student, result, info


def harm_guard(
    y: np.ndarray,
    p_supervised: np.ndarray,
    p_semi: np.ndarray,
    patients: list[str] | np.ndarray,
    positive_index: int | None,
    n_bootstrap: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Paired comparison on the same held-out cases: semi-supervised minus supervised AUROC with its CI.

    ``use_semi`` is False only when the whole CI lies below 0 (evidence of harm).
    """
    from pipeline.stats.bootstrap import Bootstrap, percentile_ci, score_auroc_stat

    y = np.asarray(y, dtype=np.int64)
    bs = Bootstrap(len(y), n_bootstrap, seed=seed, clusters=np.asarray(patients), ci_level=level)
    a, b = score_auroc_stat(p_semi, y, positive_index), score_auroc_stat(p_supervised, y, positive_index)
    ones = np.ones((1, len(y)))
    diff = float(a(ones)[0] - b(ones)[0])
    samples = bs.run({"d": lambda w: a(w) - b(w)})["d"]
    lo, hi = percentile_ci(samples[np.isfinite(samples)], level)
    harmful = bool(np.isfinite(hi) and hi < 0)
    return {
        "auroc_supervised": float(b(ones)[0]),
        "auroc_semi_supervised": float(a(ones)[0]),
        "difference": diff,
        "ci": [lo, hi],
        "ci_level": level,
        "ci_method": "patient_cluster_bootstrap" if bs.clustered else "bootstrap",
        "use_semi_supervised": not harmful,
        "decision": "fell back to supervised: the CI of the difference lies below 0"
        if harmful
        else "semi-supervised kept: no evidence of harm",
    }
