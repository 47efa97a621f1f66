"""Subgroup and patient-level sections (test split)."""

from __future__ import annotations

from typing import Any

from pipeline.report.document import Doc, fmt, level_words, metric_rows, nice


def _group_row(col: str, g: str, d: dict[str, Any]) -> list[Any]:
    size = d.get("size") or {}
    m = d.get("metrics") or {}
    disc, calm = m.get("discrimination") or {}, m.get("calibration") or {}
    auc = disc.get("auroc", disc.get("macro_auroc"))
    note = (
        "too small: CIs too wide to conclude" if d.get("warning") == "too_small" else (d.get("warning") or "")
    )
    if d.get("error"):
        note = (note + "; " if note else "") + str(d["error"])
    return [
        col,
        g,
        size.get("cases", ""),
        size.get("patients", ""),
        fmt(auc),
        fmt(disc.get("sensitivity", disc.get("accuracy"))),
        fmt(disc.get("specificity", disc.get("balanced_accuracy"))),
        fmt(calm.get("ece")),
        fmt(calm.get("brier")),
        note,
    ]


def subgroup_section(doc: Doc, metrics: dict[str, Any]) -> None:
    subs = metrics.get("subgroups")
    if not subs:
        return
    doc.h("Subgroups (test split)")
    binary = metrics.get("task", {}).get("kind") == "binary"
    min_n = metrics.get("options", {}).get("min_subgroup")
    doc.p(
        "The same metrics per value of each subgroup column recorded at ingestion (primary probabilities, "
        f"{level_words(metrics)} CIs). "
        f"Groups with fewer than {min_n} cases are marked 'too small': their intervals are too wide to show "
        "a difference."
    )
    rows = []
    for col, groups in subs.items():
        if isinstance(groups, dict):
            rows += [_group_row(col, g, d) for g, d in groups.items() if isinstance(d, dict)]
    header = [
        "column",
        "group",
        "cases",
        "patients",
        "AUROC" if binary else "macro AUROC",
        "sensitivity" if binary else "accuracy",
        "specificity" if binary else "balanced acc.",
        "ECE",
        "Brier",
        "note",
    ]
    if rows:
        doc.table(header, rows)
    for col, groups in subs.items():
        if isinstance(groups, dict) and len(groups) == 1:
            doc.p(
                f"Column '{col}' has a single value in the test split: no comparison between groups is "
                "possible."
            )


def patient_section(doc: Doc, metrics: dict[str, Any]) -> None:
    pl = metrics.get("patient_level")
    if not pl:
        return
    doc.h("Patient-level metrics (test split)")
    doc.p(
        f"{pl.get('n_patients')} patients; a patient's probabilities are the "
        f"{str(pl.get('aggregation')).replace('_', ' ')} over their cases "
        f"({pl.get('probabilities')} probabilities); patient label rule: "
        f"{str(pl.get('label_rule')).replace('_', ' ')}; "
        f"{pl.get('n_patients_with_mixed_labels')} patient(s) have cases with different labels."
    )
    rows = [
        [nice(k), fmt(v)]
        for blk in ("discrimination", "calibration")
        for k, v in metric_rows((pl.get("metrics") or {}).get(blk) or {})
    ]
    if rows:
        doc.table(["metric (patient level)", f"value ({level_words(metrics)} CI)"], rows)
