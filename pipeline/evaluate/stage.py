"""The Evaluate stage: predictions, calibration, metrics with CIs, and the exported report.

Predictions of the best checkpoint are computed for the val, calibration and test splits (deterministic
preprocessing only). The calibrator is fitted on the calibration split only; thresholds are chosen on the
validation split with calibrated probabilities; everything is reported on the test split
(:func:`pipeline.evaluate.summary.evaluate_run`). Outputs: ``predictions.csv`` (pseudonymous case and
patient ids), ``metrics.json`` (schema in ``docs/metrics_schema.md``), ``report.html`` (self-contained),
``report.pdf``, ``model_card.md``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.augment.stage import read_index
from pipeline.config import Config
from pipeline.evaluate.reporting import reporting_items
from pipeline.io import write_json, write_text
from pipeline.train.data import load_split
from pipeline.train.loop import load_oof
from pipeline.trained.artefact import TrainedModel, save_calibrator
from pipeline.trained.scorer import Scorer

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "calibration", "test")
SUBGROUP_COLUMNS = ("sex", "age_band", "manufacturer", "modality")


def collect_predictions(
    cfg: Config, augment_dir: Path, finetune_dir: Path, keep: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Logits and metadata of every evaluated split, as ``SplitPredictions``.

    Args:
        cfg: The run config.
        augment_dir: The Augment stage folder (cached tensors).
        finetune_dir: The FineTune stage folder (``model.pt``).
        keep: If given, receives ``scorer`` (:class:`pipeline.trained.scorer.Scorer`) and ``test_x`` (test
            tensors, (N, C, H, W) or (N, C, D, H, W)) for explanations and model comparison.
    """
    from pipeline.evaluate.summary import SplitPredictions

    scorer = Scorer(TrainedModel.load(finetune_dir), cfg.train.device)
    if keep is not None:
        keep["scorer"] = scorer
    oof = load_oof(finetune_dir)
    rows = read_index(augment_dir)
    group_cols = [c for c in SUBGROUP_COLUMNS if any(r.get(c) for r in rows)]
    group_cols += [c for c in (rows[0] if rows else {}) if c.startswith("group_")]
    n_findings = len(cfg.task.classes) if cfg.task.multilabel else None
    out = {}
    for split in EVAL_SPLITS:
        data = load_split(augment_dir, rows, split, n_findings)
        if len(data) == 0:
            continue
        logits = scorer.logits(data.x)
        if split == "val" and oof is not None:
            # A k-fold ensemble trained on the validation cases: use each case's out-of-fold prediction
            # (the fold model that did not see it), so thresholds chosen on val are not in-sample.
            logits = np.stack([oof[c] if c in oof else lg for c, lg in zip(data.case_ids, logits, strict=True)])
        if keep is not None and split == "test":
            keep["test_x"] = data.x
        groups = {
            c.removeprefix("group_"): np.array([r.get(c) or "unknown" for r in data.rows]) for c in group_cols
        }
        out[split] = SplitPredictions(
            logits=logits.astype(np.float64),
            y=data.targets.astype(np.int64),  # multilabel: (N, F) finding vectors
            patient=np.array(data.patients),
            case=np.array(data.case_ids),
            groups=groups,
        )
    return out


def exclude_promotion_holdout(
    cfg: Config, workspace: Path, preds: dict[str, Any], kept: dict[str, Any]
) -> dict[str, Any]:
    """Leave the locked promotion holdout out of the test split reported here (in place).

    The holdout (``ops.promotion.holdout_fraction`` of the test patients, by keyed hash) serves promotion
    decisions only. When it is too small to be used (see :func:`pipeline.ingest.splits.usable_holdout`),
    promotion uses the whole test split and nothing is left out here either.

    Returns:
        What was done, for ``metrics.json`` (``promotion_holdout``) and the report.
    """
    from pipeline.evaluate.summary import SplitPredictions
    from pipeline.ingest.deid import load_or_create_key
    from pipeline.ingest.splits import every_class, usable_holdout

    policy = cfg.ops.promotion
    info: dict[str, Any] = {"fraction": policy.holdout_fraction, "excluded_cases": 0, "excluded_patients": 0}
    sp = preds.get("test")
    if sp is None or policy.holdout_fraction <= 0:
        info["note"] = "no locked holdout: promotion decisions use the whole test split"
        return info
    key = load_or_create_key(workspace / "private", cfg.deid.key_env)
    n_classes = len(cfg.task.classes)
    y = np.asarray(sp.y)
    if y.ndim == 2:  # multilabel: every finding both ways, in the holdout and in what is reported
        n_classes = y.shape[1]
    mask = usable_holdout(sp.patient, y, n_classes, key, policy.holdout_fraction, policy.min_holdout_cases)
    if mask is None or not (every_class(y[~mask], n_classes) if y.ndim == 2 else len(np.unique(y[~mask])) >= 2):
        info["note"] = (
            "the locked holdout is too small to be used (promotion decisions use the whole test split), so "
            "the whole test split is reported"
        )
        return info
    keep = ~mask
    preds["test"] = SplitPredictions(
        logits=sp.logits[keep],
        y=sp.y[keep],
        patient=sp.patient[keep],
        case=sp.case[keep],
        groups={k: v[keep] for k, v in sp.groups.items()},
    )
    if "test_x" in kept:
        kept["test_x"] = kept["test_x"][keep]
    info.update(
        excluded_cases=int(mask.sum()),
        excluded_patients=len(set(sp.patient[mask].tolist())),
        reported_cases=int(keep.sum()),
        note=(
            f"{int(mask.sum())} test cases of {len(set(sp.patient[mask].tolist()))} patients form the locked "
            "promotion holdout: they are used only for champion/challenger decisions and are not in the test "
            "metrics of this report"
        ),
    )
    return info


