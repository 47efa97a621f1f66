"""The trained model as one artefact, and the one scorer every consumer uses.

Layering: ``trained`` sits between ``augment`` and ``train`` (training writes the artefact with
:func:`save_model`; evaluate, report, ops and active learning read it through :class:`TrainedModel` and
:class:`Scorer`). A new consumer needs only::

    from pipeline.trained import Scorer, TrainedModel
    model = TrainedModel.load(finetune_dir, calibrator_dir=evaluate_dir)   # verified by sha256
    scores = Scorer(model, "auto").score(x)                                # logits, raw, calibrated

Submodules: ``artefact`` (files, save/load/verify), ``nets`` (fold ensemble, TTA, rebuilding),
``scorer`` (logits, probabilities, features), ``calibration`` (the calibrators and their saved state),
``device``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainedModel": "pipeline.trained.artefact",
    "TrainedModelError": "pipeline.trained.artefact",
    "save_model": "pipeline.trained.artefact",
    "save_calibrator": "pipeline.trained.artefact",
    "Scorer": "pipeline.trained.scorer",
    "Scores": "pipeline.trained.scorer",
    "predict_logits": "pipeline.trained.scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy (PEP 562): importing the package does not load torch.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pipeline.trained' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
