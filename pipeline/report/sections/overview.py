"""Summary, data and splits, model and training sections."""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.report import plots
from pipeline.report.document import TTA_WORDS, Doc, ci_methods_sentence, ensemble_words, fmt, level_words
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
        + f". Intervals are {level_words(metrics)} confidence intervals. "
        + ci_methods_sentence(
            [run.prim.get("discrimination") or {}, run.prim.get("calibration") or {}],
            (metrics.get("options") or {}).get("n_bootstrap"),
        )
    )
    doc.p(calibration_status(metrics))
    for w in metrics.get("warnings", []):
        doc.warn(w)
    for w in ((metrics.get("reporting") or {}).get("sample_size") or {}).get("warnings") or []:
        doc.warn(f"Split too small for its use: {w.get('message')} (code {w.get('code')}).")


def calibration_status(metrics: dict) -> str:
    """One sentence on what was done to the probabilities: applied, declined (and why) or none."""
    cal = metrics.get("calibration") or {}
    applied, n = cal.get("applied", "none"), cal.get("n_cases")
    if cal.get("declined"):
        return (
            f"Calibration: {cal.get('fitted', 'the calibrator')} was fitted on the {n} calibration cases and "
            f"declined ({cal['declined']}); every probability in this report is uncalibrated."
        )
    if applied == "per_finding":  # multilabel: one binary calibrator per finding
        per = ", ".join(f"{k}: {v}" for k, v in (cal.get("per_finding") or {}).items())
        return (
            f"Calibration: per finding ({per}; none = declined or not requested), fitted on the {n} "
            "calibration cases."
        )
    if applied in (None, "none"):
        reason = cal.get("reason", "not requested")
        return f"Calibration: none applied ({reason}); probabilities are uncalibrated."
    flags = [w for w in cal.get("warnings") or [] if "declined" not in w]
    return f"Calibration: {applied} fitted on the {n} calibration cases and applied" + (
        f", flagged: {'; '.join(flags)}." if flags else "."
    )


def _inputs_sentence(inputs) -> str:
    """Every entry under the source, by category and rejection code (``ingest_report.json["inputs"]``)."""
    if not isinstance(inputs, dict):
        return f"{inputs if inputs is not None else '?'} inputs read."
    cats = ", ".join(f"{n} {k.replace('_', ' ')}(s)" for k, n in sorted((inputs.get("by_category") or {}).items()))
    rejected = inputs.get("rejected_by_code") or {}
    rej = "; not used: " + ", ".join(f"{n} {code}" for code, n in sorted(rejected.items())) if rejected else ""
    return f"{inputs.get('entries', '?')} entries under the source ({cats}){rej}."


def data_section(doc: Doc, run: ReportInputs) -> None:
    """Inputs, cases, splits per class, what was left out and why, de-identification."""
    ingest, metrics, names = run.ingest, run.metrics, run.names
    doc.h("Data and splits")
    if ingest:
        doc.p(
            f"{_inputs_sentence(ingest.get('inputs'))} {ingest.get('cases', '?')} cases from "
            f"{ingest.get('patients', '?')} patients ingested. Split rule: {ingest.get('split_rule', '?')}. "
            "No patient appears in two splits."
        )
        rows = []
        for s, d in ingest.get("splits", {}).items():
            rows.append([s, d["cases"], d["patients"]] + [d["per_class"].get(n, 0) for n in names])
        doc.table(["split", "cases", "patients"] + [f"class {n}" for n in names], rows)
        unlabelled = ingest.get("unlabelled") or {}
        if unlabelled.get("cases"):
            doc.p(
                f"{unlabelled['cases']} of these cases ({unlabelled.get('patients', '?')} patients) are "
                "unlabelled: never in validation, calibration or test, and never used for training when "
                f"their patient has a held-out case ({unlabelled.get('of_held_out_patients', 0)} such cases)."
            )
        holdout = metrics.get("promotion_holdout") or {}
        if holdout.get("note"):
            doc.p(f"Locked promotion holdout: {holdout['note']}.")
        probs = ingest.get("problems_by_code", {})
        if probs:
            doc.p(
                "Inputs and label rows left out, by reason (details per file in the workspace's private "
                "folder):"
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
                f"{len(review)} case(s) are ultrasound/secondary-capture images or declare burned-in "
                "annotation: "
                "their pixels may show text (names, dates) and should be reviewed before the images are "
                "shared."
            )
        doc.p(f"De-identification: {ingest.get('deidentification', '')}")
        pooling = ingest.get("subgroup_values") or {}
        if pooling.get("rule"):
            doc.p(f"Subgroup values: {pooling['rule']}.")


