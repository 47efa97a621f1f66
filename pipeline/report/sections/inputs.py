"""What every section reads: the run's config and stage folders, the metrics dict, predictions and
probabilities, gathered once. No statistic is computed here or in any section: ``metrics`` (written by
``pipeline.evaluate``) holds every number the report shows; the figures plot arrays as given.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.config import Config


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass
class ReportInputs:
    """Inputs of the report sections.

    Attributes:
        cfg: The run config.
        plan: The run's :class:`pipeline.workspace.StagePlan`.
        metrics: The metrics dict (metrics.json).
        preds: Split name -> ``SplitPredictions`` (logits, y, patient, case, groups).
        calibrated: Split name -> calibrated probabilities, (N, K).
        raw: Split name -> uncalibrated probabilities, (N, K); a split missing here is the softmax of its
            logits.
        explanations: Grad-CAM maps to draw (``pipeline.evaluate.gradcam.Explanation``: ``images``, ``cams``,
            ``cases``, ``caption``).
        ingest: ``ingest_report.json`` of the ingest stage (``{}`` when absent).
        train: ``train_summary.json`` of the finetune stage (``{}`` when absent).
    """

    cfg: Config
    plan: Any
    metrics: dict[str, Any]
    preds: dict[str, Any]
    calibrated: dict[str, np.ndarray]
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    explanations: list[Any] = field(default_factory=list)
    ingest: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def gather(
        cls,
        cfg: Config,
        plan,
        metrics: dict[str, Any],
        preds: dict[str, Any],
        calibrated: dict[str, np.ndarray],
        explanations: list[Any] | None = None,
        raw: dict[str, np.ndarray] | None = None,
    ) -> ReportInputs:
        """Read the ingest and training summaries of the run's stage folders."""
        return cls(
            cfg,
            plan,
            metrics,
            preds,
            calibrated,
            dict(raw or {}),
            list(explanations or []),
            _load_json(Path(plan.ingest) / "ingest_report.json"),
            _load_json(Path(plan.finetune) / "train_summary.json"),
        )

    def raw_probs(self, split: str) -> np.ndarray:
        """Uncalibrated probabilities of ``split``, (N, K): as given, else the softmax of its logits."""
        if split in self.raw:
            return np.asarray(self.raw[split])
        return softmax(np.asarray(self.preds[split].logits, dtype=np.float64), axis=1)

    # -- views of the metrics dict ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.cfg.task.class_names)

    @property
    def pos(self) -> int | None:
        return self.cfg.task.positive_index

    @property
    def test(self) -> dict[str, Any]:
        return (self.metrics.get("evaluation") or {}).get("test") or {}

    @property
    def unc(self) -> dict[str, Any]:
        return self.test.get("uncalibrated") or {}

    @property
    def cal(self) -> dict[str, Any]:
        return self.test.get("calibrated") or {}  # None when no calibrator was applied

    @property
    def prim(self) -> dict[str, Any]:
        """The block of the primary probabilities (calibrated when metrics say so and it exists)."""
        return self.cal if self.test.get("primary", "uncalibrated") == "calibrated" and self.cal else self.unc
