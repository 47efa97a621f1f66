"""Grad-CAM localises a known signal: a bright square in noise, learnt by a small CNN in a few steps.

The maps come from ``monai.visualize.GradCAM``; ``_reference_grad_cam`` keeps the earlier hand-written
implementation (forward hook + tensor gradient hook) as the reference the MONAI path must agree with.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluate.gradcam import find_target_layer, grad_cam, select_cases
from pipeline.report.plots import explanation_figure

SIZE, SQ = 32, 6


def _square_batch(rng: np.random.Generator, n: int, dims: int = 2):
    """Noise images; label 1 ones carry a bright SQ-wide square at a random place. Returns x, y, boxes."""
    shape = (n, 1) + (SIZE,) * dims
    x = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
    y = rng.integers(0, 2, size=n)
    boxes = []
    for i in range(n):
        corner = rng.integers(2, SIZE - SQ - 2, size=dims)
        boxes.append(corner)
        if y[i]:
            sl = tuple(slice(c, c + SQ) for c in corner)
            x[(i, 0) + sl] += 1.5
    return torch.from_numpy(x), torch.from_numpy(y), boxes


def _cnn(dims: int) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(
        conv(1, 8, 3, padding=1),
        nn.ReLU(),
        conv(8, 8, 3, padding=1),
        nn.ReLU(),
        pool,
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def _train(dims: int, steps: int, batch: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = _cnn(dims)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        x, y, _ = _square_batch(rng, batch, dims)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _peak_inside(cams: np.ndarray, boxes, dims: int) -> np.ndarray:
    out = []
    for cam, corner in zip(cams, boxes, strict=True):
        peak = np.unravel_index(np.argmax(cam), cam.shape)
        out.append(all(c <= p < c + SQ for p, c in zip(peak, corner, strict=True)))
    return np.array(out)


def test_2d_map_peaks_inside_the_square() -> None:
    model = _train(2, steps=120, batch=32)
    x, y, boxes = _square_batch(np.random.default_rng(123), 40)
    pos = np.flatnonzero(y.numpy() == 1)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"the CNN did not learn the square (accuracy {acc:.2f})"
    cams = grad_cam(model, x[pos], target=[1] * len(pos))
    assert cams.shape == (len(pos), SIZE, SIZE)
    assert cams.min() >= 0 and cams.max() <= 1
    inside = _peak_inside(cams, [boxes[i] for i in pos], 2)
    assert inside.mean() >= 0.9, f"peak inside the square for only {inside.mean():.0%} of positives"
    # The map depends on where the square is: a map of another image does not find this square.
    shuffled = _peak_inside(cams[::-1], [boxes[i] for i in pos], 2)
    assert shuffled.mean() < 0.5


def _fixed_3d() -> nn.Module:
    """A hand-set 3D network: a box filter thresholded by ReLU responds to the bright cube only."""
    model = _cnn(3)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[:, 0] = 1.0 / 27
        model[0].bias.fill_(-0.6)
        model[2].weight.zero_()
        for c in range(8):
            model[2].weight[c, c, 1, 1, 1] = 1.0
        model[2].bias.zero_()
        model[6].weight.copy_(torch.tensor([[-1.0] * 8, [1.0] * 8]))
        model[6].bias.zero_()
    return model.eval()


def test_3d_map_peaks_inside_the_cube() -> None:
    model = _fixed_3d()
    x, y, boxes = _square_batch(np.random.default_rng(7), 10, dims=3)
    pos = np.flatnonzero(y.numpy() == 1)
    assert len(pos) >= 3
    cams = grad_cam(model, x[pos], target=[1] * len(pos))
    assert cams.shape == (len(pos), SIZE, SIZE, SIZE)
    inside = _peak_inside(cams, [boxes[i] for i in pos], 3)
    assert inside.all(), f"peak inside the cube for only {inside.mean():.0%} of positives"
    fig = explanation_figure(
        x[pos[:2]].numpy(),
        cams[:2],
        select_cases(
            np.ones(2, int), np.array([[0.1, 0.9], [0.8, 0.2]]), ["case-a", "case-b"], ["neg", "pos"], 1
        ),
    )
    assert len([a for a in fig.axes if a.images]) == 6  # three middle slices per case


def test_target_layer_skips_collapsed_convolutions() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=16),
        nn.Flatten(),
        nn.LazyLinear(2),
    )
    model(torch.zeros(1, 1, 32, 32))
    layer = find_target_layer(model, torch.zeros(1, 1, 32, 32))
    assert layer is model[0]  # the strided conv's 1x1 output cannot localise


def test_model_is_left_unchanged_and_cases_are_selected_by_confidence() -> None:
    model = _cnn(2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_cam(model, torch.randn(3, 1, SIZE, SIZE))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.95, 0.05], [0.7, 0.3]])
    cases = select_cases(y, p, ["a", "b", "c", "d", "e"], ["n", "p"], 1)
    assert [(c.case_id, c.correct) for c in cases] == [("a", True), ("d", False)]


def _reference_grad_cam(model: nn.Module, x: torch.Tensor, target, layer: nn.Module) -> np.ndarray:
    """The earlier hand-written Grad-CAM (kept as the reference): per-case min-max scaled maps."""
    model.eval()
    x = x.detach().float()
    store: dict[str, torch.Tensor] = {}

    def fwd(_m, _i, out):
        store["act"] = out
        out.register_hook(lambda g: store.__setitem__("grad", g))

    handle = layer.register_forward_hook(fwd)
    try:
        with torch.enable_grad():
            logits = model(x.requires_grad_(True))
            cls = torch.as_tensor(list(target))
            model.zero_grad(set_to_none=True)
            logits.gather(1, cls.view(-1, 1)).sum().backward()
    finally:
        handle.remove()
    act, grad = store["act"].detach(), store["grad"].detach()
    weights = grad.mean(dim=tuple(range(2, act.dim())), keepdim=True)
    cam = torch.relu((weights * act).sum(1, keepdim=True)).float()
    mode = "bilinear" if cam.dim() == 4 else "trilinear"
    cam = torch.nn.functional.interpolate(cam, size=tuple(x.shape[2:]), mode=mode, align_corners=False)[:, 0]
    flat = cam.reshape(cam.shape[0], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scale = torch.where(hi - lo > 0, hi - lo, torch.ones_like(hi))
    cam = (cam - lo.view(-1, *([1] * (cam.dim() - 1)))) / scale.view(-1, *([1] * (cam.dim() - 1)))
    model.zero_grad(set_to_none=True)
    return cam.numpy()


def _hottest(cams: np.ndarray) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in np.unravel_index(np.argmax(c), c.shape)) for c in cams]


class _Ensemble(nn.Module):
    """Shaped like ``FoldEnsemble``: ``members`` and log of the mean softmax."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([torch.softmax(m(x), 1) for m in self.members]).mean(0)
        return torch.log(probs)


