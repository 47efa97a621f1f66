"""The one scorer: preprocessed inputs -> logits, features, uncalibrated or calibrated probabilities.

Every consumer of a trained model (Evaluate, the model comparison, the transfer study, promotion,
``medtl predict``, export, Grad-CAM, the semi-supervised teacher, active learning) scores through
:class:`Scorer`, so the fold ensemble, test-time augmentation and the saved calibrator are applied the same
way everywhere. Axis order: inputs ``(N, C, H, W)`` / ``(N, C, D, H, W)`` float32 (see
:mod:`pipeline.augment.preprocess`); logits and probabilities ``(N, K)``; features ``(N, F)``.

Multilabel models (``model_info.json`` ``task: multilabel``) take the sigmoid path: ``K`` is the number of
findings, raw probabilities are per-finding sigmoids (fold ensemble and TTA average each finding's
probability, :func:`pipeline.trained.nets.logit_mean_sigmoid`), and the saved calibrator is a
:class:`pipeline.trained.multilabel.MultilabelCalibrator` (one binary calibrator per finding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.trained.device import autocast, select_device
from pipeline.trained.multilabel import activate, is_multilabel
from pipeline.trained.nets import members, without_tta

if TYPE_CHECKING:
    from pipeline.trained.artefact import TrainedModel

__all__ = ["Scores", "Scorer", "predict_logits"]


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64) -> np.ndarray:
    """Logits ``(N, K)`` float32 of ``model`` (eval mode) for inputs ``x`` ``(N, C, *spatial)``."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.asarray(x[i : i + batch_size], dtype=np.float32)).to(device)
        with autocast(device, True):
            out.append(model(xb).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Scores:
    """Outputs of :meth:`Scorer.score` for N cases: ``logits``, ``raw`` (softmax, or per-finding sigmoids for
    a multilabel model) and ``calibrated`` (N, K)."""

    logits: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray


class Scorer:
    """Scores preprocessed inputs with a :class:`~pipeline.trained.artefact.TrainedModel`.

    Args:
        model: The loaded trained model (network with its TTA, saved calibrator if any).
        device: Torch device, or a ``train.device`` string (``auto``, ``cpu``, ``cuda``).
        batch_size: Inference batch size.
    """

    def __init__(self, model: TrainedModel, device: torch.device | str = "cpu", batch_size: int = 64) -> None:
        self.model = model
        self.device = select_device(device) if isinstance(device, str) else device
        self.batch_size = batch_size
        self.network = model.network.to(self.device).eval()
        self.multilabel = is_multilabel(model.info)

    @property
    def calibrated_available(self) -> bool:
        return self.model.calibrator is not None

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(N, K)`` float64: fold ensemble and TTA applied (``log`` of the mean probability; for
        multilabel models the logit of each finding's mean probability)."""
        return predict_logits(self.network, x, self.device, self.batch_size).astype(np.float64)

    def calibrate(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities from logits (the raw probabilities when the model has no calibrator)."""
        z = np.asarray(logits, dtype=np.float64)
        cal = self.model.calibrator
        return cal.predict_proba(z) if cal is not None else self.raw(z)

    def raw(self, logits: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities from logits: softmax, or per-finding sigmoids (multilabel)."""
        return activate(logits, self.multilabel)

    def probabilities(self, x: np.ndarray, calibrated: bool = True) -> np.ndarray:
        """Probabilities ``(N, K)``: calibrated with the saved calibrator, or the raw ones."""
        z = self.logits(x)
        return self.calibrate(z) if calibrated else self.raw(z)

    def score(self, x: np.ndarray) -> Scores:
        """Logits, raw and calibrated probabilities in one pass."""
        z = self.logits(x)
        return Scores(logits=z, raw=self.raw(z), calibrated=self.calibrate(z))

    @torch.no_grad()
    def features(self, x: np.ndarray) -> np.ndarray:
        """Penultimate features ``(N, F)``: the input of each member's classifier, members concatenated.

        No TTA (features of the image as it is). Used for diversity-based case selection.
        """
        out = []
        for net in members(self.network):
            head = _classifier(net)
            got: list[torch.Tensor] = []
            hook = head.register_forward_pre_hook(lambda _m, args: got.append(args[0].detach().float().cpu()))
            try:
                predict_logits(net, x, self.device, self.batch_size)
            finally:
                hook.remove()
            out.append(torch.cat(got).flatten(1).numpy() if got else np.zeros((len(x), 0), np.float32))
        return np.concatenate(out, axis=1).astype(np.float64)

    def explanation_network(self) -> nn.Module:
        """The network without TTA (a fold ensemble keeps its ``members``), for Grad-CAM."""
        return without_tta(self.network)


def _classifier(net: nn.Module) -> nn.Module:
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
        return head
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__}: no classifier layer found for feature extraction")
    return linears[-1]