@dataclass(frozen=True)
class Evaluation:
    """What the report is built from: the metrics, the predictions and the explanation figures."""

    metrics: dict[str, Any]
    preds: dict[str, Any]
    raw: dict[str, np.ndarray]
    calibrated: dict[str, np.ndarray]
    explanations: list  # pipeline.evaluate.gradcam.Explanation


def run_evaluate(cfg: Config, plan, out_dir: Path) -> Evaluation:
    """Evaluate the FineTune stage's model; write ``metrics.json``, ``predictions.csv``, ``calibrator.json``.

    The report is written by the caller from the returned :class:`Evaluation`
    (:func:`pipeline.report.render.write_reports`): evaluate never imports report.

    Args:
        cfg: The run config.
        plan: The :class:`pipeline.workspace.StagePlan` of the run.
        out_dir: Folder receiving the outputs (published atomically by the caller).
    """
    import torch

    from pipeline.evaluate.summary import TaskInfo, evaluate_run

    if cfg.task.multilabel:
        from pipeline.evaluate.multilabel_stage import run_evaluate_multilabel

        return run_evaluate_multilabel(cfg, plan, out_dir)
    torch.manual_seed(cfg.train.seed)
    kept: dict[str, Any] = {}
    preds = collect_predictions(cfg, Path(plan.augment), Path(plan.finetune), keep=kept)
    holdout = exclude_promotion_holdout(cfg, Path(plan.workspace), preds, kept)
    task = TaskInfo(
        kind=cfg.task.kind, class_names=cfg.task.class_names, positive_index=cfg.task.positive_index
    )
    options = eval_options(cfg)
    result = evaluate_run(preds, task, options, seed=cfg.train.seed)
    metrics = dict(result.metrics)
    metrics["promotion_holdout"] = holdout
    add_val_operating_points(metrics, preds, result.calibrated, task, cfg.evaluate.ci_level)
    metrics["run"] = run_block(cfg, plan)
    if cfg.evaluate.compare_with is not None:
        metrics["comparison"] = compare_with_previous(cfg, preds, kept)
    if cfg.evaluate.study_label_fractions:
        from pipeline.evaluate.study import collect_study

        metrics["study"] = collect_study(cfg, plan)
    metrics["reporting"] = reporting_items(cfg, preds, result.calibrated, metrics, Path(plan.augment))
    metrics["headline"] = headline(metrics)
    explanations = explain(cfg, preds, result.calibrated, kept)
    _write_predictions(out_dir / "predictions.csv", preds, result.calibrated, cfg.task.class_names)
    write_json(out_dir / "metrics.json", metrics)
    _save_calibrator(cfg, out_dir, result.calibrator, kept["scorer"].model, preds)
    raw = {s: softmax(sp.logits, axis=1) for s, sp in preds.items()}
    return Evaluation(metrics, preds, raw, result.calibrated, explanations)


def eval_options(cfg: Config):
    """The ``evaluate`` config section as :class:`pipeline.evaluate.summary.EvalOptions`."""
    from pipeline.evaluate.summary import EvalOptions

    return EvalOptions(
        calibration=cfg.evaluate.calibration,
        n_bootstrap=cfg.evaluate.n_bootstrap,
        ci_level=cfg.evaluate.ci_level,
        ece_bins=cfg.evaluate.ece_bins,
        conformal_alpha=cfg.evaluate.conformal_alpha,
        min_subgroup=cfg.evaluate.min_subgroup,
    )


