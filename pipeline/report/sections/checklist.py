"""Reporting checklist (TRIPOD+AI / CLAIM) and limitations, every sentence from the run's numbers.

Item numbers: TRIPOD+AI (Collins et al., BMJ 2024;385:e078378) and the 44-item CLAIM 2024 update (Tejani et
al., Radiol Artif Intell 2024;6(4):e240300), as numbered in RSNA's own checklist (github.com/RSNA/CLAIM,
docs/checklist.md). The 2024 update renumbered the 2020 list: e.g. de-identification 12 -> 11, intended
sample size 19 -> 21, partitions 20-21 -> 19-20, external testing 32 -> 33, participant flow 33 -> 35,
failure analysis 37 -> 39.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report.document import Doc, fmt, level_words
from pipeline.report.sections.inputs import ReportInputs

CLAIM_NOTE = (
    "Item numbers: TRIPOD+AI 2024 (Collins et al., BMJ 2024) and the CLAIM 2024 update (Tejani et al., "
    "Radiol Artif Intell 2024; 44 items). 'not done' marks an item this run does not cover."
)


def checklist(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[list[str]]:
    """Rows ``[item, TRIPOD+AI, CLAIM, where in this report]``."""
    rep = metrics.get("reporting") or {}
    cal = metrics.get("calibration") or {}
    subgroups = metrics.get("subgroups") or {}
    return [
        [
            "Data sources, eligibility",
            "5a, 6b",
            "7, 8",
            "Data and splits; Participant flow (exclusions by code)",
        ],
        ["Data preparation", "7", "9", "Model and training (input size, channels)"],
        [
            "De-identification",
            "-",
            "11",
            f"Data and splits: {ingest.get('deidentification') or 'keyed pseudonyms'}",
        ],
        [
            "Missing data",
            "11",
            "12",
            "Participant characteristics (missing subgroup values, not imputed)"
            if rep.get("participants")
            else "not done",
        ],
        [
            "Reference standard (outcome definition)",
            "8a",
            "14-16",
            f"Reference standard: column '{cfg.data.label_column}' of {Path(cfg.data.labels_csv).name}"
            + (
                ""
                if getattr(cfg.report, "reference_standard", None)
                else "; how labels were set: not recorded"
            ),
        ],
        [
            "Sample size",
            "10",
            "21",
            "Participant flow and sample size (events per split, detectable difference)"
            if rep.get("sample_size")
            else "Data and splits table",
        ],
        [
            "Data partitioning, level of disjointness",
            "12a",
            "19, 20",
            f"Split rule: {ingest.get('split_rule', 'n/a')}; patient level",
        ],
        [
            "Model, initialisation, training, ensembling",
            "12c",
            "22-27",
            "Model and training (weights per member)",
        ],
        [
            "Class imbalance",
            "13",
            "-",
            f"Reference standard and class imbalance ({cfg.train.class_weighting} weighting, "
            f"{cfg.train.sampler} sampler)",
        ],
        [
            "Fairness",
            "14, 23a",
            "-",
            "Subgroup fairness and calibration differences"
            if rep.get("subgroup_differences")
            else ("Subgroups (per-group tables only)" if subgroups else "not done: no subgroup column"),
        ],
        ["Model output, thresholds and rationale", "15", "-", "Operating points (threshold rationale)"],
        [
            "Performance measures with uncertainty",
            "12e, 23a",
            "28, 29, 32, 37, 38",
            f"Discrimination and calibration ({level_words(metrics)} CIs; interval method per metric)",
        ],
        [
            "Model updating (recalibration)",
            "12f, 24",
            "-",
            f"Calibration: {cal.get('applied', 'none')}" + (" (declined)" if cal.get("declined") else ""),
        ],
        [
            "Heterogeneity across clusters (sites)",
            "12d, 23b",
            "-",
            "Heterogeneity across sites" if rep.get("site_heterogeneity") else "not done: no site column",
        ],
        [
            "Participant flow",
            "20a",
            "35",
            "Participant flow diagram" if rep.get("sample_size") else "Data and splits",
        ],
        [
            "Participant characteristics per split",
            "20b",
            "36",
            "Participant characteristics per split" if rep.get("participants") else "not done",
        ],
        [
            "Participants and events per analysis",
            "21",
            "-",
            "Participant flow table (cases, patients, rarest class)",
        ],
        [
            "Robustness, external validation",
            "16",
            "30, 33",
            "Robustness and external validation"
            if metrics.get("external")
            else "not in this report: internal validation only (evaluate.external in the config, or "
            "`medtl validate`, measures the model on a second labelled source)",
        ],
        [
            "Explainability",
            "-",
            "31",
            "Explanations (Grad-CAM)" if cfg.evaluate.explain_cases else "not done (explain_cases: 0)",
        ],
        ["Failure analysis", "-", "39", "Error analysis" if rep.get("error_analysis") else "not done"],
        ["Limitations", "26", "40", "Limitations"],
    ]


def limitations(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    """Limitations, each stated from the metrics of this run."""
    splits = metrics.get("splits") or {}
    test = splits.get("test") or {}
    rep = metrics.get("reporting") or {}
    level = level_words(metrics)
    per_class = ", ".join(f"{n} {c}" for c, n in (test.get("per_class") or {}).items())
    out = []
    if not metrics.get("external"):
        out.append(
            f"Internal validation only: the {test.get('cases', '?')} test cases ({per_class}) of "
            f"{test.get('patients', '?')} patients come from the same source as the training data; "
            "performance on "
            "other scanners, sites or populations is unknown until measured (evaluate.external in the config "
            "adds a second labelled source to this report; `medtl validate CONFIG --input DIR --labels CSV` "
            "scores one with a registered model)."
        )
    ev = (metrics.get("evaluation") or {}).get("test") or {}
    prim = (
        ev.get("calibrated")
        if ev.get("primary") == "calibrated" and ev.get("calibrated")
        else ev.get("uncalibrated")
    )
    disc = (prim or {}).get("discrimination") or {}
    auc = disc.get("auroc") or disc.get("macro_auroc")
    if isinstance(auc, dict) and auc.get("ci") and None not in auc["ci"]:
        lo, hi = auc["ci"]
        dd = ((rep.get("sample_size") or {}).get("detectable_difference") or {}).get("auroc") or {}
        out.append(
            f"The {level} CI of the test {'AUROC' if 'auroc' in disc else 'macro AUROC'} runs from {fmt(lo)} "
            f"to {fmt(hi)} (width {fmt(hi - lo)})"
            + (
                f"; a difference under {fmt(dd.get('difference'))} from a reference AUROC cannot be detected"
                if dd
                else ""
            )
            + ": differences inside these bounds are not evidence of a difference."
        )
    cal = metrics.get("calibration") or {}
    csplit = splits.get("calibration") or {}
    if cal.get("applied") not in (None, "none") and csplit.get("cases"):
        prev = ", ".join(
            f"{100 * n / csplit['cases']:.1f}% {c}" for c, n in (csplit.get("per_class") or {}).items()
        )
        out.append(
            f"Calibration was fitted on {csplit['cases']} calibration cases ({prev}); a different prevalence "
            "at "
            "deployment shifts predicted probabilities and predictive values."
        )
    elif cal.get("declined"):
        out.append(
            "The calibrator was declined: probabilities are uncalibrated and may be over- or under-confident."
        )
    n_small = len((rep.get("sample_size") or {}).get("warnings") or [])
    if n_small:
        out.append(
            f"{n_small} split-size warning(s) (see Participant flow and sample size) limit what those splits "
            "support."
        )
    if cfg.preprocess.image_size <= 64:
        out.append(f"Inputs are resized to {cfg.preprocess.image_size} px, which discards fine detail.")
    return out


def checklist_section(doc: Doc, run: ReportInputs) -> None:
    """The checklist table and the limitations."""
    cfg, ingest, metrics = run.cfg, run.ingest, run.metrics
    doc.h("Reporting checklist (TRIPOD+AI / CLAIM items on data, splits, metrics and calibration)")
    doc.p(CLAIM_NOTE)
    doc.table(["item", "TRIPOD+AI", "CLAIM", "where in this report"], checklist(cfg, ingest, metrics))
    doc.h("Limitations")
    for text in limitations(cfg, ingest, metrics):
        doc.p(text)
