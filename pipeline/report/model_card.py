"""The model card (Markdown): intended use, data provenance, model, calibration, then every section of
the report as Markdown (``templates/model_card.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.report.document import TTA_WORDS, Doc, ensemble_words
from pipeline.report.html import environment
from pipeline.report.sections.overview import calibration_status, weights_words

__all__ = ["model_card"]


def model_card(cfg: Config, plan, metrics: dict[str, Any], doc: Doc) -> str:
    """Markdown model card of the run: the head facts, then ``doc`` as Markdown.

    Args:
        cfg: The run config.
        plan: The run's :class:`pipeline.workspace.StagePlan` (its data snapshot is cited).
        metrics: The metrics dict (the calibration actually applied or declined is read from it).
        doc: The report document built by :func:`pipeline.report.build.build_document`.
    """
    summary = Path(plan.finetune) / "train_summary.json"
    train = json.loads(summary.read_text()) if summary.exists() else {}
    return (
        environment(markdown=True)
        .get_template("model_card.md")
        .render(
            cfg=cfg,
            ensemble=ensemble_words(cfg),
            tta=TTA_WORDS[cfg.train.tta],
            labels_file=Path(cfg.data.labels_csv).name,
            snapshot=plan.snapshot,
            weights=weights_words(train) if train else "not recorded (no training summary)",
            calibration=calibration_status(metrics).removeprefix("Calibration: "),
            body=doc.markdown(),
        )
    )
