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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment.stage import read_index
from pipeline.config import Config
from pipeline.io import write_json, write_text
from pipeline.train.data import load_split
from pipeline.train.loop import load_trained_model, predict_logits, select_device

log = logging.getLogger(__name__)

EVAL_SPLITS = ("val", "calibration", "test")
SUBGROUP_COLUMNS = ("sex", "age_band", "manufacturer", "modality")


def collect_predictions(cfg: Config, augment_dir: Path, finetune_dir: Path) -> dict[str, Any]:
    """Logits and metadata of every evaluated split, as ``SplitPredictions``."""
    from pipeline.evaluate.summary import SplitPredictions

    device = select_device(cfg.train.device)
    model, _ = load_trained_model(finetune_dir, device)
    rows = read_index(augment_dir)
    group_cols = [c for c in SUBGROUP_COLUMNS if any(r.get(c) for r in rows)]
    group_cols += [c for c in (rows[0] if rows else {}) if c.startswith("group_")]
    out = {}
    for split in EVAL_SPLITS:
        data = load_split(augment_dir, rows, split)
        if len(data) == 0:
            continue
        logits = predict_logits(model, data.x, device)
        groups = {c.removeprefix("group_"): np.array([r.get(c) or "unknown" for r in data.rows]) for c in group_cols}
        out[split] = SplitPredictions(
            logits=logits.astype(np.float64),
            y=data.y,
            patient=np.array(data.patients),
            case=np.array(data.case_ids),
            groups=groups,
        )
    return out


def run_evaluate(cfg: Config, plan, out_dir: Path) -> dict[str, Any]:
    """Evaluate the FineTune stage's model and write the report into ``out_dir``.

    Args:
        cfg: The run config.
        plan: The :class:`pipeline.workspace.StagePlan` of the run.
        out_dir: Folder receiving the outputs (published atomically by the caller).

    Returns:
        The metrics dict (also ``metrics.json``).
    """
    from pipeline.evaluate.summary import EvalOptions, TaskInfo, evaluate_run
    from pipeline.report.render import write_reports

    torch.manual_seed(cfg.train.seed)
    preds = collect_predictions(cfg, Path(plan.augment), Path(plan.finetune))
    task = TaskInfo(kind=cfg.task.kind, class_names=cfg.task.class_names, positive_index=cfg.task.positive_index)
    options = EvalOptions(
        calibration=cfg.evaluate.calibration,
        n_bootstrap=cfg.evaluate.n_bootstrap,
        ci_level=cfg.evaluate.ci_level,
        ece_bins=cfg.evaluate.ece_bins,
        conformal_alpha=cfg.evaluate.conformal_alpha,
        min_subgroup=cfg.evaluate.min_subgroup,
    )
    result = evaluate_run(preds, task, options, seed=cfg.train.seed)
    metrics = dict(result.metrics)
    metrics["run"] = {
        "name": cfg.name,
        "data_snapshot": plan.snapshot,
        "stages": {s: Path(getattr(plan, s)).name for s in ("ingest", "augment", "finetune", "evaluate")},
        "config": cfg.public_dict(),
    }
    metrics["headline"] = headline(metrics)
    _write_predictions(out_dir / "predictions.csv", preds, result.calibrated, cfg.task.class_names)
    write_json(out_dir / "metrics.json", metrics)
    write_reports(cfg, plan, metrics, preds, result.calibrated, out_dir)
    log.info("Evaluate: report written (%s)", ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A few key test figures for run records and notifications."""
    test = metrics.get("evaluation", {}).get("test", {})
    out: dict[str, Any] = {}
    for block in ("uncalibrated", "calibrated"):
        b = test.get(block, {})
        for section, key in (("discrimination", "auroc"), ("calibration", "ece"), ("calibration", "brier")):
            value = b.get(section, {}).get(key)
            if isinstance(value, dict):
                out[f"{key}_{block}"] = {"value": value.get("value"), "ci": value.get("ci")}
    return out


def _write_predictions(path: Path, preds: dict[str, Any], calibrated: dict[str, np.ndarray], names: list[str]) -> None:
    buf = io.StringIO()
    cols = ["case_id", "patient_id", "split", "label_index"]
    cols += [f"p_raw_{n}" for n in names] + [f"p_cal_{n}" for n in names]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for split, sp in preds.items():
        raw = torch.softmax(torch.from_numpy(sp.logits), 1).numpy()
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
