"""Augment task: cached deterministic tensors, transform spec, preview (pipeline.augment.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.workspace import StagePlan
from tasks.base import StageTask
from tasks.ingest import Ingest


class Augment(StageTask):
    stage = "augment"

    def requires(self) -> Ingest:
        return Ingest(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        from pipeline.augment.stage import run_augment  # MONAI and torch: only when the stage runs

        run_augment(cfg, plan.ingest, tmp, plan.workspace)
