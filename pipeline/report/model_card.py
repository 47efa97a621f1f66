"""The model card (Markdown): intended use, data provenance, model, calibration, then every section of
the report as Markdown (``templates/model_card.md``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report.document import TTA_WORDS, Doc, ensemble_words
from pipeline.report.html import environment

__all__ = ["model_card"]


def model_card(cfg: Config, plan, metrics: dict[str, Any], doc: Doc) -> str:
    """Markdown model card of the run: the head facts, then ``doc`` as Markdown.

    Args:
        cfg: The run config.
        plan: The run's :class:`pipeline.workspace.StagePlan` (its data snapshot is cited).
        metrics: The metrics dict (unused today; kept for the callers' signature).
        doc: The report document built by :func:`pipeline.report.build.build_document`.
    """
    return (
        environment(markdown=True)
        .get_template("model_card.md")
        .render(
            cfg=cfg,
            ensemble=ensemble_words(cfg),
            tta=TTA_WORDS[cfg.train.tta],
            labels_file=Path(cfg.data.labels_csv).name,
            snapshot=plan.snapshot,
            body=doc.markdown(),
        )
    )
