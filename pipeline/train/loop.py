"""Fine-tuning: strategies (``auto`` picks among candidates), k-fold ensembles with out-of-fold predictions,
and the trained-model artefact written at the end (:mod:`pipeline.trained.artefact`).

The epochs themselves are :func:`pipeline.train.epochs.train_epochs`; the starting network is
:func:`pipeline.train.network.build_model`.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.augment.stage import read_index
from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import write_bytes, write_json
from pipeline.train.data import SplitData, concat, label_subset, load_split, patient_folds, subset
from pipeline.train.epochs import DistInfo, ExtraLoss, save_state_dict, train_epochs, write_history
from pipeline.train.network import WARM_START_FILE, build_model, warm_start_into
from pipeline.train.semi import harm_guard, load_unlabelled, method_for, train_student
from pipeline.train.strategies import CHEAPEST_FIRST, fit_linear_probe, pick_candidate, reestimate_bn
from pipeline.train.validation import multilabel_training, val_score
from pipeline.trained.artefact import save_model, weights_provenance
from pipeline.trained.device import select_device
from pipeline.trained.nets import FoldEnsemble, with_tta
from pipeline.trained.scorer import predict_logits

__all__ = ["OOF_FILE", "WARM_START_FILE", "load_oof", "model_info", "run_finetune", "run_strategy"]

log = logging.getLogger(__name__)

OOF_FILE = "oof_predictions.npz"


def run_strategy(
    cfg: Config,
    strategy: str,
    train: SplitData,
    val: SplitData,
    work_dir: Path,
    device: torch.device,
    dist: DistInfo | None = None,
    progress: bool = False,
    extra_loss: ExtraLoss | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build a fresh network and train it with one strategy; resumable through ``work_dir``.

    A finished strategy leaves ``work_dir/result.json`` and ``best.pt``; calling again returns them without
    training (``auto`` and k-fold runs resume candidate by candidate). ``extra_loss`` goes to
    :func:`~pipeline.train.epochs.train_epochs` (semi-supervised consistency).

    Returns:
        The trained network (best weights, on ``device``) and its result: ``strategy``, ``val_auroc``
        (NaN-safe score used for selection), ``seconds``, ``epochs_run``, ``best_epoch``, ``history``, ...
    """
    dist = dist or DistInfo()
    tc = cfg.train
    num_classes = len(cfg.task.classes)
    pretrained = cfg.model.pretrained and strategy != "scratch"
    torch.manual_seed(tc.seed)
    in_chans = int(train.x.shape[1]) if train.x.ndim > 2 else 1  # (N, C, ...): the Augment stage's channels
    model = build_model(cfg, num_classes, pretrained=pretrained, seed=tc.seed, in_chans=in_chans)
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
            save_state_dict(model, work_dir / "best.pt")
            write_history(work_dir / "history.csv", history)
    else:
        if tc.probe_init and pretrained and not (work_dir / "last.pt").exists():
            probe = fit_linear_probe(
                model, train.x, train.y, val.x, val.y, tc, num_classes, cfg.task.positive_index, device
            )
            result["probe_init"] = probe.to_dict()
        out = train_epochs(cfg, model, strategy, train, val, work_dir, device, dist, progress, extra_loss)
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
    candidates, semi_setting = multilabel_training(cfg, log)
    rows = read_index(augment_dir)
    num_classes = len(cfg.task.classes)
    n_findings = num_classes if cfg.task.multilabel else None
    train = label_subset(load_split(augment_dir, rows, "train", n_findings), tc.label_fraction, tc.seed)
    val = load_split(augment_dir, rows, "val", n_findings)
    if len(train) == 0 or len(val) == 0:
        raise MedtlError(
            f"FineTune: train ({len(train)}) and val ({len(val)}) splits must both hold labelled cases",
            code="no_labelled_cases",
        )
    unlabelled, left_out = load_unlabelled(augment_dir, rows)
    semi = SemiPlan(method_for(semi_setting, len(unlabelled)), unlabelled, left_out)
    t_start = time.perf_counter()
    selection = None
    folds_info = None
    if tc.folds > 1:
        model, result, folds_info = _run_folds(cfg, train, val, work_dir, device, dist, progress, semi)
    elif tc.strategy == "auto":
        results: dict[str, dict[str, Any]] = {}
        models: dict[str, nn.Module] = {}
        for name in sorted(candidates, key=CHEAPEST_FIRST.index):
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
    if semi.method and tc.folds == 1:
        model, result = _semi_single(cfg, model, result, train, val, work_dir, device, dist, progress, semi)

    counts = train.ym.sum(axis=0) if train.ym is not None else np.bincount(train.y, minlength=num_classes)
    history = result["history"]
    provenance = weights_provenance(model) if result.get("pretrained", cfg.model.pretrained) else None
    summary = {
        "schema_version": 2,
        "strategy": result["strategy"],
        "strategy_requested": tc.strategy,
        "strategy_selection": selection,
        "folds": folds_info,
        "backbone": cfg.model.backbone,
        "pretrained": result.get("pretrained", cfg.model.pretrained),
        "weights": _first(provenance),
        "weights_per_member": provenance,
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
        "mixup_alpha": tc.mixup_alpha,
        "bn_reestimated_layers": result.get("bn_reestimated_layers"),
        "train_cases": len(train),
        "train_class_counts": counts.astype(int).tolist(),
        "label_fraction": tc.label_fraction,
        "val_cases": len(val),
        "semi_supervised": semi.summary(),
        "seconds_this_session": time.perf_counter() - t_start,
        "seconds_training": result.get("seconds"),
        "mean_images_per_s": float(np.mean([h["images_per_s"] for h in history])) if history else None,
    }
    oof = folds_info.pop("_oof") if folds_info else None
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        info = model_info(cfg, num_classes, _preprocessing(augment_dir))
        info["strategy"] = result["strategy"]
        info["pretrained_weights"] = provenance
        if folds_info:
            info["ensemble"] = {"folds": tc.folds, "combine": "mean_probability"}
            _save_oof(out_dir / OOF_FILE, *oof)
        save_model(out_dir, model, info)
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


