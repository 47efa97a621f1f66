"""Evaluate task: calibration, metrics with CIs, the report (pipeline.evaluate.stage)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
from pipeline.evaluate.stage import run_evaluate
from pipeline.workspace import StagePlan
from tasks.base import StageTask
from tasks.finetune import FineTune
from tasks.study import study_members


class Evaluate(StageTask):
    stage = "evaluate"

    def requires(self) -> FineTune | list:
        members = study_members(self.config)
        return [FineTune(config=self.config), *members] if members else FineTune(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        run_evaluate(cfg, plan, tmp)