def _save_calibrator(cfg: Config, out_dir: Path, calibrator, model: TrainedModel, preds: dict[str, Any]) -> None:
    """``calibrator.json``: the calibrator fitted here and the LAC conformal thresholds (marginal and per
    class), bound to the model's sha256. ``None`` stands for an infinite threshold (too few cases)."""
    from pipeline.evaluate.conformal import SplitConformal

    cal = preds.get("calibration")
    n = 0 if cal is None else len(cal.y)
    conformal = None
    alpha = cfg.evaluate.conformal_alpha
    if cal is not None and alpha is not None and n:
        probs, y = softmax(cal.logits, axis=1), np.asarray(cal.y, dtype=np.int64)
        cp = SplitConformal(alpha, "lac").fit(probs, y)
        mondrian = SplitConformal(alpha, "lac", class_conditional=True).fit(probs, y)
        conformal = {
            "method": "lac",
            "alpha": alpha,
            "qhat": _finite_or_none(cp.qhat_),
            "class_qhat": [_finite_or_none(q) for q in mondrian.class_qhat_],
            "n_calibration": n,
        }
    save_calibrator(
        out_dir, calibrator, model.files, {"split": "calibration", "n_cases": n}, conformal=conformal
    )


def _finite_or_none(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A few key test figures for run records and notifications."""
    test = metrics.get("evaluation", {}).get("test", {})
    out: dict[str, Any] = {}
    for block in ("uncalibrated", "calibrated"):
        b = test.get(block) or {}
        for section, key in (("discrimination", "auroc"), ("calibration", "ece"), ("calibration", "brier")):
            value = b.get(section, {}).get(key)
            if isinstance(value, dict):
                out[f"{key}_{block}"] = {"value": value.get("value"), "ci": value.get("ci")}
    return out


def _write_predictions(
    path: Path, preds: dict[str, Any], calibrated: dict[str, np.ndarray], names: list[str]
) -> None:
    buf = io.StringIO()
    cols = ["case_id", "patient_id", "split", "label_index"]
    cols += [f"p_raw_{n}" for n in names] + [f"p_cal_{n}" for n in names]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for split, sp in preds.items():
        raw = softmax(sp.logits, axis=1)
        cal = calibrated.get(split, raw)
        for i in range(len(sp.y)):
            w.writerow(
                [sp.case[i], sp.patient[i], split, int(sp.y[i])]
                + [f"{v:.6f}" for v in raw[i]]
                + [f"{v:.6f}" for v in cal[i]]
            )
    write_text(path, buf.getvalue())


def load_metrics(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / "metrics.json").read_text())


def run_block(cfg: Config, plan: Any) -> dict[str, Any]:
    """``metrics["run"]``: the run's name, data snapshot, stage folders and public config (an earlier run
    to compare with is named by its folder only)."""
    block = {
        "name": cfg.name,
        "data_snapshot": plan.snapshot,
        "stages": {s: Path(getattr(plan, s)).name for s in ("ingest", "augment", "finetune", "evaluate")},
        "config": cfg.public_dict(),
    }
    if cfg.evaluate.compare_with is not None:
        block["config"]["evaluate"]["compare_with"] = Path(cfg.evaluate.compare_with).name
    return block


def add_val_operating_points(
    metrics: dict[str, Any], preds: dict[str, Any], calibrated: dict[str, np.ndarray], task, level: float
) -> None:
    """Add ``val`` (same fields as ``test``) to every operating point: how the rule did where it was chosen.

    Binary tasks only; the val figures use the same variant's probabilities as the threshold choice.
    """
    if task.kind != "binary" or "val" not in preds:
        return
    from pipeline.evaluate.operating_points import apply_threshold

    sp = preds["val"]
    y_pos = np.asarray(sp.y) == task.positive_index
    raw = softmax(sp.logits, axis=1)
    test = metrics.get("evaluation", {}).get("test", {})
    for variant, probs in (("uncalibrated", raw), ("calibrated", calibrated.get("val"))):
        ops = (test.get(variant) or {}).get("operating_points") or {}
        if probs is None:
            continue
        for op in ops.values():
            if isinstance(op, dict) and isinstance(op.get("threshold"), (int, float)):
                op["val"] = apply_threshold(
                    probs[:, task.positive_index], y_pos, float(op["threshold"]), level=level
                )


def _resolve_compare_path(cfg: Config) -> Path:
    p = Path(cfg.evaluate.compare_with).expanduser()
    if not p.is_absolute() and cfg.source_path is not None:
        p = Path(cfg.source_path).parent / p
    return p


def compare_with_previous(cfg: Config, preds: dict[str, Any], kept: dict[str, Any]) -> dict[str, Any]:
    """The ``comparison`` block: this model against ``evaluate.compare_with`` on the matched test cases."""
    from pipeline.evaluate.compare import compare_models, load_previous

    sp = preds["test"]
    names = cfg.task.class_names
    previous = load_previous(
        _resolve_compare_path(cfg),
        len(names),
        test_x=kept.get("test_x"),
        test_case=sp.case,
        test_y=sp.y,
        device=kept["scorer"].device if "scorer" in kept else None,
    )
    raw = softmax(sp.logits, axis=1)
    return compare_models(
        np.asarray(sp.y),
        np.asarray(sp.case),
        np.asarray(sp.patient),
        raw,
        previous,
        names,
        cfg.task.positive_index if cfg.task.kind == "binary" else None,
        n_bootstrap=cfg.evaluate.n_bootstrap,
        level=cfg.evaluate.ci_level,
        seed=cfg.train.seed,
    )


def explain(cfg: Config, preds: dict[str, Any], calibrated: dict[str, np.ndarray], kept: dict[str, Any]) -> list:
    """Grad-CAM maps (:class:`pipeline.evaluate.gradcam.Explanation`) of the most confident correct and
    wrong test cases, then of the most confident false positives and false negatives of the error analysis
    (:func:`pipeline.evaluate.reporting.error_cases`); the report draws them.

    Errors are logged and give no explanation: explanations must never fail an evaluation.
    """
    n = cfg.evaluate.explain_cases
    if n <= 0 or "test" not in preds or kept.get("test_x") is None:
        return []
    from pipeline.evaluate.gradcam import CamCase, Explanation, select_cases
    from pipeline.evaluate.reporting import error_cases

    names = cfg.task.class_names
    sp = preds["test"]
    y = np.asarray(sp.y)
    probs = calibrated.get("test", softmax(sp.logits, axis=1))
    pos = cfg.task.positive_index if cfg.task.kind == "binary" else None
    groups = [
        (
            select_cases(y, probs, list(sp.case), names, n),
            "Grad-CAM of the predicted class for the {ok} most confident correct and the {bad} most "
            "confident wrong test predictions",
        )
    ]
    errors = []
    for cname, kinds in error_cases(y, probs, names, pos, n).items():
        k = names.index(cname)
        for i in kinds["false_positives"] + kinds["false_negatives"]:
            if i in kinds["false_positives"]:
                pred = k
            else:
                pred = 1 - k if pos is not None else int(probs[i].argmax())
            errors.append(
                CamCase(int(i), str(sp.case[i]), names[int(y[i])], names[pred], float(probs[i, k]), False)
            )
    if errors:
        groups.append(
            (
                errors,
                "Error analysis: Grad-CAM of the predicted class for the most confident false positives and "
                "false negatives (the cases listed in the error analysis; probability shown is that of the "
                "class in error)",
            )
        )
    out = []
    for cases, words in groups:
        if not cases:
            continue
        cams = _grad_cam_of(cases, names, kept)
        if cams is None:
            return out
        images, maps = cams
        n_ok = sum(c.correct for c in cases)
        caption = (
            words.format(ok=n_ok, bad=len(cases) - n_ok)
            + " (preprocessed model inputs; red = regions that raised the predicted class's score; captions "
            "give pseudonymous case ids only). A heat map shows where the model looked, not why, and is no "
            "proof of clinically meaningful features."
        )
        out.append(Explanation(images, maps, cases, caption))
    return out


def _grad_cam_of(cases: list, names: list[str], kept: dict[str, Any]):
    """``(inputs, maps)`` of the predicted class of ``cases``, or None (logged) when Grad-CAM fails."""
    import torch

    from pipeline.evaluate.gradcam import grad_cam

    try:
        idx = [c.index for c in cases]
        scorer = kept["scorer"]
        x = torch.from_numpy(np.asarray(kept["test_x"][idx], dtype=np.float32)).to(scorer.device)
        pred = [names.index(c.pred_name) for c in cases]
        cams = grad_cam(scorer.explanation_network(), x, target=pred)
    except (RuntimeError, ValueError) as err:
        log.warning("Evaluate: Grad-CAM failed (%s); the report has no explanation figure", err)
        return None
    return x.cpu().numpy(), cams
