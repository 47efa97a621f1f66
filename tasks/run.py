"""The wrapper task: the whole chain, and a run record pointing to the stage folders it used."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import luigi

from pipeline.io import write_json
from tasks.base import config_and_plan
from tasks.evaluate import Evaluate


class RunPipeline(luigi.Task):
    """Ingest -> Augment -> FineTune -> Evaluate, recorded in ``<workspace>/runs/<snapshot>-<evaluate>.json``."""

    config = luigi.Parameter(description="Path to the run's YAML config")

    def requires(self) -> Evaluate:
        return Evaluate(config=self.config)

    def output(self) -> luigi.LocalTarget:
        _, plan = config_and_plan(self.config)
        return luigi.LocalTarget(str(plan.workspace / "runs" / f"{plan.snapshot}-{plan.evaluate.name}.json"))

    def run(self) -> None:
        cfg, plan = config_and_plan(self.config)
        metrics_path = plan.evaluate / "metrics.json"
        headline = json.loads(metrics_path.read_text()).get("headline", {}) if metrics_path.exists() else {}
        ws = plan.workspace
        write_json(
            self.output().path,
            {
                "schema_version": 1,
                "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "name": cfg.name,
                "data_snapshot": plan.snapshot,
                "stages": {s: os.path.relpath(getattr(plan, s), ws) for s in ("ingest", "augment", "finetune", "evaluate")},
                "report": os.path.relpath(Path(plan.evaluate) / "report.html", ws),
                "headline": headline,
            },
        )
