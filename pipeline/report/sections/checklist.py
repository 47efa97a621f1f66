"""Reporting checklist (TRIPOD+AI / CLAIM) and limitations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report.document import Doc
from pipeline.report.sections.inputs import ReportInputs


def checklist(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[list[str]]:
    return [
        [
            "Data source and eligibility (CLAIM 7-8, TRIPOD+AI 5)",
            "Data and splits: inputs read, cases ingested, reasons for exclusion",
        ],
        [
            "De-identification method (CLAIM 12)",
            "Data and splits: keyed HMAC pseudonyms; private mapping kept apart",
        ],
        [
            "Sample size and class balance (TRIPOD+AI 9, CLAIM 19)",
            "Data and splits table (cases, patients, per class, per split)",
        ],
        [
            "Data partitioning, patient level (CLAIM 21, TRIPOD+AI 10)",
            f"Split rule: {ingest.get('split_rule', 'n/a')}",
        ],
        [
            "Reference standard / labels (CLAIM 14-16)",
            f"Labels from {Path(cfg.data.labels_csv).name}, column '{cfg.data.label_column}'",
        ],
        ["Model, initialisation and training (CLAIM 22-26)", "Model and training table, training curves"],
        ["Discrimination with CIs (TRIPOD+AI 23, CLAIM 28-29)", "Discrimination table (95% CIs)"],
        [
            "Calibration (TRIPOD+AI 12e/23)",
            "Calibration method fitted on its own split; reliability diagrams, ECE, Brier, slope/intercept",
        ],
        [
            "Operating points and clinical utility (TRIPOD+AI 12)",
            "Operating points chosen on validation; decision curve",
        ],
        [
            "Subgroup / fairness analysis (TRIPOD+AI 14, CLAIM 34)",
            "Subgroups section" if metrics.get("subgroups") else "no subgroup columns in this data",
        ],
        [
            "Failure analysis (CLAIM 37)",
            "Probability histogram; operating-point confusion matrices"
            + ("; Grad-CAM of correct and wrong cases" if cfg.evaluate.explain_cases else ""),
        ],
        [
            "Uncertainty of individual predictions",
            "Conformal prediction sets (coverage and set size per class)"
            if (metrics.get("conformal") or {}).get("methods")
            else "no conformal sets (no calibration split)",
        ],
        [
            "Unit of analysis (CLAIM 32)",
            "Patient-level metrics section"
            if metrics.get("patient_level")
            else "one case per patient in the test split: case level = patient level",
        ],
        [
            "Comparison with previous / baseline models (TRIPOD+AI 23b)",
            "Comparison section (paired DeLong, paired bootstrap)"
            if metrics.get("comparison")
            else "not requested",
        ],
    ]


def limitations(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    n_test = ingest.get("splits", {}).get("test", {}).get("cases")
    out = [
        f"Internal validation only: the test split ({n_test} cases) comes from the same source as the training data; "
        "performance on other scanners, sites or populations is unknown until measured.",
        "Intervals are wide with a few hundred test cases; differences inside them are not evidence of a difference.",
        "Calibration holds for the prevalence of the calibration split; a different prevalence at deployment shifts "
        "predicted probabilities and predictive values.",
    ]
    if cfg.preprocess.image_size <= 64:
        out.append(f"Inputs are resized to {cfg.preprocess.image_size} px, which discards fine detail.")
    return out


def checklist_section(doc: Doc, run: ReportInputs) -> None:
    """The checklist table and the limitations."""
    cfg, ingest, metrics = run.cfg, run.ingest, run.metrics
    doc.h("Reporting checklist (TRIPOD+AI / CLAIM items on data, splits, metrics and calibration)")
    doc.table(["item", "where"], checklist(cfg, ingest, metrics))
    doc.h("Limitations")
    for text in limitations(cfg, ingest, metrics):
        doc.p(text)
