"""Grad-CAM explanations (Selvaraju et al. 2017) for 2D and 3D classifiers, and the report's overlay figure.

The class-activation map of class ``c`` at a convolutional layer with activations ``A_k`` (channels k) is
``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``d logit_c / d A_k``; it is upsampled (bi/trilinear)
to the input size and scaled to [0, 1]. The maps come from ``monai.visualize.GradCAM``; the layer is chosen
automatically (MONAI wants its dotted name, which differs per backbone family): the last
``Conv2d``/``Conv3d`` whose output is still at least ``min_size`` voxels along every spatial axis (the very
last convolution of a small-input network is often 1x1 or 2x2, which cannot localise anything).

Two things MONAI does that this module undoes: its default post-processing maps (min, max) to (1, 0), which
flips the map (an explicit min-max scaling is passed instead); and its hooks are registered for good and it
switches the target layer's ``inplace`` off, so it explains a deep copy of each network, never the caller's.
A fold ensemble (a module with a ``members`` ModuleList) is explained member by member for the ensemble's
class, and the members' [0, 1] maps are averaged.

Overlays are drawn on the preprocessed tensors (never on source pixels) and captioned by pseudonymous
case ids only, so they carry no identifier.

Axis order: an input batch is (N, C, H, W) or (N, C, D, H, W); one map is (H, W) or (D, H, W).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["CamCase", "Explanation", "find_target_layer", "grad_cam", "select_cases"]


def find_target_layer(model: nn.Module, example: torch.Tensor, min_size: int = 4) -> nn.Module:
    """The last convolution whose output keeps at least ``min_size`` along every spatial axis.

    Args:
        model: The classifier (in eval mode).
        example: One input batch, (N, C, H, W) or (N, C, D, H, W), used to measure output sizes.
        min_size: Minimum spatial extent of the chosen layer's output.

    Raises:
        ValueError: If the model has no 2D/3D convolution.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError(f"model {type(model).__name__}: no Conv2d/Conv3d layer for Grad-CAM")
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: shapes.__setitem__(id(mod), tuple(out.shape[2:])))
        for m in convs
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    ran = [m for m in convs if id(m) in shapes]
    big = [m for m in ran if min(shapes[id(m)]) >= min_size]
    if big:
        return big[-1]
    return max(ran, key=lambda m: int(np.prod(shapes[id(m)])))


def min_max(cam: torch.Tensor) -> torch.Tensor:
    """Scale each map of a batch (N, 1, *spatial) to [0, 1]; a constant map becomes all zeros.

    Passed to ``monai.visualize.GradCAM`` as its post-processing because MONAI's default normaliser maps
    (min, max) to (1, 0), i.e. flips the map.
    """
    flat = cam.reshape(cam.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (cam.dim() - 1)
    span = (hi - lo).view(shape)
    return torch.where(span > 0, (cam - lo.view(shape)) / torch.where(span > 0, span, 1.0), 0.0)


def _module_name(model: nn.Module, layer: nn.Module) -> str:
    for name, mod in model.named_modules():
        if mod is layer:
            return name
    raise ValueError(
        f"Grad-CAM: the layer {type(layer).__name__} is not a submodule of {type(model).__name__}"
    )


def _network_cam(net: nn.Module, x: torch.Tensor, cls: torch.Tensor, layer: nn.Module | None) -> torch.Tensor:
    """[0, 1] maps (N, *spatial) of one network for the classes ``cls`` (N,), via MONAI's GradCAM."""
    from monai.visualize import GradCAM

    layer = layer if layer is not None else find_target_layer(net, x)
    name = _module_name(net, layer)
    # MONAI registers its hooks for good: explain a copy. In-place activations are switched off in the copy
    # (same values) because an in-place op on the target layer's output breaks its full backward hook.
    work = copy.deepcopy(net).eval()
    for mod in work.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    cam = GradCAM(work, target_layers=name, postprocessing=min_max)
    out = torch.zeros((x.shape[0],) + tuple(x.shape[2:]), device=x.device)
    for c in torch.unique(cls).tolist():  # MONAI explains one class index per call
        idx = torch.nonzero(cls == c).view(-1)
        xi = x[idx].clone().requires_grad_(True)  # gradients reach a frozen (linear-probe) backbone
        out[idx] = cam(xi, class_idx=int(c))[:, 0].detach().float()
    return out


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: Sequence[int] | None = None, layer: nn.Module | None = None
) -> np.ndarray:
    """Grad-CAM maps of a batch.

    Args:
        model: The classifier, or a fold ensemble (an ``nn.Module`` with a ``members`` ModuleList whose
            forward combines the members); it is put in eval mode and is not changed (no parameter, gradient
            or hook is left on it).
        x: Inputs, (N, C, H, W) or (N, C, D, H, W).
        target: Class per case (default: the class the model predicts).
        layer: The convolution to explain (default: :func:`find_target_layer`); for an ensemble, each
            member's layer is found automatically and this must be None.

    Returns:
        Maps scaled to [0, 1] per case, (N, H, W) or (N, D, H, W) (input size); an ensemble's map is the
        mean of its members' maps, rescaled. An all-zero map means no positive evidence for the class
        was found at that layer.
    """
    model.eval()
    x = x.detach().float()
    members = getattr(model, "members", None)
    nets = list(members) if members is not None and len(members) > 0 else [model]
    if layer is not None and len(nets) > 1:
        raise ValueError("Grad-CAM: layer must be None for a fold ensemble (each member's layer is found)")
    with torch.enable_grad():
        if target is None:
            with torch.no_grad():
                cls = model(x).argmax(1)
        else:
            cls = torch.as_tensor(list(target), dtype=torch.long, device=x.device)
        if cls.shape != (x.shape[0],):
            raise ValueError(f"Grad-CAM: expected {x.shape[0]} target classes, got {tuple(cls.shape)}")
        maps = torch.stack([_network_cam(net, x, cls, layer) for net in nets]).mean(0)
    return min_max(maps[:, None])[:, 0].cpu().numpy()


@dataclass(frozen=True)
class CamCase:
    """One explained case: pseudonymous id, labels and its index in the split."""

    index: int
    case_id: str
    true_name: str
    pred_name: str
    prob: float
    correct: bool


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM maps of some test cases, for the report to draw (the report draws, evaluate computes).

    Attributes:
        images: The explained model inputs, (N, C, H, W) or (N, C, D, H, W).
        cams: Their maps in [0, 1], (N, H, W) or (N, D, H, W).
        cases: The explained cases (pseudonymous ids, true and predicted class, probability).
        caption: What the figure shows.
    """

    images: np.ndarray
    cams: np.ndarray
    cases: Sequence[CamCase]
    caption: str


def select_cases(
    y: np.ndarray, probs: np.ndarray, case_ids: Sequence[str], class_names: Sequence[str], n: int
) -> list[CamCase]:
    """The ``n`` most confident correct and the ``n`` most confident wrong predictions (deterministic).

    Args:
        y: True class per case, (N,).
        probs: Probabilities, (N, K).
        case_ids: Pseudonymous case id per case.
        class_names: One name per class.
        n: Cases per group.
    """
    pred = probs.argmax(1)
    conf = probs.max(1)
    out = []
    for want_correct in (True, False):
        idx = np.flatnonzero((pred == y) == want_correct)
        idx = idx[np.lexsort((idx, -conf[idx]))][:n]
        out += [
            CamCase(
                int(i),
                str(case_ids[i]),
                class_names[int(y[i])],
                class_names[int(pred[i])],
                float(conf[i]),
                want_correct,
            )
            for i in idx
        ]
    return out
