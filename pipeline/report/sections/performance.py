"""Discrimination and calibration on the test split: tables before and after calibration, confusion
matrix, ROC curve, reliability diagrams and the probability histogram."""

from __future__ import annotations

from pipeline.report import plots
from pipeline.report.document import Doc, fmt, metric_rows, nice
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
    level = f"{100 * metrics.get('options', {}).get('ci_level', 0.95):.0f}%"
    doc.h("Discrimination and calibration on the test split")
    doc.p(
        f"Every figure is given before and after post-hoc calibration ({method}), with {level} CIs by "
        f"{'patient-cluster' if test.get('ci_resampling') == 'patient_cluster' else 'case'} resampling "
        "(AUROC: DeLong). Rules at a fixed threshold use 'positive if p >= 0.5' (binary) or the arg-max."
    )
    for title, bu, bc in (("Discrimination", d_unc, d_cal), ("Calibration", c_unc, c_cal)):
        rows = []
        flat_u, flat_c = dict(metric_rows(bu)), dict(metric_rows(bc))
        for name in dict.fromkeys(list(flat_u) + list(flat_c)):
            rows.append([nice(name), fmt(flat_u.get(name)), fmt(flat_c.get(name)) if bc else "n/a"])
        if rows:
            doc.p(f"{title}, test split ({d_unc.get('n', '?')} cases):")
            doc.table(["metric", "uncalibrated", f"calibrated ({method})"], rows)
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
        params = ", ".join(
            f"{k} = {fmt(v)}" for k, v in (calinfo.get("parameters") or {}).items() if not isinstance(v, dict)
        )
        doc.p(
            f"Calibration: {method} fitted on the calibration split only ({calinfo.get('n_cases', '?')} cases)"
            + (f"; {params}" if params else "")
            + (f"; {calinfo['reason']}" if calinfo.get("reason") else "")
            + ". "
            "Ideal values: ECE and MCE 0, calibration intercept 0, slope 1 (slope < 1: over-confident)."
        )
        for w in calinfo.get("warnings", []):
            doc.warn(f"Calibration: {w}")
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
                plots.to_png(plots.reliability_figure(rel_u, rel_c or None, xlabel)),
                ("" if rel_c else "No calibrator applied: uncalibrated probabilities only. ")
                + f"Reliability diagrams, test split ({c_unc.get('n_bins', cfg.evaluate.ece_bins)} equal-width bins; "
                "numbers are bin counts; bars are 95% Wilson intervals). Points on the diagonal are well calibrated.",
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
            "overlays show the preprocessed pixels, so review them before sharing this report outside the team."
        )
    for e in explanations:
        doc.fig("gradcam", plots.to_png(plots.explanation_figure(e.images, e.cams, e.cases)), e.caption)
