"""Ingest task: source tree + labels CSV -> manifest (pipeline.ingest.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.workspace import StagePlan
from tasks.base import StageTask


class Ingest(StageTask):
    stage = "ingest"

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        # Imported here: a night with nothing new never builds, and never pays for the readers' imports.
        from pipeline.ingest.stage import run_ingest

        run_ingest(cfg, tmp, plan.workspace)