def _probs(cfg, model: nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    """Probabilities with the run's TTA: softmax, or per-finding sigmoids (multilabel)."""
    m_tta = with_tta(model, cfg.train.tta, cfg.preprocess.spatial_dims, cfg.task.multilabel)
    z = torch.from_numpy(predict_logits(m_tta, x, device))
    return (torch.sigmoid(z) if cfg.task.multilabel else torch.softmax(z, 1)).numpy()


def _oof_logits(oof: np.ndarray, multilabel: bool) -> np.ndarray:
    """Out-of-fold probabilities as logits the scorer's activation maps back (log, or logit per finding)."""
    if multilabel:
        p = np.clip(oof, 1e-12, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)
    return np.log(np.clip(oof, 1e-12, None))


def _run_folds(cfg, train, val, work_dir, device, dist, progress, semi: SemiPlan | None = None):
    """K-fold cross-validation over train+val patients; returns the ensemble, its result and per-fold info.

    With unlabelled cases (``semi.method``), each fold's supervised model is the teacher of a
    semi-supervised student (:func:`pipeline.train.semi.train_student`); the students replace the teachers
    unless the out-of-fold comparison shows harm.
    """
    tc = cfg.train
    semi = semi or SemiPlan(None)
    pool = concat(train, val)
    fold = patient_folds(pool, tc.folds, tc.seed)
    members, per_fold, history = [], [], []
    students, oof_semi = [], np.full((len(pool), len(cfg.task.classes)), np.nan)
    oof = np.full((len(pool), len(cfg.task.classes)), np.nan)
    for k in range(tc.folds):
        tr, va = subset(pool, np.flatnonzero(fold != k)), subset(pool, np.flatnonzero(fold == k))
        m, r = run_strategy(cfg, tc.strategy, tr, va, work_dir / f"fold{k}", device, dist, progress)
        oof[fold == k] = _probs(cfg, m, va.x, device)
        if semi.method:
            s, _, s_info = train_student(
                semi.method, cfg, tc.strategy, m, tr, va, semi.unlabelled, work_dir / f"fold{k}-semi", device,
                dist, progress, k,
            )
            oof_semi[fold == k] = _probs(cfg, s, va.x, device)
            students.append(s)
            semi.per_fold.append(dict(s_info, fold=k))
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
    if semi.method:
        semi.guard = harm_guard(
            pool.y, oof, oof_semi, pool.patients, cfg.task.positive_index, seed=tc.seed
        )
        if semi.guard["use_semi_supervised"]:
            members, oof = students, oof_semi
    oof_score = val_score(pool.targets, oof, cfg.task.positive_index)
    ensemble = FoldEnsemble(members, cfg.task.multilabel).to(device)
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
        "_oof": (list(pool.case_ids), _oof_logits(oof, cfg.task.multilabel)),
    }
    return ensemble, result, info




