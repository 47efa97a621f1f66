"""Discrimination and calibration on the test split: tables before and after calibration, confusion
matrix, ROC curve, reliability diagrams and the probability histogram."""

from __future__ import annotations

from pipeline.report import plots
from pipeline.report.document import Doc, ci_methods_sentence, fmt, level_words, metric_rows, nice
from pipeline.report.sections.inputs import ReportInputs


def performance_section(doc: Doc, run: ReportInputs) -> None:
    """The section "Discrimination and calibration on the test split"."""
    cfg, metrics, names, pos, test, preds = run.cfg, run.metrics, run.names, run.pos, run.test, run.preds
    unc, cal = run.unc, run.cal
    d_unc, d_cal = unc.get("discrimination", {}), cal.get("discrimination", {})
    c_unc, c_cal = unc.get("calibration", {}), cal.get("calibration", {})
    calinfo = metrics.get("calibration", {})
    method = calinfo.get("applied", cfg.evaluate.calibration)
    prim = run.prim
    level = level_words(metrics)
    doc.h("Discrimination and calibration on the test split")
    doc.p(
        (
            f"Every figure is given before and after post-hoc calibration ({method}), with {level} CIs by "
            if c_cal
            else "No calibrator was applied: every figure is from the uncalibrated probabilities, with "
            f"{level} CIs by "
        )
        + f"{'patient-cluster' if test.get('ci_resampling') == 'patient_cluster' else 'case'} resampling "
        "where a bootstrap is used. "
        f"{ci_methods_sentence([d_unc, c_unc], metrics.get('options', {}).get('n_bootstrap'))} "
        "Rules at a fixed threshold use 'positive if p >= 0.5' (binary) or the arg-max."
    )
    for title, bu, bc in (("Discrimination", d_unc, d_cal), ("Calibration", c_unc, c_cal)):
        rows = []
        flat_u, flat_c = dict(metric_rows(bu)), dict(metric_rows(bc))
        for name in dict.fromkeys(list(flat_u) + list(flat_c)):
            rows.append([nice(name), fmt(flat_u.get(name))] + ([fmt(flat_c.get(name))] if bc else []))
        if rows:
            doc.p(f"{title}, test split ({d_unc.get('n', '?')} cases):")
            doc.table(["metric", "uncalibrated"] + ([f"calibrated ({method})"] if bc else []), rows)
    cm = (prim.get("discrimination") or {}).get("confusion_matrix")
    if isinstance(cm, dict) and cm.get("rows_true_cols_pred"):
        labels = cm.get("labels", names)
        doc.p(
            f"Confusion matrix, test split ({prim.get('discrimination', {}).get('prediction_rule', '')}); "
            "rows = true class, columns = predicted class:"
        )
        doc.table(
            ["true \\ predicted"] + [str(x) for x in labels],
            [[f"{lab}"] + list(r) for lab, r in zip(labels, cm["rows_true_cols_pred"], strict=False)],
        )
    if calinfo:
        calibration_paragraphs(doc, calinfo, c_unc, c_cal, method)
    if "test" in preds:
        sp = preds["test"]
        calp = run.calibrated.get("test")
        if calp is None:
            calp = run.raw_probs("test")
        auc_txt = {}
        if pos is not None and "auroc" in d_unc:
            auc_txt[names[pos]] = fmt(d_unc["auroc"])
        roc = prim.get("roc_curve")  # binary: the positive class's points; else class name -> points
        curves = {names[pos]: roc} if roc and "fpr" in roc and pos is not None else (roc or {})
        if any(curves.values()):
            doc.fig(
                "roc",
                plots.to_png(plots.roc_figure(curves, auc_txt)),
                "ROC curve of the test split.",
            )
        rel_u = (c_unc.get("reliability") or {}).get("equal_width")
        rel_c = (c_cal.get("reliability") or {}).get("equal_width")
        if rel_u:  # both panels, or the uncalibrated one when no calibrator was applied
            ref = c_unc.get("reference", "")
            xlabel = (
                "predicted probability of the positive class"
                if ref == "positive_class"
                else "confidence (top class)"
            )
            doc.fig(
                "reliability",
                plots.to_png(plots.reliability_figure(rel_u, rel_c or None, xlabel, level)),
                ("" if rel_c else "No calibrator applied: uncalibrated probabilities only. ")
                + f"Reliability diagrams, test split ({c_unc.get('n_bins', cfg.evaluate.ece_bins)} "
                "equal-width bins; "
                f"numbers are bin counts; bars are {level} Wilson intervals). Points on the diagonal are "
                "well "
                "calibrated.",
            )
        thr = {}
        for op_name, op in (prim.get("operating_points") or {}).items():
            if isinstance(op, dict) and isinstance(op.get("threshold"), (int, float)):
                thr[op_name] = float(op["threshold"])
        doc.fig(
            "histogram",
            plots.to_png(plots.histogram_figure(sp.y, calp, names, pos, thr)),
            ("Calibrated probabilities" if c_cal else "Probabilities (no calibrator applied)")
            + " per true class, test split; vertical lines are the operating points chosen on validation.",
        )


