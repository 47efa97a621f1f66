"""Multilabel models (``task.kind: multilabel``): one sigmoid output per finding.

Findings co-occur, so a case's outputs are ``F`` independent logits whose sigmoids are the finding
probabilities (rows do not sum to one). Everything per finding reuses the binary code paths: a finding's
logit ``s`` is the two-column logit ``[0, s]`` (:func:`binary_logits`), whose softmax is ``sigmoid(s)``, so
the binary calibrators (temperature, Platt, isotonic, ...), their guard and their JSON state apply to each
finding unchanged. :class:`MultilabelCalibrator` holds one fitted calibrator (or None: declined) per finding.
Axis order: logits and probabilities ``(N, F)`` (cases, findings); labels ``(N, F)`` 0/1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit, softmax

__all__ = ["MultilabelCalibrator", "activate", "binary_logits", "is_multilabel"]


def is_multilabel(info_or_kind: dict[str, Any] | str | None) -> bool:
    """True for a ``model_info.json`` dict (key ``task``) or a task kind that is ``multilabel``."""
    kind = info_or_kind.get("task") if isinstance(info_or_kind, dict) else info_or_kind
    return kind == "multilabel"


def activate(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """Uncalibrated probabilities: per-finding sigmoids (multilabel) or the softmax over classes."""
    z = np.asarray(logits, dtype=np.float64)
    return expit(z) if multilabel else softmax(z, axis=1)


def binary_logits(s: np.ndarray) -> np.ndarray:
    """One finding's logits ``(N,)`` as the binary ``(N, 2)`` logits ``[0, s]`` (softmax = ``sigmoid(s)``)."""
    s = np.asarray(s, dtype=np.float64)
    return np.stack([np.zeros_like(s), s], axis=1)


class MultilabelCalibrator:
    """Per-finding calibrators: finding ``j``'s probability is ``calibrators[j]``'s positive-class
    probability of ``[0, s_j]``, or ``sigmoid(s_j)`` where its calibrator was declined (None).

    Args:
        calibrators: One fitted binary calibrator (``pipeline.trained.calibration``) or None per finding.
        names: The finding names (for the saved state and messages).
    """

    method = "multilabel"

    def __init__(self, calibrators: list[Any], names: list[str]) -> None:
        if len(calibrators) != len(names):
            raise ValueError(
                f"MultilabelCalibrator: {len(calibrators)} calibrators for {len(names)} findings"
            )
        self.calibrators = list(calibrators)
        self.names = list(names)
        self.chosen_ = "per_finding"

    def predict_proba(self, logits: Any) -> np.ndarray:
        """Calibrated finding probabilities ``(N, F)`` from logits ``(N, F)``."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.names):
            raise ValueError(
                f"logits: expected shape (N, {len(self.names)}) (one column per finding), got {z.shape}"
            )
        out = expit(z)
        for j, cal in enumerate(self.calibrators):
            if cal is not None:
                out[:, j] = cal.predict_proba(binary_logits(z[:, j]))[:, 1]
        return out

    def state(self) -> dict[str, Any]:
        from pipeline.trained.calibration import calibrator_state

        return {
            "method": self.method,
            "findings": [
                {"name": n, "state": None if c is None else calibrator_state(c)}
                for n, c in zip(self.names, self.calibrators, strict=True)
            ],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MultilabelCalibrator:
        """Rebuild from :meth:`state`.

        Raises:
            ValueError: ``findings`` is missing or malformed (names the field).
        """
        from pipeline.trained.calibration import calibrator_from_state

        findings = state.get("findings")
        if not isinstance(findings, list) or not findings:
            raise ValueError(
                "calibrator state for 'multilabel': 'findings' is missing; expected one entry per finding"
            )
        cals = [calibrator_from_state(f["state"]) if f.get("state") else None for f in findings]
        return cls(cals, [str(f.get("name")) for f in findings])
