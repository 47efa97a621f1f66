"""Assemble the report document: every section, in the order a clinical committee reads them."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.report.document import Doc
from pipeline.report.sections.checklist import checklist_section
from pipeline.report.sections.conformal import conformal_section
from pipeline.report.sections.inputs import ReportInputs
from pipeline.report.sections.items import (
    characteristics_section,
    error_section,
    external_section,
    fairness_section,
    flow_section,
    methods_section,
    site_section,
)
from pipeline.report.sections.operating_points import operating_points_section
from pipeline.report.sections.overview import data_section, model_section, summary_section
from pipeline.report.sections.performance import explanations_section, performance_section
from pipeline.report.sections.scarce import scarce_labels_section
from pipeline.report.sections.study import comparison_section, study_section
from pipeline.report.sections.subgroups import patient_section, subgroup_section

__all__ = ["build_document"]


def build_document(
    cfg: Config,
    plan,
    metrics: dict[str, Any],
    preds: dict[str, Any],
    calibrated: dict[str, np.ndarray],
    explanations: list[Any] | None = None,
    raw: dict[str, np.ndarray] | None = None,
) -> Doc:
    """Every section of the report (arguments as :func:`pipeline.report.render.write_reports`); a multilabel
    task's report is :func:`pipeline.report.sections.multilabel.build_multilabel_document`."""
    if (metrics.get("task") or {}).get("kind") == "multilabel":
        from pipeline.report.sections.multilabel import build_multilabel_document

        return build_multilabel_document(cfg, plan, metrics)
    run = ReportInputs.gather(cfg, plan, metrics, preds, calibrated, explanations, raw)
    doc = Doc()
    summary_section(doc, run)
    data_section(doc, run)
    flow_section(doc, run)
    characteristics_section(doc, run)
    model_section(doc, run)
    methods_section(doc, run)
    performance_section(doc, run)
    operating_points_section(doc, metrics, run.prim, run.names, run.pos)
    conformal_section(doc, metrics)
    subgroup_section(doc, metrics)
    fairness_section(doc, metrics)
    site_section(doc, metrics)
    patient_section(doc, metrics)
    error_section(doc, metrics)
    explanations_section(doc, run)
    external_section(doc, metrics)
    scarce_labels_section(doc, run)
    study_section(doc, metrics)
    comparison_section(doc, metrics)
    checklist_section(doc, run)
    return doc