def explanations_section(doc: Doc, run: ReportInputs) -> None:
    """Grad-CAM figures (maps computed by ``pipeline.evaluate.gradcam``, drawn here), with a warning when
    pixels need review."""
    if not run.explanations:
        return
    ingest, explanations = run.ingest, run.explanations
    doc.h("Explanations (Grad-CAM)")
    if ingest.get("pixel_review"):
        doc.warn(
            "Some inputs were flagged at ingestion for possible burned-in text (see Data and splits): the "
            "overlays show the preprocessed pixels, so review them before sharing this report outside the "
            "team."
        )
    for i, e in enumerate(explanations):
        doc.fig(
            "gradcam" if i == 0 else f"gradcam-{i + 1}",
            plots.to_png(plots.explanation_figure(e.images, e.cams, e.cases)),
            e.caption,
        )


#: Calibration metrics compared before/after on test, and the direction that is better.
_HARM = ("nll", "calibration_slope", "ece", "brier")  # better: lower; the slope: closer to 1


def calibration_paragraphs(doc: Doc, calinfo: dict, c_unc: dict, c_cal: dict, method: str) -> None:
    """How the calibrator was fitted, whether it was applied, declined or flagged, and what it did on test."""
    n = calinfo.get("n_cases", "?")
    params = ", ".join(
        f"{k} = {fmt(v)}"
        for k, v in (calinfo.get("parameters") or {}).items()
        if not isinstance(v, (dict, list))
    )
    cv = calinfo.get("cross_validation") or {}
    cv_words = ""
    if cv:
        cv_words = (
            f" On {cv.get('folds')}-fold cross-validation of the calibration split the NLL went from "
            f"{fmt(cv.get('nll_uncalibrated'))} (uncalibrated) to {fmt(cv.get('nll_calibrated'))}"
            + (
                f" and the calibration slope from {fmt(cv.get('slope_uncalibrated'))} to "
                f"{fmt(cv.get('slope_calibrated'))}"
                if "slope_calibrated" in cv
                else ""
            )
            + "."
        )
    if calinfo.get("declined"):
        doc.warn(
            f"Calibration declined: {calinfo.get('fitted', 'the calibrator')} was fitted on the calibration "
            "split "
            f"({n} cases) but not applied: {calinfo['declined']}.{cv_words} The probabilities in this report "
            "are "
            "uncalibrated."
        )
    elif method in (None, "none"):
        doc.p(f"Calibration: none applied ({calinfo.get('reason', 'not requested')}).")
    else:
        doc.p(
            f"Calibration: {method} fitted on the calibration split only ({n} cases)"
            + (f"; {params}" if params else "")
            + "."
            + cv_words
            + " Ideal values: ECE and MCE 0, calibration intercept 0, slope 1 (slope < 1: over-confident)."
        )
    for w in calinfo.get("warnings", []):
        if not w.startswith("calibration declined"):
            doc.warn(f"Calibration flagged: {w}")
    if not c_cal:
        return
    worse, better = [], []
    for key in _HARM:
        u, c = (c_unc.get(key) or {}).get("value"), (c_cal.get(key) or {}).get("value")
        if not isinstance(u, (int, float)) or not isinstance(c, (int, float)):
            continue
        gain = (abs(u - 1) - abs(c - 1)) if key == "calibration_slope" else (u - c)
        words = f"{NICE_SHORT.get(key, key)} {fmt(u)} -> {fmt(c)}"
        (better if gain > 0 else worse if gain < 0 else []).append(words)
    if worse:
        doc.warn(
            f"On the test split the calibrator made some calibration figures worse ({'; '.join(worse)})"
            + (f" while improving others ({'; '.join(better)})" if better else "")
            + ": read the calibrated probabilities with care and compare both columns above."
        )
    elif better:
        doc.p(f"On the test split calibration improved every figure compared: {'; '.join(better)}.")


NICE_SHORT = {"nll": "NLL", "calibration_slope": "calibration slope", "ece": "ECE", "brier": "Brier score"}
