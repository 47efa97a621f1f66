"""The networks a trained model is made of: fold ensembles, mirroring TTA, and the network rebuilt from
``model_info.json``.

Every wrapper returns valid logits (``log`` of a mean probability; for multilabel models the logit of each
finding's mean sigmoid probability), so calibration, conformal sets and
:func:`pipeline.trained.scorer.predict_logits` treat a wrapped model like any network. Axis order: inputs
``(N, C, H, W)`` / ``(N, C, D, H, W)``, outputs ``(N, K)``.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

__all__ = [
    "FlipTTA",
    "FoldEnsemble",
    "build_network",
    "log_mean_probability",
    "logit_mean_sigmoid",
    "members",
    "tta_axes",
    "with_tta",
    "without_tta",
]


def log_mean_probability(logits: list[torch.Tensor]) -> torch.Tensor:
    """``log(mean_k softmax(logits_k))``: logits whose softmax is the mean probability of the inputs."""
    probs = torch.stack([torch.softmax(z.float(), 1) for z in logits]).mean(0)
    return torch.log(probs.clamp_min(1e-12))


def logit_mean_sigmoid(logits: list[torch.Tensor]) -> torch.Tensor:
    """``logit(mean_k sigmoid(logits_k))`` per finding: the multilabel counterpart of
    :func:`log_mean_probability` (probabilities averaged, as the softmax path does)."""
    probs = torch.stack([torch.sigmoid(z.float()) for z in logits]).mean(0).clamp(1e-12, 1 - 1e-7)
    return torch.logit(probs)


def _combine(multilabel: bool):
    return logit_mean_sigmoid if multilabel else log_mean_probability


class FoldEnsemble(nn.Module):
    """Ensemble of fold models: ``forward`` returns ``log(mean_k softmax(model_k(x)))`` (multilabel:
    :func:`logit_mean_sigmoid`).

    State dict keys: ``members.<k>.<key>``.
    """

    def __init__(self, members: list[nn.Module], multilabel: bool = False) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multilabel = multilabel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _combine(self.multilabel)([m(x) for m in self.members])


class FlipTTA(nn.Module):
    """Test-time augmentation by mirroring: ``forward`` returns ``log(mean softmax)`` over flipped copies.

    Every combination of the mirrored ``axes`` is evaluated (2 passes for one axis, 8 for three), as
    nnU-Net mirrors at inference. Not saved: ``model.pt`` holds the inner network and ``model_info.json``
    the ``tta`` mode that :func:`build_network` re-applies.

    Args:
        model: The network (or :class:`FoldEnsemble`).
        axes: Tensor axes to mirror (2 = the first spatial axis of ``(N, C, ...)``).
    """

    def __init__(self, model: nn.Module, axes: tuple[int, ...], multilabel: bool = False) -> None:
        super().__init__()
        self.model = model
        self.multilabel = multilabel
        self.combos = [c for r in range(len(axes) + 1) for c in itertools.combinations(axes, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _combine(self.multilabel)([self.model(x.flip(c) if c else x) for c in self.combos])


def tta_axes(mode: str, spatial_dims: int) -> tuple[int, ...]:
    """Tensor axes mirrored by ``train.tta``: ``flip`` = the left-right (last) axis, ``flip_all`` = all."""
    if mode == "none":
        return ()
    if mode == "flip":
        return (spatial_dims + 1,)
    if mode == "flip_all":
        return tuple(range(2, spatial_dims + 2))
    raise ValueError(f"train.tta={mode!r}; expected 'none', 'flip' or 'flip_all'")


def with_tta(model: nn.Module, mode: str, spatial_dims: int, multilabel: bool = False) -> nn.Module:
    """``model`` wrapped in :class:`FlipTTA` for ``mode`` (unchanged for ``none``)."""
    axes = tta_axes(mode, spatial_dims)
    return FlipTTA(model, axes, multilabel) if axes else model


def without_tta(model: nn.Module) -> nn.Module:
    """The network inside a :class:`FlipTTA` (for Grad-CAM, which needs one forward pass per input)."""
    return model.model if isinstance(model, FlipTTA) else model


def members(model: nn.Module) -> list[nn.Module]:
    """The single networks of a model: the fold members of an ensemble, else the model itself."""
    inner = without_tta(model)
    return list(inner.members) if isinstance(inner, FoldEnsemble) else [inner]


def build_network(info: dict[str, Any]) -> nn.Module:
    """The untrained network (fold ensemble when ``info['ensemble']``) described by ``model_info.json``.

    No pretrained weights are loaded (the trained state dict follows); TTA is not applied here.
    """
    from models import create_backbone

    def one() -> nn.Module:
        return create_backbone(
            info["backbone"],
            num_classes=int(info["num_classes"]),
            in_chans=int(info.get("in_chans", 1)),
            spatial_dims=int(info["spatial_dims"]),
            pretrained=False,
        )

    ens = info.get("ensemble")
    multilabel = info.get("task") == "multilabel"
    return FoldEnsemble([one() for _ in range(int(ens["folds"]))], multilabel) if ens else one()
