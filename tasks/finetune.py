"""FineTune task: trains the backbone (pipeline.train.loop), resuming from its work folder after a crash.

With ``train.devices > 1`` the training runs under ``torchrun`` in a child process
(:func:`pipeline.train.worker.launch_distributed`); DistributedDataParallel never runs inside the Luigi
worker itself.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from models.errors import WeightsError
from models.locate import sha256_file
from pipeline.config import Config
from pipeline.io import write_json
from pipeline.workspace import StagePlan
from tasks.augment import Augment
from tasks.base import StageTask


class FineTune(StageTask):
    stage = "finetune"
    resources = {"gpu": 1}

    def requires(self) -> Augment:
        return Augment(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        # torch is imported only when a model is trained, never on a night that decides nothing changed.
        from pipeline.train.loop import WARM_START_FILE, run_finetune
        from pipeline.train.worker import launch_distributed

        check_weights_unchanged(plan)
        work = plan.finetune.with_name(plan.finetune.name + ".work")
        warm = getattr(plan, "warm_start", None)
        if warm is not None:  # ops.retrain.warm_start: champion
            work.mkdir(parents=True, exist_ok=True)
            shutil.copy2(warm / "model.pt", work / WARM_START_FILE)
            write_json(tmp / "warm_start.json", {"from_finetune": warm.name})
        if cfg.train.devices > 1:
            launch_distributed(cfg, plan.augment, tmp, work, cfg.train.devices)
        else:
            run_finetune(cfg, plan.augment, tmp, work, progress=sys.stderr.isatty())

    def run(self) -> None:
        super().run()
        work = self.plan.finetune.with_name(self.plan.finetune.name + ".work")
        shutil.rmtree(work, ignore_errors=True)


def check_weights_unchanged(plan: StagePlan) -> None:
    """The weight file about to be read for training still has the content the folder is named by.

    Planning remembers digests per (path, size, mtime); here, when the file is read for use, it is hashed
    again, so a file rewritten with the same size and mtime is caught instead of training silently under
    the wrong folder name.

    Raises:
        WeightsError: The content changed since the run was planned (code ``weights_changed``).
    """
    if plan.weights_path is None:
        return
    now = sha256_file(plan.weights_path)
    if now != plan.weights_sha256:
        raise WeightsError(
            f"model.weights: the pretrained weight file changed since this run was planned (sha256 "
            f"{plan.weights_sha256[:12]}... planned, {now[:12]}... now); expected it unchanged during a "
            "run; run again to plan with the new file",
            code="weights_changed",
        )