def model_section(doc: Doc, run: ReportInputs) -> None:
    """Backbone, weights, strategy, training facts, training curves and the augmentation preview."""
    cfg, train, plan = run.cfg, run.train, run.plan
    doc.h("Model and training")
    if train:
        doc.table(
            ["item", "value"],
            [
                ["backbone", train.get("backbone")],
                ["pretrained weights", weights_words(train)],
                ["weights sha256", _sha_words(train)],
                ["strategy", train.get("strategy")],
                ["model scored", (ensemble_words(cfg) or "one network") + TTA_WORDS[cfg.train.tta]],
                ["input", f"{cfg.preprocess.spatial_dims}D, {cfg.preprocess.image_size} px, 1 channel"],
                [
                    "training cases (per class)",
                    f"{train.get('train_cases')} {train.get('train_class_counts')}",
                ],
                ["label fraction", train.get("label_fraction")],
                ["epochs run / best epoch", _epochs_words(train)],
                [
                    "out-of-fold validation AUROC" if train.get("folds") else "best validation AUROC",
                    fmt(train.get("best_val_auroc")),
                ],
                ["device", train.get("device")],
            ],
        )
        members = train.get("weights_per_member") or []
        per_fold = (train.get("folds") or {}).get("per_fold") or []
        if len(members) > 1 or per_fold:
            rows = []
            for i in range(max(len(members), len(per_fold))):
                w = members[i] if i < len(members) and members[i] else {}
                f = per_fold[i] if i < len(per_fold) else {}
                rows.append(
                    [
                        f.get("fold", i),
                        w.get("path", "none (from scratch)") if w else "none (from scratch)",
                        w.get("sha256", "n/a") if w else "n/a",
                        (w.get("source", "") + (", pinned" if w.get("pinned") else ", not pinned"))
                        if w
                        else "",
                        f.get("best_epoch", ""),
                        fmt(f.get("val_auroc")) if f else "",
                    ]
                )
            doc.p("Provenance of every member's starting weights and each fold's training:")
            doc.table(["member", "weights file", "sha256", "source", "best epoch", "held-out AUROC"], rows)
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


def weights_words(train: dict) -> str:
    """The starting weights as ``train_summary.json`` records them (never "from scratch" for a pretrained "
    "run)."""
    members = [m for m in train.get("weights_per_member") or [] if m]
    w = train.get("weights") or (members[0] if members else None)
    pretrained = train.get("pretrained", bool(w))
    if not pretrained and not w:
        return "none (from scratch)"
    if not w:
        return "pretrained (provenance not recorded: file and sha256 unknown)"
    what = w.get("description") or w.get("path") or "pretrained file"
    n = len(train.get("weights_per_member") or [])
    return what + (
        f"; {n} members, each listed below" if n > 1 else f" ({w.get('path')})" if w.get("path") else ""
    )


def _sha_words(train: dict) -> str:
    members = [m for m in train.get("weights_per_member") or [] if m]
    shas = {m.get("sha256") for m in members if m.get("sha256")}
    w = train.get("weights") or {}
    if len(shas) > 1:
        return f"{len(shas)} different files (below)"
    sha = next(iter(shas), None) or w.get("sha256")
    if sha:
        return sha + (" (pinned)" if w.get("pinned") else "")
    return "not recorded" if train.get("pretrained") else "n/a (from scratch)"


def _epochs_words(train: dict) -> str:
    per_fold = (train.get("folds") or {}).get("per_fold") or []
    if per_fold:
        best = ", ".join(str(f.get("best_epoch")) for f in per_fold)
        return (
            f"{train.get('epochs_run')} over {len(per_fold)} folds / best epoch per fold: {best} "
            "(each fold stopped on its own held-out part)"
        )
    return f"{train.get('epochs_run')} / {train.get('best_epoch')} ({train.get('stopped_by')})"
