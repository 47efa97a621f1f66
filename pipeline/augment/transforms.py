"""Random training augmentation built from the config with MONAI transforms.

The random state is owned by the pipeline, never global: each training sample's transform is re-seeded
from ``(seed, epoch, index)`` (:func:`sample_seed`), so an epoch replays exactly whatever the number of
DataLoader workers, and a resumed run sees the same augmented samples as an uninterrupted one.
Inputs are channel-first tensors as produced by :mod:`pipeline.augment.preprocess`: ``(C, H, W)`` or
``(C, D, H, W)``.

Presets (``augment.preset``) fill the fields a config leaves unset, per dimensionality (:data:`PRESETS`);
``ct`` adds :class:`RandWindowJitter`, a random narrowing/shift of the intensity window inside the range the
deterministic HU window left (CT windows themselves are preprocessing: ``preprocess.window``, with the usual
level/width pairs in :data:`HU_WINDOWS`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensity,
    RandShiftIntensity,
)

from pipeline.config import AugmentConfig

#: CT intensity windows in HU, (low, high) = (level - width / 2, level + width / 2), for ``preprocess.window``
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (0.0, 80.0),  # L 40 W 80
    "subdural": (-20.0, 180.0),  # L 80 W 200
    "stroke": (8.0, 48.0),  # L 28 W 40
    "soft_tissue": (-160.0, 240.0),  # L 40 W 400
    "abdomen": (-125.0, 225.0),  # L 50 W 350
    "liver": (-45.0, 105.0),  # L 30 W 150
    "mediastinum": (-125.0, 225.0),  # L 50 W 350
    "lung": (-1350.0, 150.0),  # L -600 W 1500
    "bone": (-450.0, 1050.0),  # L 300 W 1500
}

#: Field values of each preset, per spatial dimensionality; fields set in the config win.
PRESETS: dict[str, dict[int, dict[str, Any]]] = {
    "light": {
        2: dict(
            flip=0.5, rotate_deg=5.0, scale=0.05, translate=0.03, intensity=0.05, noise_std=0.0, colour=0.03,
            prob=0.5,
        ),
        3: dict(
            flip=0.5,
            rotate_deg=5.0,
            rotate_3d=False,
            scale=0.05,
            translate=0.03,
            intensity=0.05,
            noise_std=0.0,
            prob=0.5,
        ),
    },
    "standard": {
        2: dict(
            flip=0.5, rotate_deg=10.0, scale=0.1, translate=0.05, intensity=0.1, noise_std=0.0, colour=0.05,
            prob=0.8,
        ),
        3: dict(
            flip=0.5,
            rotate_deg=10.0,
            rotate_3d=True,
            scale=0.1,
            translate=0.05,
            intensity=0.1,
            noise_std=0.0,
            prob=0.8,
        ),
    },
    "strong": {
        2: dict(
            flip=0.5, rotate_deg=20.0, scale=0.15, translate=0.1, intensity=0.2, noise_std=0.05, colour=0.1,
            prob=0.8,
        ),
        3: dict(
            flip=0.5,
            flip_all_axes=True,
            rotate_deg=15.0,
            rotate_3d=True,
            scale=0.15,
            translate=0.08,
            intensity=0.15,
            noise_std=0.03,
            prob=0.8,
        ),
    },
    "ct": {
        2: dict(
            flip=0.5,
            rotate_deg=10.0,
            scale=0.1,
            translate=0.05,
            intensity=0.05,
            noise_std=0.02,
            window_jitter=0.1,
            prob=0.8,
        ),
        3: dict(
            flip=0.5,
            rotate_deg=10.0,
            rotate_3d=False,
            scale=0.1,
            translate=0.05,
            intensity=0.05,
            noise_std=0.02,
            window_jitter=0.1,
            prob=0.8,
        ),
    },
}


def resolve_preset(cfg: AugmentConfig, spatial_dims: int) -> AugmentConfig:
    """The effective augmentation: the preset's values for every field the config did not set itself."""
    if cfg.preset == "custom":
        return cfg
    values = PRESETS[cfg.preset][spatial_dims]
    update = {k: v for k, v in values.items() if k not in cfg.model_fields_set}
    return cfg.model_copy(update=update)


class RandWindowJitter(RandomizableTransform):
    """Random intensity window inside a sample's own range (CT window level/width jitter).

    The deterministic twin is :func:`rewindow`. With the sample's range ``[lo, hi]`` (what the
    preprocessing window left), the new window has centre ``0.5 + u1 * jitter`` and width
    ``1 - |u2| * jitter`` in units of ``hi - lo``; values are clipped to it and stretched
    back to ``[lo, hi]``.

    Args:
        prob: Probability of applying the transform.
        jitter: Maximum relative change of the level and width, in ``[0, 0.5]``.
    """

    def __init__(self, prob: float = 0.8, jitter: float = 0.1) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= jitter <= 0.5:
            raise ValueError(f"RandWindowJitter: jitter={jitter!r}; expected a number in [0, 0.5]")
        self.jitter = jitter
        self.centre = 0.5
        self.width = 1.0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        self.centre = 0.5 + self.R.uniform(-self.jitter, self.jitter)
        self.width = 1.0 - abs(self.R.uniform(-self.jitter, self.jitter))

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return rewindow(img, self.centre, self.width)


