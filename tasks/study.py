"""Scarce-label study task: one model per (label fraction, strategy), trained into ``<workspace>/study/<digest>/``.

Optional and off by default (``evaluate.study_label_fractions`` / ``evaluate.study_strategies``): it trains
extra models. The Evaluate task requires every member when the lists are set and reports the
label-efficiency curve and the strategy table (see :func:`pipeline.evaluate.study.run_study_member`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import luigi

from pipeline.io import atomic_dir
from tasks.augment import Augment
from tasks.base import config_and_plan
from tasks.finetune import FineTune


class StudyMember(luigi.Task):
    """Train (unless it is the run's own model) and score one study model on the validation split."""

    config = luigi.Parameter(description="Path to the run's YAML config")
    label_fraction = luigi.FloatParameter(description="Share of the training labels, in (0, 1]")
    strategy = luigi.Parameter(description="linear_probe, partial, finetune, gradual or scratch")
    resources = {"gpu": 1}
    retry_count = 0

    def _folder(self) -> Path:
        from pipeline.evaluate.study import study_dir

        cfg, plan = config_and_plan(self.config)
        return study_dir(cfg, plan, self.label_fraction, self.strategy)

    def requires(self) -> luigi.Task:
        from pipeline.evaluate.study import study_reuses_main_model

        cfg, plan = config_and_plan(self.config)
        if study_reuses_main_model(cfg, plan, self.label_fraction, self.strategy):
            return FineTune(config=self.config)
        return Augment(config=self.config)

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self._folder()))

    def run(self) -> None:
        from pipeline.evaluate.study import run_study_member  # torch: only when a study model is built

        cfg, plan = config_and_plan(self.config)
        folder = self._folder()
        work = folder.with_name(folder.name + ".work")
        with atomic_dir(self.output().path) as tmp:
            run_study_member(cfg, plan, self.label_fraction, self.strategy, Path(tmp), work)
        shutil.rmtree(work, ignore_errors=True)


def study_members(config: str) -> list[StudyMember]:
    """Every study task of a config (empty when the study is off)."""
    cfg, _ = config_and_plan(config)
    ev = cfg.evaluate
    return [
        StudyMember(config=config, label_fraction=f, strategy=s)
        for s in ev.study_strategies
        for f in ev.study_label_fractions
    ]
