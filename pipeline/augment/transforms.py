"""Random training augmentation built from the config with MONAI transforms.

The random state is owned by the pipeline, never global: each training sample's transform is re-seeded
from ``(seed, epoch, index)`` (:func:`sample_seed`), so an epoch replays exactly whatever the number of
DataLoader workers, and a resumed run sees the same augmented samples as an uninterrupted one.
Inputs are channel-first tensors as produced by :mod:`pipeline.augment.preprocess`: ``(1, H, W)`` or
``(1, D, H, W)``.
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
    RandScaleIntensity,
    RandShiftIntensity,
)

from pipeline.config import AugmentConfig


def build_train_transform(cfg: AugmentConfig, spatial_dims: int, image_size: int) -> Compose:
    """MONAI Compose of the random transforms configured in ``augment``.

    Spatial: left-right flip (last axis = X), affine (rotation about the in-plane axis, zoom, shift).
    Intensity: contrast (gamma on the [0, 1]-shifted range), scale and shift, optional Gaussian noise.
    ``augment.translate`` is a fraction of ``image_size``; MONAI takes voxels.
    """
    ts: list[Any] = []
    if cfg.flip > 0:
        ts.append(RandFlip(prob=cfg.flip, spatial_axis=spatial_dims - 1))
    if cfg.rotate_deg > 0 or cfg.scale > 0 or cfg.translate > 0:
        rad = math.radians(cfg.rotate_deg)
        rotate = (rad,) if spatial_dims == 2 else (rad, 0.0, 0.0)
        ts.append(
            RandAffine(
                prob=cfg.prob,
                rotate_range=rotate,
                scale_range=(cfg.scale,) * spatial_dims,
                translate_range=(cfg.translate * image_size,) * spatial_dims,
                padding_mode="border",
                mode="bilinear",
            )
        )
    if cfg.intensity > 0:
        ts.append(RandAdjustContrast(prob=cfg.prob, gamma=(1 - cfg.intensity * 3, 1 + cfg.intensity * 3)))
        ts.append(RandScaleIntensity(prob=cfg.prob, factors=cfg.intensity))
        ts.append(RandShiftIntensity(prob=cfg.prob, offsets=cfg.intensity))
    if cfg.noise_std > 0:
        ts.append(RandGaussianNoise(prob=cfg.prob, std=cfg.noise_std))
    return Compose(ts)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Deterministic 32-bit seed of one sample's augmentation."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def apply(transform: Compose, x: np.ndarray, seed: int) -> np.ndarray:
    """Apply ``transform`` to one sample with its own RNG seeded by ``seed``; returns float32 numpy."""
    import torch

    transform.set_random_state(seed=seed)
    out = transform(torch.from_numpy(x))
    return np.asarray(torch.as_tensor(out), dtype=np.float32)


# Attributes that hold one sample's drawn values or helper objects, not parameters.
_SAMPLED_STATE = {"R", "randomize", "rand_affine_grid", "resampler", "gamma_value", "factor", "sampled_std"}


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
        out.append({"transform": f"monai.transforms.{type(t).__name__}", "params": params})
    return out
