"""Summary, data and splits, model and training sections."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.report import plots
from pipeline.report.document import TTA_WORDS, Doc, ensemble_words, fmt
from pipeline.report.sections.inputs import ReportInputs


def summary_section(doc: Doc, run: ReportInputs) -> None:
    """Key figures of the test split, the task, and the run's warnings."""
    cfg, metrics, names, pos, test = run.cfg, run.metrics, run.names, run.pos, run.test
    d_unc, d_cal = run.unc.get("discrimination", {}), run.cal.get("discrimination", {})
    c_unc, c_cal = run.unc.get("calibration", {}), run.cal.get("calibration", {})
    doc.h("Summary")
    primary = test.get("primary", "uncalibrated")
    d_pri = d_cal if primary == "calibrated" and d_cal else d_unc
    kp = [("Test cases", str(d_unc.get("n", "?")))]
    for label, block, key in (
        ("Test AUROC", d_pri, "auroc"),
        ("Test macro AUROC", d_pri, "macro_auroc"),
        ("Balanced accuracy", d_pri, "balanced_accuracy"),
        ("ECE before calibration", c_unc, "ece"),
        ("ECE after calibration", c_cal, "ece"),
        ("Brier after calibration", c_cal, "brier"),
    ):
        if key in block:
            kp.append((label, fmt(block[key])))
    doc.kpis(kp)
    doc.p(
        f"Task: {cfg.task.kind} classification of {', '.join(names)}"
        + (
            f"; positive class: {names[pos]} (sensitivity = share of {names[pos]} cases found)"
            if pos is not None
            else ""
        )
        + ". All intervals are 95% confidence intervals."
    )
    for w in metrics.get("warnings", []):
        doc.warn(w)


def data_section(doc: Doc, run: ReportInputs) -> None:
    """Inputs, cases, splits per class, what was left out and why, de-identification."""
    ingest, metrics, names = run.ingest, run.metrics, run.names
    doc.h("Data and splits")
    if ingest:
        doc.p(
            f"{ingest.get('inputs', '?')} inputs read, {ingest.get('cases', '?')} cases from "
            f"{ingest.get('patients', '?')} patients ingested. Split rule: {ingest.get('split_rule', '?')}. "
            "No patient appears in two splits."
        )
        rows = []
        for s, d in ingest.get("splits", {}).items():
            rows.append([s, d["cases"], d["patients"]] + [d["per_class"].get(n, 0) for n in names])
        doc.table(["split", "cases", "patients"] + [f"class {n}" for n in names], rows)
        holdout = metrics.get("promotion_holdout") or {}
        if holdout.get("note"):
            doc.p(f"Locked promotion holdout: {holdout['note']}.")
        probs = ingest.get("problems_by_code", {})
        if probs:
            doc.p(
                "Inputs and label rows left out, by reason (details per file in the workspace's private folder):"
            )
            examples = {}
            for pr in ingest.get("problems", []):
                examples.setdefault(pr["code"], pr["reason"])
            doc.table(
                ["reason code", "count", "example"],
                [[c, n, examples.get(c, "")[:160]] for c, n in sorted(probs.items())],
            )
        else:
            doc.p("Every input file was read and every label row matched a case.")
        review = ingest.get("pixel_review", [])
        if review:
            doc.warn(
                f"{len(review)} case(s) are ultrasound/secondary-capture images or declare burned-in annotation: "
                "their pixels may show text (names, dates) and should be reviewed before the images are shared."
            )
        doc.p(f"De-identification: {ingest.get('deidentification', '')}")


def model_section(doc: Doc, run: ReportInputs) -> None:
    """Backbone, weights, strategy, training facts, training curves and the augmentation preview."""
    cfg, train, plan = run.cfg, run.train, run.plan
    doc.h("Model and training")
    if train:
        w = train.get("weights") or {}
        doc.table(
            ["item", "value"],
            [
                ["backbone", train.get("backbone")],
                [
                    "pretrained weights",
                    f"{w.get('description', 'none (from scratch)')}" if w else "none (from scratch)",
                ],
                ["weights sha256", w.get("sha256", "n/a")],
                ["strategy", train.get("strategy")],
                ["model scored", (ensemble_words(cfg) or "one network") + TTA_WORDS[cfg.train.tta]],
                ["input", f"{cfg.preprocess.spatial_dims}D, {cfg.preprocess.image_size} px, 1 channel"],
                [
                    "training cases (per class)",
                    f"{train.get('train_cases')} {train.get('train_class_counts')}",
                ],
                ["label fraction", train.get("label_fraction")],
                [
                    "epochs run / best epoch",
                    f"{train.get('epochs_run')} / {train.get('best_epoch')} ({train.get('stopped_by')})",
                ],
                ["best validation AUROC", fmt(train.get("best_val_auroc"))],
                ["device", train.get("device")],
            ],
        )
    hist_path = Path(plan.finetune) / "history.csv"
    if hist_path.exists():
        with open(hist_path) as fh:
            history = list(csv.DictReader(fh))
        if history:
            doc.fig(
                "history", plots.to_png(plots.history_figure(history)), "Loss and validation AUROC per epoch."
            )
    preview = Path(plan.augment) / "preview.png"
    if preview.exists():
        doc.fig("augmentation", preview.read_bytes(), "Training augmentation preview (MONAI transforms).")