class SemiPlan:
    """Unlabelled cases available to a training run, and what semi-supervised training did with them."""

    def __init__(self, method: str | None, unlabelled: SplitData | None = None, left_out: int = 0) -> None:
        self.method = method
        self.unlabelled = unlabelled
        self.left_out = left_out
        self.per_fold: list[dict[str, Any]] = []
        self.guard: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        n = 0 if self.unlabelled is None else len(self.unlabelled)
        return {
            "method": self.method or "off",
            "unlabelled_available": n,
            "unlabelled_left_out": self.left_out,
            "left_out_reason": "patient has a case in val, calibration or test",
            "per_fold": self.per_fold,
            "harm_guard": self.guard,
            "used": bool(self.guard and self.guard["use_semi_supervised"]),
        }


def _semi_single(cfg, model, result, train, val, work_dir, device, dist, progress, semi: SemiPlan):
    """Semi-supervised student of a single model: teacher and student compared on the validation cases."""
    student, s_result, info = train_student(
        semi.method, cfg, result["strategy"], model, train, val, semi.unlabelled, work_dir / "semi", device,
        dist, progress,
    )
    semi.per_fold.append(dict(info, fold=None))
    semi.guard = harm_guard(
        val.y,
        _probs(cfg, model, val.x, device),
        _probs(cfg, student, val.x, device),
        val.patients,
        cfg.task.positive_index,
        seed=cfg.train.seed,
    )
    if semi.guard["use_semi_supervised"]:
        return student, dict(s_result, history=result["history"] + s_result["history"])
    return model, result


def _first(provenance: list[dict[str, Any] | None] | None) -> dict[str, Any] | None:
    return next((p for p in provenance or [] if p), None)


def _preprocessing(augment_dir: Path) -> dict[str, Any]:
    """The deterministic preprocessing the model was trained on (``transform_spec.json``)."""
    return json.loads((Path(augment_dir) / "transform_spec.json").read_text())["deterministic"]


def model_info(cfg: Config, num_classes: int, preprocessing: dict[str, Any]) -> dict[str, Any]:
    """What is needed to rebuild the network and feed it (no data, no identifiers); see
    :mod:`pipeline.trained.artefact`."""
    return {
        "backbone": cfg.model.backbone,
        "num_classes": num_classes,
        "in_chans": int(preprocessing.get("channels", 1)),
        "spatial_dims": cfg.preprocess.spatial_dims,
        "image_size": cfg.preprocess.image_size,
        "class_names": cfg.task.class_names,
        "positive_class": cfg.task.positive_class,
        "task": cfg.task.kind,
        "kind": cfg.task.kind,
        # multilabel: one sigmoid output per finding, in this order (the classes are the findings)
        "findings": cfg.task.class_names if cfg.task.multilabel else None,
        "tta": cfg.train.tta,
        "preprocessing": preprocessing,
    }


