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

#: Names this module offers from torch-importing modules, loaded on first use (PEP 562): a night that
#: decides nothing changed imports this module but never torch.
_LAZY = {
    "run_finetune": "pipeline.train.loop",
    "WARM_START_FILE": "pipeline.train.loop",
    "launch_distributed": "pipeline.train.worker",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class FineTune(StageTask):
    stage = "finetune"
    resources = {"gpu": 1}

    def requires(self) -> Augment:
        return Augment(config=self.config)

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:
        this = sys.modules[__name__]  # the training entry points load lazily (module __getattr__ below)
        WARM_START_FILE, run_finetune = this.WARM_START_FILE, this.run_finetune
        launch_distributed = this.launch_distributed
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
