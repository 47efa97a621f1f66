"""Promote task: register the evaluated model and run champion/challenger (pipeline.ops.nightly)."""

from __future__ import annotations

import luigi

from pipeline.io import write_json
from tasks.base import config_and_plan
from tasks.evaluate import Evaluate


class Promote(luigi.Task):
    """Registers the Evaluate stage's model and decides its promotion, once per evaluated model.

    Output: ``<workspace>/ops/decisions/<evaluate digest>.json`` (the decision with its numbers).
    """

    config = luigi.Parameter(description="Path to the run's YAML config")

    def requires(self) -> Evaluate:
        return Evaluate(config=self.config)

    def output(self) -> luigi.LocalTarget:
        _, plan = config_and_plan(self.config)
        return luigi.LocalTarget(str(plan.workspace / "ops" / "decisions" / f"{plan.evaluate.name}.json"))

    def run(self) -> None:
        from pipeline.ops.nightly import register_and_decide

        cfg, plan = config_and_plan(self.config)
        write_json(self.output().path, register_and_decide(cfg, plan))
