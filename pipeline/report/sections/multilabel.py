"""The report of a multilabel task (``task.kind: multilabel``): summary with the macro AUROC, data per
finding, model, the per-finding performance table, per-finding calibration and operating points, and the
sections of the single-label report that do not apply, each with a sentence saying why.

Every number is read from ``metrics.json`` (``per_finding`` holds each finding's binary evaluation,
``evaluation`` the macro figures); nothing is computed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report.document import CI_METHOD_WORDS, Doc, ci_methods_sentence, fmt, level_words

__all__ = ["build_multilabel_document"]

#: Sections of the single-label report left out for multilabel tasks, and why.
SKIPPED_SECTIONS = {
    "Conformal prediction sets": "conformal",
    "Comparison with a previous model": "comparison",
    "Reporting statistics (TRIPOD+AI / CLAIM items, error analysis, fairness, sites)": "reporting",
    "Explanations (Grad-CAM)": "explanations",
}


def build_multilabel_document(cfg: Config, plan, metrics: dict[str, Any]) -> Doc:
    """The report document of a multilabel run (rendered to HTML, PDF and the model card as usual)."""
    doc = Doc()
    names = list((metrics.get("task") or {}).get("finding_names") or cfg.task.class_names)
    per = metrics.get("per_finding") or {}
    test = (metrics.get("evaluation") or {}).get("test") or {}
    primary = test.get("primary", "uncalibrated")
    block = test.get(primary) or test.get("uncalibrated") or {}
    macro = (block.get("discrimination") or {}).get("macro_auroc") or {}
    _summary(doc, cfg, metrics, names, block, macro, primary)
    _data(doc, plan, metrics, names)
    _model(doc, plan)
    _performance(doc, metrics, names, per, primary, macro)
    _operating_points(doc, names, per, primary)
    _not_adapted(doc, metrics)
    return doc


def _summary(doc: Doc, cfg: Config, metrics, names, block, macro, primary) -> None:
    doc.h("Summary")
    n = (block.get("discrimination") or {}).get("n", "?")
    doc.kpis(
        [
            ("Test cases", str(n)),
            (f"Test macro AUROC ({len(names)} findings)", fmt(macro)),
            ("Mean Brier score", fmt((block.get("calibration") or {}).get("brier"))),
        ]
    )
    doc.p(
        f"Task: multilabel classification of {len(names)} findings ({', '.join(names)}); findings may "
        "co-occur, so the model gives each finding its own probability (a sigmoid output), calibrated, "
        "thresholded and evaluated on its own; a case may have several findings or none. "
        f"Intervals are {level_words(metrics)} confidence intervals. "
        + ci_methods_sentence(
            [block.get("discrimination") or {}, block.get("calibration") or {}],
            (metrics.get("options") or {}).get("n_bootstrap"),
        )
    )
    doc.p(_calibration_sentence(metrics, names))
    for w in metrics.get("warnings") or []:
        doc.warn(w)


def _calibration_sentence(metrics: dict[str, Any], names: list[str]) -> str:
    cal = metrics.get("calibration") or {}
    per = cal.get("per_finding") or {}
    applied = [f"{n} ({per[n]})" for n in names if per.get(n) not in (None, "none")]
    if not applied:
        return (
            f"Calibration ({cal.get('requested', '?')} requested, per finding on the "
            f"{cal.get('n_cases', '?')} "
            "calibration cases): applied to no finding; every probability in this report is uncalibrated."
        )
    rest = [n for n in names if per.get(n) in (None, "none")]
    return (
        f"Calibration, fitted per finding on the {cal.get('n_cases', '?')} calibration cases with the guard "
        f"of the binary path: applied for {', '.join(applied)}"
        + (
            f"; not applied for {', '.join(rest)} (declined or not requested: see the warnings)"
            if rest
            else ""
        )
        + "."
    )


def _data(doc: Doc, plan, metrics: dict[str, Any], names: list[str]) -> None:
    doc.h("Data and splits")
    path = Path(plan.ingest) / "ingest_report.json"
    ingest = json.loads(path.read_text()) if path.is_file() else {}
    if ingest:
        problems = ingest.get("problems_by_code") or {}
        words = (
            "; ".join(f"{k}: {v}" for k, v in sorted(problems.items())) if isinstance(problems, dict) else ""
        )
        doc.p(
            f"{ingest.get('cases', '?')} cases from {ingest.get('patients', '?')} patients ingested. "
            f"Split rule: {ingest.get('split_rule', '?')}; multilabel cases are stratified by their rarest "
            "positive finding. "
            "No patient appears in two splits."
            + (f" Rows and files not used, by code: {words}." if words else "")
        )
    rows = []
    for s, d in (metrics.get("splits") or {}).items():
        pf = d.get("per_finding") or {}
        rows.append(
            [s, d.get("cases"), d.get("patients")] + [pf.get(n, 0) for n in names] + [d.get("no_finding")]
        )
    doc.table(["split", "cases", "patients"] + [f"{n} positive" for n in names] + ["no finding"], rows)


def _model(doc: Doc, plan) -> None:
    doc.h("Model and training")
    path = Path(plan.finetune) / "train_summary.json"
    s = json.loads(path.read_text()) if path.is_file() else {}
    if not s:
        doc.p("No training summary was found for this model.")
        return
    doc.p(
        f"Backbone {s.get('backbone')} ({'pretrained' if s.get('pretrained') else 'from scratch'}), strategy "
        f"{s.get('strategy')}, {s.get('epochs_run')} epochs run (best epoch {s.get('best_epoch')}, "
        "stopped by "
        f"{str(s.get('stopped_by', '?')).replace('_', ' ')}). Loss: binary cross-entropy per finding. Best "
        f"validation macro AUROC {fmt(s.get('best_val_auroc'))}; {s.get('train_cases')} training cases, "
        f"positives per finding {s.get('train_class_counts')}."
    )


def _performance(doc: Doc, metrics, names, per, primary: str, macro: dict[str, Any]) -> None:
    doc.h("Per-finding performance")
    method = CI_METHOD_WORDS.get(str(macro.get("ci_method")), str(macro.get("ci_method")))
    used = macro.get("findings") or []
    doc.p(
        f"Test split, {primary} probabilities. The macro AUROC over the {len(used)} findings with positive "
        "and "
        f"negative test cases is {fmt(macro)} ({method} interval over "
        f"{(metrics.get('options') or {}).get('n_bootstrap', '?')} resamples, one resample serving every "
        "finding). Each finding below is evaluated exactly as a binary task would be."
    )
    rows = []
    for n in names:
        ev = ((per.get(n) or {}).get("evaluation") or {}).get("test") or {}
        b = ev.get(primary) or ev.get("uncalibrated") or {}
        d, c = b.get("discrimination") or {}, b.get("calibration") or {}
        auc = d.get("auroc") or {}
        prev = d.get("prevalence") or {}
        rows.append(
            [
                n,
                fmt(prev.get("value")),
                fmt(auc),
                CI_METHOD_WORDS.get(str(auc.get("ci_method")), auc.get("ci_method") or "n/a"),
                fmt(d.get("auprc")),
                fmt(c.get("brier")),
                fmt(c.get("ece")),
                fmt(c.get("calibration_slope")),
                ((per.get(n) or {}).get("calibration") or {}).get("applied", "none"),
            ]
        )
    doc.table(
        [
            "finding",
            "prevalence",
            "AUROC",
            "AUROC interval",
            "AUPRC",
            "Brier",
            "ECE",
            "calibration slope",
            "calibration applied",
        ],
        rows,
    )
    best = max(rows, key=lambda r: _value(per, r[0], primary), default=None)
    worst = min(rows, key=lambda r: _value(per, r[0], primary), default=None)
    if best and worst and best[0] != worst[0]:
        doc.p(f"Highest AUROC: {best[0]} ({best[2]}); lowest: {worst[0]} ({worst[2]}).")


def _value(per: dict[str, Any], name: str, primary: str) -> float:
    ev = ((per.get(name) or {}).get("evaluation") or {}).get("test") or {}
    v = ((ev.get(primary) or ev.get("uncalibrated") or {}).get("discrimination") or {}).get("auroc") or {}
    x = v.get("value")
    return float(x) if isinstance(x, (int, float)) else float("-inf")


def _operating_points(doc: Doc, names, per, primary: str) -> None:
    doc.h("Operating points per finding")
    rows = []
    for n in names:
        ev = ((per.get(n) or {}).get("evaluation") or {}).get("test") or {}
        ops = (ev.get(primary) or ev.get("uncalibrated") or {}).get("operating_points") or {}
        for rule, op in ops.items():
            if isinstance(op, dict) and "threshold" in op:
                t, v = op.get("test") or {}, op.get("val") or {}
                met = op.get("target_met_on_test")
                rows.append(
                    [
                        n,
                        rule,
                        fmt(op.get("threshold")),
                        fmt(v.get("sensitivity")),
                        fmt(v.get("specificity")),
                        fmt(t.get("sensitivity")),
                        fmt(t.get("specificity")),
                        "n/a" if met is None else fmt(bool(met)),
                    ]
                )
    if not rows:
        doc.p(
            "No operating point was chosen (each needs a validation split with positive and negative cases "
            "of "
            "its finding; the warnings say which finding lacked them)."
        )
        return
    doc.p(
        "Thresholds chosen on the validation split for each finding by the configured rules, applied once to "
        "the test split."
    )
    doc.table(
        [
            "finding",
            "rule",
            "threshold",
            "val sensitivity",
            "val specificity",
            "test sensitivity",
            "test specificity",
            "target met on test",
        ],
        rows,
    )


def _not_adapted(doc: Doc, metrics: dict[str, Any]) -> None:
    doc.h("Sections not shown for a multilabel task")
    reasons = metrics.get("not_adapted") or {}
    for title, key in SKIPPED_SECTIONS.items():
        if key in reasons:
            doc.p(f"{title}: {reasons[key]}.")
    note = (metrics.get("promotion_holdout") or {}).get("note")
    if note:
        doc.p(f"Promotion holdout: {note}.")
    doc.p(
        "Subgroup and patient-level figures are computed per finding (metrics.json, per_finding.<finding>."
        "subgroups and .patient_level); this report does not tabulate them."
    )