def rewindow(img: Any, centre: float, width: float) -> Any:
    """Clip ``img`` to the window ``centre +- width / 2`` (fractions of its range) and stretch it back."""
    import torch

    t = torch.as_tensor(img)
    lo, hi = float(t.min()), float(t.max())
    if hi <= lo:
        return img
    a = lo + (centre - width / 2) * (hi - lo)
    b = lo + (centre + width / 2) * (hi - lo)
    out = (t.clamp(a, b) - a) / (b - a) * (hi - lo) + lo
    return out


def build_train_transform(
    cfg: AugmentConfig, spatial_dims: int, image_size: int, channels: int = 1, colour: bool | None = None
) -> Compose:
    """MONAI Compose of the random transforms configured in ``augment`` (preset resolved first).

    Spatial: left-right flip (last axis = X; all axes with ``flip_all_axes``), affine (rotation about the
    in-plane axis, or all three with ``rotate_3d``; zoom, shift). Intensity: window jitter (``ct``),
    contrast (gamma on the [0, 1]-shifted range), scale and shift, optional Gaussian noise; colour input
    (``colour``; by default ``channels`` 3) also gets :class:`RandColourJitter`. Named channels of
    multi-image cases (``data.channels``: pass ``colour=False``) are never colour-jittered: mixing MR
    sequences as if they were hues is meaningless. Every transform sees the whole channel-first tensor, so
    all channels share one flip and one affine grid. ``augment.translate`` is a fraction of ``image_size``;
    MONAI takes voxels.
    """
    cfg = resolve_preset(cfg, spatial_dims)
    colour = channels == 3 if colour is None else colour and channels == 3
    ts: list[Any] = []
    if cfg.flip > 0:
        axes = range(spatial_dims) if cfg.flip_all_axes else [spatial_dims - 1]
        for axis in axes:
            ts.append(RandFlip(prob=cfg.flip, spatial_axis=axis))
    if cfg.rotate_deg > 0 or cfg.scale > 0 or cfg.translate > 0:
        rad = math.radians(cfg.rotate_deg)
        if spatial_dims == 2:
            rotate: tuple[float, ...] = (rad,)
        else:
            rotate = (rad, rad, rad) if cfg.rotate_3d else (rad, 0.0, 0.0)
        ts.append(
            RandAffine(
                prob=cfg.prob,
                rotate_range=rotate,
                scale_range=(cfg.scale,) * spatial_dims,
                translate_range=(cfg.translate * image_size,) * spatial_dims,
                padding_mode="border",
                mode="bilinear",
                spatial_size=(image_size,) * spatial_dims,
                cache_grid=True,
            )
        )
    if cfg.window_jitter > 0:
        ts.append(RandWindowJitter(prob=cfg.prob, jitter=cfg.window_jitter))
    if cfg.intensity > 0:
        ts.append(RandAdjustContrast(prob=cfg.prob, gamma=(1 - cfg.intensity * 3, 1 + cfg.intensity * 3)))
        ts.append(RandScaleIntensity(prob=cfg.prob, factors=cfg.intensity))
        ts.append(RandShiftIntensity(prob=cfg.prob, offsets=cfg.intensity))
    if colour and cfg.colour > 0:
        ts.append(RandColourJitter(prob=cfg.prob, strength=cfg.colour))
    if cfg.noise_std > 0:
        ts.append(RandGaussianNoise(prob=cfg.prob, std=cfg.noise_std))
    return Compose(ts)


class RandColourJitter(RandomizableTransform):
    """Brightness, contrast, saturation and hue jitter of a three-channel image ``(3, ...)``.

    Written here (not torchvision's ``ColorJitter``) so the draw comes from the pipeline-owned MONAI
    random state like every other transform, and so it works on the normalised tensors of the cache (equal
    mean/std per channel make these operations commute with the normalisation up to a shift). With
    ``strength`` s: brightness adds ``u * s``, contrast and saturation scale by ``1 + u * s`` around the
    image mean and the per-pixel grey value, and hue turns the chroma by ``u * s * 180`` degrees about the
    grey axis (a rotation of RGB space about (1, 1, 1), the classic hue-rotation matrix). ``u`` in
    [-1, 1] independently per operation.

    Args:
        prob: Probability of applying the transform.
        strength: Jitter strength in ``[0, 0.5]``.
    """

    def __init__(self, prob: float = 0.8, strength: float = 0.05) -> None:
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= strength <= 0.5:
            raise ValueError(f"RandColourJitter: strength={strength!r}; expected a number in [0, 0.5]")
        self.strength = strength
        self.params = (0.0, 1.0, 1.0, 0.0)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        if not self._do_transform:
            return
        u = self.R.uniform(-1.0, 1.0, 4)
        s = self.strength
        self.params = (u[0] * s, 1 + u[1] * s, 1 + u[2] * s, u[3] * s * math.pi)

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize()
        if not self._do_transform:
            return img
        return colour_jitter(img, *self.params)


