"""Evaluate task: calibration, metrics with CIs (pipeline.evaluate.stage), then the report (pipeline.report)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Config
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
        import logging

        from pipeline.evaluate.stage import run_evaluate
        from pipeline.report.render import write_reports

        ev = run_evaluate(cfg, plan, tmp)
        if cfg.evaluate.external:  # second test sources, scored with this model and its new calibrator
            from pipeline.io import write_json
            from pipeline.ops.external import evaluate_external_sources

            ev.metrics["external"] = evaluate_external_sources(cfg, plan, tmp)
            write_json(tmp / "metrics.json", ev.metrics)
        write_reports(
            cfg, plan, ev.metrics, ev.preds, ev.calibrated, tmp, explanations=ev.explanations, raw=ev.raw
        )
        logging.getLogger(__name__).info(
            "Evaluate: report written (%s)", ", ".join(sorted(p.name for p in tmp.iterdir()))
        )
