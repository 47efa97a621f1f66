"""What each stage's output folder is named by: stage versions and the FineTune digest recipe.

Kept with the config (the base layer) so that planning (:mod:`pipeline.workspace`) and the scarce-label
study (:mod:`pipeline.evaluate.study`) share one recipe without evaluate importing the planner.
"""

from __future__ import annotations

from typing import Any

from pipeline.config.schema import Config

__all__ = ["STAGE_VERSIONS", "finetune_digest"]

#: Bump when a stage's code changes what it writes, so old folders are not reused.
STAGE_VERSIONS = {"ingest": 2, "augment": 1, "finetune": 1, "evaluate": 1}


def finetune_digest(cfg: Config, augment_digest: str, weights_sha256: str, warm_start: str | None) -> str:
    """The one recipe of a FineTune folder's digest (the run's model and every scarce-label study model).

    Args:
        cfg: The config training uses (a study model's :func:`pipeline.evaluate.study.study_config`).
        augment_digest: Name of the Augment folder the model trains on.
        weights_sha256: sha256 of the pretrained weight file loaded, ``"none"`` from scratch: swapping
            the file retrains, the same content at another path does not (the path is not hashed).
        warm_start: Name of the FineTune folder whose weights start training, or None.
    """
    extra: dict[str, Any] = {
        "augment": augment_digest,
        "weights": weights_sha256 if cfg.model.pretrained else "none",
        "v": STAGE_VERSIONS["finetune"],
    }
    if warm_start is not None:
        extra["warm_start"] = warm_start
    return cfg.hashed("model", "train", extra=extra)
