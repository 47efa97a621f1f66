"""Evaluate task: calibration, metrics with CIs, the report (pipeline.evaluate.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.evaluate.stage import run_evaluate
from pipeline.workspace import StagePlan
from tasks.base import StageTask
from tasks.finetune import FineTune


class Evaluate(StageTask):
    stage = "evaluate"

    def requires(self) -> FineTune:
        return FineTune(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        run_evaluate(cfg, plan, tmp)
