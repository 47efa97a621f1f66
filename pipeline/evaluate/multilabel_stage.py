"""The Evaluate stage of a multilabel task (``task.kind: multilabel``): predictions with the sigmoid path,
per-finding calibration and metrics (:mod:`pipeline.evaluate.multilabel`), ``predictions.csv`` with one
probability column per finding, ``metrics.json`` and ``calibrator.json``.

What is not adapted to findings that co-occur is skipped, and ``metrics.json`` says why
(``not_adapted``: feature -> sentence; the report prints them): conformal prediction sets, the model
comparison (``evaluate.compare_with``), the TRIPOD+AI / CLAIM statistics that assume one
label per case and Grad-CAM. The locked promotion holdout is left out of the reported test split as for
single-label tasks (usable when every finding has positive and negative cases in it).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from pipeline.config import Config
from pipeline.evaluate.multilabel import CONFORMAL_SKIPPED, binary_split, evaluate_multilabel, finding_task
from pipeline.evaluate.stage import (
    Evaluation,
    add_val_operating_points,
    collect_predictions,
    eval_options,
    exclude_promotion_holdout,
    run_block,
)
from pipeline.io import write_json, write_text
from pipeline.trained.artefact import save_calibrator

__all__ = ["NOT_ADAPTED", "run_evaluate_multilabel"]

#: Features skipped for multilabel tasks, with the sentence the report prints.
NOT_ADAPTED = {
    "conformal": CONFORMAL_SKIPPED,
    "comparison": "the comparison with a previous model (evaluate.compare_with) is not adapted to multilabel "
    "tasks and was skipped",
    "reporting": "the TRIPOD+AI / CLAIM statistics (sample size, participants, subgroup differences, site "
    "heterogeneity, error analysis) assume one label per case and were not computed",
    "explanations": "Grad-CAM maps are not drawn for multilabel tasks (one map per finding is not implemented)",
}


def run_evaluate_multilabel(cfg: Config, plan, out_dir: Path) -> Evaluation:
    """Evaluate a multilabel FineTune model; write ``metrics.json``, ``predictions.csv``, ``calibrator.json``.

    Returns:
        The :class:`pipeline.evaluate.stage.Evaluation` the report is built from (probabilities ``(N, F)``).
    """
    import torch

    torch.manual_seed(cfg.train.seed)
    names = cfg.task.class_names
    kept: dict[str, Any] = {}
    preds = collect_predictions(cfg, Path(plan.augment), Path(plan.finetune), keep=kept)
    holdout = exclude_promotion_holdout(cfg, Path(plan.workspace), preds, kept)
    result = evaluate_multilabel(preds, names, eval_options(cfg), seed=cfg.train.seed)
    metrics = dict(result.metrics)
    for j, name in enumerate(names):  # val figures of every finding's operating points
        add_val_operating_points(
            metrics["per_finding"][name],
            {s: binary_split(sp, j) for s, sp in preds.items()},
            {s: np.column_stack([1 - p[:, j], p[:, j]]) for s, p in result.calibrated.items()},
            finding_task(name),
            cfg.evaluate.ci_level,
        )
    skipped = dict(NOT_ADAPTED)
    if cfg.evaluate.compare_with is None:
        skipped.pop("comparison")
    if cfg.evaluate.explain_cases <= 0:
        skipped.pop("explanations")
    metrics["not_adapted"] = skipped
    metrics["promotion_holdout"] = holdout
    metrics["run"] = run_block(cfg, plan)
    metrics["headline"] = headline(metrics)
    _write_predictions(out_dir / "predictions.csv", preds, result.calibrated, names)
    write_json(out_dir / "metrics.json", metrics)
    cal = preds.get("calibration")
    save_calibrator(
        out_dir,
        result.calibrator,
        kept["scorer"].model.files,
        {"split": "calibration", "n_cases": 0 if cal is None else len(cal.y)},
        conformal=None,
    )
    raw = {s: expit(sp.logits) for s, sp in preds.items()}
    return Evaluation(metrics, preds, raw, result.calibrated, [])


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Key test figures for run records: the macro AUROC over findings (as ``auroc_*``, the key every
    run record reads) and the mean Brier score, uncalibrated and calibrated."""
    test = metrics.get("evaluation", {}).get("test", {})
    out: dict[str, Any] = {}
    for block in ("uncalibrated", "calibrated"):
        b = test.get(block) or {}
        for section, key, as_key in (
            ("discrimination", "macro_auroc", "auroc"),
            ("calibration", "brier", "brier"),
        ):
            value = b.get(section, {}).get(key)
            if isinstance(value, dict):
                out[f"{as_key}_{block}"] = {"value": value.get("value"), "ci": value.get("ci"), "macro": True}
    return out


def _write_predictions(
    path: Path, preds: dict[str, Any], calibrated: dict[str, np.ndarray], names: list[str]
) -> None:
    """One row per case: pseudonymous ids, split, the finding labels and raw and calibrated probabilities."""
    buf = io.StringIO()
    cols = ["case_id", "patient_id", "split"] + [f"y_{n}" for n in names]
    cols += [f"p_raw_{n}" for n in names] + [f"p_cal_{n}" for n in names]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for split, sp in preds.items():
        raw = expit(sp.logits)
        cal = calibrated.get(split, raw)
        for i in range(len(sp.y)):
            w.writerow(
                [sp.case[i], sp.patient[i], split]
                + [int(v) for v in sp.y[i]]
                + [f"{v:.6f}" for v in raw[i]]
                + [f"{v:.6f}" for v in cal[i]]
            )
    write_text(path, buf.getvalue())
