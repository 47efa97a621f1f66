"""Grad-CAM explanations (Selvaraju et al. 2017) for 2D and 3D classifiers, and the report's overlay figure.

The class-activation map of class ``c`` at a convolutional layer with activations ``A_k`` (channels k) is
``ReLU(sum_k w_k A_k)`` with ``w_k`` the spatial mean of ``d logit_c / d A_k``; it is upsampled to the input
size and scaled to [0, 1]. The layer is chosen automatically: the last ``Conv2d``/``Conv3d`` whose output is
still at least ``min_size`` voxels along every spatial axis (the very last convolution of a small-input
network is often 1x1 or 2x2, which cannot localise anything). Written by hand rather than with
``monai.visualize.GradCAM`` because that needs the layer's dotted name, which differs per backbone family.

Overlays are drawn on the preprocessed tensors (never on source pixels) and captioned by pseudonymous
case ids only, so they carry no identifier.

Axis order: an input batch is (N, C, H, W) or (N, C, D, H, W); one map is (H, W) or (D, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["CamCase", "explanation_figure", "find_target_layer", "grad_cam", "select_cases"]


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


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: Sequence[int] | None = None, layer: nn.Module | None = None
) -> np.ndarray:
    """Grad-CAM maps of a batch.

    Args:
        model: The classifier; it is put in eval mode and its parameters are not changed.
        x: Inputs, (N, C, H, W) or (N, C, D, H, W).
        target: Class per case (default: the predicted class).
        layer: The convolution to explain (default: :func:`find_target_layer`).

    Returns:
        Maps scaled to [0, 1] per case, (N, H, W) or (N, D, H, W) (input size); an all-zero map means no
        positive evidence for the class was found at that layer.
    """
    model.eval()
    x = x.detach().float()
    layer = layer if layer is not None else find_target_layer(model, x)
    store: dict[str, torch.Tensor] = {}

    def fwd(_m, _i, out):
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(fwd)
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            cls = logits.argmax(1) if target is None else torch.as_tensor(list(target), device=logits.device)
            model.zero_grad(set_to_none=True)
            logits.gather(1, cls.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    act, grad = store["act"].detach(), store["grad"].detach()
    dims = tuple(range(2, act.dim()))
    weights = grad.mean(dim=dims, keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True)).float()
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    cam = torch.nn.functional.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[:, 0]
    flat = cam.reshape(cam.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scale = torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))
    cam = (cam - lo.view(-1, *([1] * (cam.dim() - 1)))) / scale.view(-1, *([1] * (cam.dim() - 1)))
    model.zero_grad(set_to_none=True)
    return cam.cpu().numpy()


@dataclass(frozen=True)
class CamCase:
    """One explained case: pseudonymous id, labels and its index in the split."""

    index: int
    case_id: str
    true_name: str
    pred_name: str
    prob: float
    correct: bool


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


def _middle_slices(vol: np.ndarray) -> list[np.ndarray]:
    d, h, w = vol.shape
    return [vol[d // 2], vol[:, h // 2, :], vol[:, :, w // 2]]


def explanation_figure(images: np.ndarray, cams: np.ndarray, cases: Sequence[CamCase]):
    """Overlay figure: each case's (first-channel) input in grey with its Grad-CAM map in colour.

    Args:
        images: Inputs, (N, C, H, W) or (N, C, D, H, W), in the order of ``cases``.
        cams: Maps from :func:`grad_cam`, (N, H, W) or (N, D, H, W).
        cases: The explained cases (captions use the pseudonymous case id only).

    Returns:
        A matplotlib figure (2D: one panel per case; 3D: a row of three orthogonal middle slices per case).
    """
    import matplotlib.pyplot as plt

    n = len(cases)
    three_d = cams.ndim == 4
    if three_d:
        fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.6 * n), squeeze=False)
    else:
        cols = min(n, 4) if n else 1
        rows = int(np.ceil(n / cols)) if n else 1
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, case in enumerate(cases):
        img = np.asarray(images[i][0], dtype=np.float32)
        pairs = (
            list(zip(_middle_slices(img), _middle_slices(cams[i]), strict=True))
            if three_d
            else [(img, cams[i])]
        )
        panel = axes[i] if three_d else [axes.ravel()[i]]
        for j, (ax, (im, cam)) in enumerate(zip(panel, pairs, strict=False)):
            ax.imshow(im, cmap="gray", interpolation="nearest")
            ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1, interpolation="bilinear")
            if j == 0:
                mark = "correct" if case.correct else "WRONG"
                ax.set_title(
                    f"{case.case_id[:16]}\n{mark}: true {case.true_name[:18]}\n"
                    f"predicted {case.pred_name[:18]} (p={case.prob:.2f})",
                    fontsize=7,
                    color="black" if case.correct else "firebrick",
                )
    fig.tight_layout(h_pad=1.2)
    return fig
