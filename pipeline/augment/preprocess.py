"""Deterministic preprocessing: a cached volume -> the network's input tensor.

Axis order: the input volume is in NIfTI voxel order ``(X, Y, Z[, C/T])`` (see ``pipeline.ingest.volume``).
The output is channel-first in PyTorch order: ``(1, H, W)`` = ``(1, Y, X)`` for 2D and
``(1, D, H, W)`` = ``(1, Z, Y, X)`` for 3D (MedicalNet's D, H, W order). Inputs are single-channel: RGB
exports are converted to luminance, so every modality uses one channel and the backbone's first convolution
is adapted once (summed RGB kernels).

Steps (all derived from the config and the backbone's preprocessing spec, never typed in by hand):
intensity policy -> pad to a square/cube around the centre -> resize to ``image_size`` -> normalise with the
backbone's mean/std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.config import PreprocessConfig
from pipeline.errors import IngestError

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything the deterministic preprocessing does, as recorded in ``transform_spec.json``."""

    spatial_dims: int
    image_size: int
    intensity: str  # minmax | window | zscore_nonzero
    window: tuple[float, float] | None
    mean: float
    std: float
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    def to_dict(self) -> dict:
        return asdict(self)


def make_spec(cfg: PreprocessConfig, backbone_spec) -> PreprocessSpec:
    """Derive the preprocessing from the config and the backbone's spec (``models.BackboneSpec``).

    ``intensity: auto`` follows the backbone: ``zscore_nonzero`` for MedicalNet, otherwise robust min-max
    to [0, 1] then the backbone's mean/std (averaged over its channels, as the input has one channel).
    """
    intensity = cfg.intensity
    if intensity == "auto":
        intensity = "zscore_nonzero" if backbone_spec.intensity == "zscore_nonzero" else "minmax"
    if intensity == "zscore_nonzero":
        mean, std = 0.0, 1.0
    else:
        mean = float(np.mean(backbone_spec.mean))
        std = float(np.mean(backbone_spec.std))
    return PreprocessSpec(
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
        intensity=intensity,
        window=tuple(cfg.window) if cfg.window else None,
        mean=mean,
        std=std,
    )


def to_single_channel(array: np.ndarray, axis4: str | None) -> np.ndarray:
    """Reduce a volume to ``(X, Y, Z)``: RGB -> luminance; a 4D series keeps its first volume."""
    if array.ndim == 3:
        return array
    if array.ndim == 4 and axis4 == "rgb" and array.shape[3] in (3, 4):
        return np.tensordot(array[..., :3].astype(np.float32), LUMA, axes=([3], [0]))
    if array.ndim == 4:
        return array[..., 0]
    raise IngestError(f"volume has shape {array.shape}; expected (X, Y, Z) or (X, Y, Z, C/T)", code="bad_shape")


def _intensity(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    if spec.intensity == "window":
        lo, hi = spec.window  # type: ignore[misc]
        return (np.clip(x, lo, hi) - lo) / (hi - lo)
    if spec.intensity == "zscore_nonzero":
        nz = x[x != 0]
        if nz.size < 2:
            return np.zeros_like(x)
        mean, sd = float(nz.mean()), float(nz.std())
        if sd <= 1e-6 * max(abs(mean), 1.0):
            # Constant foreground (a binary mask, a label map with one value): z-scoring would send every
            # voxel to 0 and erase the shape. Keep the shape: foreground 1, background 0.
            return (x != 0).astype(np.float32)
        return np.where(x != 0, (x - mean) / sd, 0.0).astype(np.float32)
    lo, hi = np.percentile(x, spec.clip_percentiles)
    if hi <= lo:
        return np.zeros_like(x)
    return (np.clip(x, lo, hi) - lo) / (hi - lo)


def preprocess(array: np.ndarray, axis4: str | None, spec: PreprocessSpec) -> np.ndarray:
    """Turn a cached volume into a normalised float32 network input.

    Args:
        array: Voxels in NIfTI order ``(X, Y, Z[, C/T])``.
        axis4: What the 4th axis holds (``"rgb"``, ``"time"``, ...) or None.
        spec: The preprocessing spec.

    Returns:
        ``(1, S, S)`` for 2D or ``(1, S, S, S)`` for 3D, ``S = spec.image_size``, in (Y, X) / (Z, Y, X) order.

    Raises:
        IngestError: A 3D volume was given to a 2D task (more than one slice), or the shape is unusable.
    """
    # torch and MONAI load here, not at import: the spec (make_spec, PreprocessSpec) is needed by code that
    # never resizes an image (planning, reading a trained model's facts).
    import torch
    from monai.transforms import Resize, SpatialPad

    vol = to_single_channel(array, axis4)
    if spec.spatial_dims == 2:
        if vol.shape[2] != 1:
            raise IngestError(
                f"preprocess.spatial_dims is 2 but the volume has {vol.shape[2]} slices (shape {vol.shape}); "
                "expected single-slice images, or set preprocess.spatial_dims: 3",
                code="wrong_dims",
            )
        img = vol[:, :, 0].T  # (Y, X) = (rows, columns)
    else:
        if min(vol.shape) < 2:
            raise IngestError(
                f"preprocess.spatial_dims is 3 but the volume has shape {vol.shape}; expected a 3D volume",
                code="wrong_dims",
            )
        img = np.transpose(vol, (2, 1, 0))  # (Z, Y, X) = (D, H, W)
    img = _intensity(img, spec)
    t = torch.from_numpy(np.ascontiguousarray(img))[None]
    side = max(t.shape[1:])
    t = SpatialPad(spatial_size=[side] * spec.spatial_dims, mode="constant")(t)
    mode = "area" if side >= spec.image_size else ("bilinear" if spec.spatial_dims == 2 else "trilinear")
    t = Resize(spatial_size=[spec.image_size] * spec.spatial_dims, mode=mode)(t)
    t = torch.as_tensor(t)
    out = ((t - spec.mean) / spec.std).numpy().astype(np.float32)
    return out
