"""Ingest task: source tree + labels CSV -> manifest (pipeline.ingest.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.ingest.stage import run_ingest
from pipeline.workspace import StagePlan
from tasks.base import StageTask


class Ingest(StageTask):
    stage = "ingest"

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        run_ingest(cfg, tmp, plan.workspace)