def test_monai_maps_match_the_reference_implementation() -> None:
    model = _train(2, steps=60, batch=32)
    x, y, _ = _square_batch(np.random.default_rng(5), 12)
    target = [int(t) for t in (1 - y).tolist()]  # mixed targets in one batch, some against the prediction
    ref = _reference_grad_cam(model, x, target, find_target_layer(model, x))
    cams = grad_cam(model, x, target=target)
    assert cams.shape == ref.shape and cams.min() >= 0 and cams.max() <= 1
    assert _hottest(cams) == _hottest(ref)
    np.testing.assert_allclose(cams, ref, atol=1e-4)
    model3 = _fixed_3d()
    x3, _, _ = _square_batch(np.random.default_rng(7), 4, dims=3)
    ref3 = _reference_grad_cam(model3, x3, [1] * 4, find_target_layer(model3, x3))
    assert _hottest(grad_cam(model3, x3, target=[1] * 4)) == _hottest(ref3)


def test_map_is_not_flipped_and_the_model_keeps_no_hook() -> None:
    model = _fixed_3d()
    x, y, boxes = _square_batch(np.random.default_rng(11), 6, dims=3)
    pos = np.flatnonzero(y.numpy() == 1)
    cams = grad_cam(model, x[pos], target=[1] * len(pos))
    # MONAI's default normaliser maps max to 0: the cube would be the coldest place, not the hottest.
    inside = _peak_inside(cams, [boxes[i] for i in pos], 3)
    assert inside.all()
    assert all(
        not m._forward_hooks and not m._backward_hooks and not getattr(m, "_forward_pre_hooks", {})
        for m in model.modules()
    )
    assert all(p.grad is None for p in model.parameters())


def test_fold_ensemble_averages_every_member() -> None:
    members = [_train(2, steps=40, batch=32, seed=s) for s in (1, 2)]
    ens = _Ensemble(members).eval()
    x, _, _ = _square_batch(np.random.default_rng(9), 6)
    with torch.no_grad():
        pred = ens(x).argmax(1).tolist()
    refs = [_reference_grad_cam(m, x, pred, find_target_layer(m, x)) for m in members]
    assert not np.allclose(refs[0], refs[1], atol=1e-3), "the members should differ"
    mean = np.mean(refs, axis=0)
    expect = (mean - mean.min(axis=(1, 2), keepdims=True)) / np.ptp(mean, axis=(1, 2), keepdims=True)
    cams = grad_cam(ens, x)  # target: the ensemble's predicted class
    assert _hottest(cams) == _hottest(expect)
    np.testing.assert_allclose(cams, expect, atol=1e-4)
    with pytest.raises(ValueError, match="ensemble"):
        grad_cam(ens, x, layer=members[0][0])
