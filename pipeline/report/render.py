"""The exported report: one self-contained HTML file, the same content as PDF, and a model card.

The report package, one job per module:

* :mod:`pipeline.report.document`: the document model (headings, paragraphs, warnings, key figures,
  tables, figures) and number formatting;
* :mod:`pipeline.report.sections`: one module per section, each reading ``metrics.json`` and the run's
  summaries (no statistic is computed in the report: ``pipeline.evaluate`` computes every number);
* :mod:`pipeline.report.build`: the sections in order;
* :mod:`pipeline.report.html` (Jinja2 templates, autoescaped; figures as base64 PNG, no external URL),
  :mod:`pipeline.report.pdf` (reportlab) and :mod:`pipeline.report.model_card` (Markdown): the renderers;
* :mod:`pipeline.report.plots`: the matplotlib figures.

This module keeps the entry point the evaluate stage calls and re-exports the names other code imports.
Nothing here may contain an identifier: the inputs are pseudonymous predictions and the metrics dict.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.io import write_text
from pipeline.report.build import build_document
from pipeline.report.document import TTA_WORDS, Doc, ensemble_words, fmt, is_metric, metric_rows, nice
from pipeline.report.model_card import model_card
from pipeline.report.sections.checklist import checklist, limitations

__all__ = [
    "TTA_WORDS",
    "Doc",
    "build_document",
    "checklist",
    "ensemble_words",
    "fmt",
    "is_metric",
    "limitations",
    "metric_rows",
    "model_card",
    "nice",
    "write_reports",
]


def write_reports(
    cfg: Config,
    plan,
    metrics: dict[str, Any],
    preds: dict[str, Any],
    calibrated: dict[str, np.ndarray],
    out_dir: Path,
    explanations: list[Any] | None = None,
    raw: dict[str, np.ndarray] | None = None,
) -> None:
    """Write ``report.html``, ``report.pdf`` and ``model_card.md`` into ``out_dir`` (each atomically).

    Args:
        cfg: The run config.
        plan: The run's :class:`pipeline.workspace.StagePlan` (ingest and finetune folders are read).
        metrics: The metrics dict (metrics.json).
        preds: Split name -> ``SplitPredictions`` (for the figures).
        calibrated: Split name -> calibrated probabilities, (N, K).
        out_dir: Output folder.
        explanations: Optional Grad-CAM maps to draw (``pipeline.evaluate.gradcam.Explanation``: ``images``,
            ``cams``, ``cases``, ``caption``).
        raw: Optional split name -> uncalibrated probabilities, (N, K); a split missing here uses the
            softmax of its logits.
    """
    doc = build_document(cfg, plan, metrics, preds, calibrated, explanations, raw)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (
        f"medtl run '{cfg.name}', generated {now}; data snapshot {plan.snapshot}; "
        f"stages ingest {Path(plan.ingest).name}, finetune {Path(plan.finetune).name}, "
        f"evaluate {Path(plan.evaluate).name}"
    )
    write_text(out_dir / "report.html", doc.html(cfg.report.title, subtitle))
    doc.pdf(out_dir / "report.pdf", cfg.report.title, subtitle)
    write_text(out_dir / "model_card.md", model_card(cfg, plan, metrics, doc))