def colour_jitter(img: Any, brightness: float, contrast: float, saturation: float, hue: float) -> Any:
    """The deterministic twin of :class:`RandColourJitter` on a ``(3, ...)`` tensor."""
    import torch

    t = torch.as_tensor(img)
    if t.shape[0] != 3:
        raise ValueError(f"colour jitter needs a three-channel image (3, ...); got shape {tuple(t.shape)}")
    t = t + brightness
    t = (t - t.mean()) * contrast + t.mean()
    grey = t.mean(dim=0, keepdim=True)
    t = grey + (t - grey) * saturation
    c, s_ = math.cos(hue), math.sin(hue)
    k = 1.0 / 3.0
    r3 = math.sqrt(k)
    rot = torch.tensor(  # rotation by ``hue`` about the (1, 1, 1) axis of RGB space
        [
            [c + (1 - c) * k, k * (1 - c) - r3 * s_, k * (1 - c) + r3 * s_],
            [k * (1 - c) + r3 * s_, c + (1 - c) * k, k * (1 - c) - r3 * s_],
            [k * (1 - c) - r3 * s_, k * (1 - c) + r3 * s_, c + (1 - c) * k],
        ],
        dtype=t.dtype,
    )
    return torch.einsum("ij,j...->i...", rot, t)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 32-bit seed of one sample's augmentation."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _sample_rng(transform: Compose) -> np.random.RandomState:
    """One ``RandomState`` shared by every random transform of ``transform`` (bound once, MONAI's API).

    Re-seeding it costs about 1 us per sample; ``Compose.set_random_state(seed)`` builds a new
    ``RandomState`` per transform per sample (seven for ``standard``, about 40% of the augmentation time).
    The transforms draw from it in their fixed order, so a seed still fixes a sample's augmentation.
    """
    rs = getattr(transform, "_medtl_rng", None)
    if rs is None:
        rs = np.random.RandomState(0)
        for t in transform.transforms:
            if isinstance(t, Randomizable):
                t.set_random_state(state=rs)  # RandAffine passes it on to its RandAffineGrid
        transform._medtl_rng = rs
    return rs


def apply(transform: Compose, x: np.ndarray, seed: int) -> np.ndarray:
    """Apply ``transform`` to one sample with its own RNG seeded by ``seed``; returns float32 numpy.

    MONAI's metadata tracking is switched off for the call (and restored): plain tensors go in and come
    out, and skipping the MetaTensor bookkeeping halves the per-sample cost.
    """
    import torch
    from monai.data import get_track_meta, set_track_meta

    _sample_rng(transform).seed(seed)
    previous = get_track_meta()
    set_track_meta(False)
    try:
        out = transform(torch.from_numpy(x))
    finally:
        set_track_meta(previous)
    return np.asarray(torch.as_tensor(out), dtype=np.float32)


# Attributes that hold one sample's drawn values or helper objects, not parameters.
_SAMPLED_STATE = {
    "R",
    "randomize",
    "rand_affine_grid",
    "resampler",
    "gamma_value",
    "factor",
    "sampled_std",
    "centre",
    "width",
}


def describe(transform: Compose) -> list[dict[str, Any]]:
    """JSON-able description of the transforms and their parameters (for ``transform_spec.json``)."""
    out = []
    for t in transform.transforms:
        params = {}
        for k, v in vars(t).items():
            if k.startswith("_") or k in _SAMPLED_STATE:
                continue
            if isinstance(v, (int, float, str, bool, type(None))):
                params[k] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(e, (int, float)) for e in np.ravel(v)):
                params[k] = np.asarray(v, dtype=float).tolist()
        if isinstance(t, RandAffine):
            g = t.rand_affine_grid
            params.update(
                rotate_range=np.asarray(g.rotate_range, dtype=float).tolist(),
                scale_range=np.asarray(g.scale_range, dtype=float).tolist(),
                translate_range=np.asarray(g.translate_range, dtype=float).tolist(),
                padding_mode=str(t.padding_mode),
            )
        module = "monai.transforms" if type(t).__module__.startswith("monai") else type(t).__module__
        out.append({"transform": f"{module}.{type(t).__name__}", "params": params})
    return out
