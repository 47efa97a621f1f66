"""Augment task: cached deterministic tensors, transform spec, preview (pipeline.augment.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.augment.stage import run_augment
from pipeline.config import Config
from pipeline.workspace import StagePlan
from tasks.base import StageTask
from tasks.ingest import Ingest


class Augment(StageTask):
    stage = "augment"

    def requires(self) -> Ingest:
        return Ingest(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        run_augment(cfg, plan.ingest, tmp, plan.workspace)
