"""Deterministic preprocessing: a cached volume -> the network's input tensor.

Axis order: the input volume is in NIfTI voxel order ``(X, Y, Z[, C/T])`` (see ``pipeline.ingest.volume``).
The output is channel-first in PyTorch order: ``(C, H, W)`` = ``(C, Y, X)`` for 2D and
``(C, D, H, W)`` = ``(C, Z, Y, X)`` for 3D (MedicalNet's D, H, W order). ``C`` is 1 (grey: colour exports
become luminance and the backbone's first convolution sums its RGB kernels), 3 (``preprocess.channels``:
colour kept, grey replicated; the backbone's own RGB stem and per-channel mean/std) or the number of named
channels of multi-image cases (``data.channels``: the cached volume's 4th axis, ``axis4 = "channels"``).

Normalisation rule: colour channels share one intensity scale (hues are kept); named channels (MR sequences,
CT kernels) are each scaled on their own by the intensity policy, then by the backbone's mean/std cycled over
the channels (as the adapted first convolution cycles its RGB kernels).

Steps (all derived from the config and the backbone's preprocessing spec, never typed in by hand):
intensity policy -> pad to a square/cube around the centre -> resize to ``image_size`` -> normalise with the
backbone's mean/std.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

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
    mean: float | tuple[float, ...]
    std: float | tuple[float, ...]
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    channels: int = 1
    target_spacing: tuple[float, float, float] | None = None  # 3D: voxel size (mm) in RAS axis order
    channel_names: tuple[str, ...] = ()  # data.channels: one named image per input channel, in order

    def to_dict(self) -> dict:
        out = asdict(self)
        if not self.channel_names:  # one image per case: the spec as recorded before data.channels existed
            out.pop("channel_names")
        return out


def colour_counts(rows: list[dict[str, str]], cache: Path) -> dict[str, Any]:
    """How many manifest cases are colour images (``axis4 == "rgb"`` in the cached volume's sidecar); with
    multi-image cases (``axis4 == "channels"``), also their ``channel_names``."""
    colour = grey = 0
    names: list[str] | None = None
    for r in rows:
        try:
            meta = json.loads((cache / r["volume"]).with_suffix(".json").read_text())
        except (OSError, ValueError, KeyError):
            continue  # unreadable sidecars are reported by the preprocessing loop
        if meta.get("axis4") == "rgb":
            colour += 1
        else:
            grey += 1
        if meta.get("axis4") == "channels" and names is None:
            names = list(meta.get("channel_names") or [])
    out: dict[str, Any] = {"colour": colour, "grey": grey, "share": colour / max(colour + grey, 1)}
    if names:
        out["channel_names"] = names
    return out


def channel_count(
    cfg: PreprocessConfig, colour_share: float, backbone_spec, channel_names: tuple[str, ...] | list[str] = ()
) -> int:
    """Input channels: one per named channel of multi-image cases (``data.channels``); else ``rgb`` -> 3,
    ``grey`` -> 1, ``auto`` -> 3 when at least half of the cases are colour and the backbone has a
    three-channel stem (MedicalNet has one), else 1."""
    if channel_names:
        return len(channel_names)
    if cfg.channels == "rgb":
        return 3
    if cfg.channels == "grey":
        return 1
    return 3 if colour_share >= 0.5 and getattr(backbone_spec, "in_chans", 1) == 3 else 1


def make_spec(
    cfg: PreprocessConfig,
    backbone_spec,
    channels: int = 1,
    target_spacing: tuple[float, ...] | None = None,
    channel_names: tuple[str, ...] | list[str] = (),
) -> PreprocessSpec:
    """Derive the preprocessing from the config and the backbone's spec (``models.BackboneSpec``).

    ``intensity: auto`` follows the backbone: ``zscore_nonzero`` for MedicalNet, otherwise robust min-max
    to [0, 1] then the backbone's mean/std (averaged over its channels when the input has one channel).
    Colour input (``channels`` 3) keeps the per-channel mean/std and, for ``auto``, the 8-bit window
    [0, 255] over all channels at once: a per-image, per-channel min-max would change the hues.
    Named channels (``channel_names``, one per input channel) are scaled per channel, then normalised by
    the backbone's mean/std cycled over the channels (``BackboneSpec.with_in_chans``).
    """
    intensity = cfg.intensity
    window = tuple(cfg.window) if cfg.window else None
    if channel_names:
        if len(channel_names) != channels:
            raise ValueError(f"make_spec: {channels} channels but {len(channel_names)} channel names")
        if intensity == "auto":
            intensity = "zscore_nonzero" if backbone_spec.intensity == "zscore_nonzero" else "minmax"
        if intensity == "zscore_nonzero":
            mean, std = (0.0,) * channels, (1.0,) * channels
        else:
            adapted = backbone_spec.with_in_chans(channels)
            mean = tuple(float(v) for v in np.broadcast_to(adapted.mean, (channels,)))
            std = tuple(float(v) for v in np.broadcast_to(adapted.std, (channels,)))
    else:
        if intensity == "auto" and channels == 3:
            intensity, window = "window", window or (0.0, 255.0)
        elif intensity == "auto":
            intensity = "zscore_nonzero" if backbone_spec.intensity == "zscore_nonzero" else "minmax"
        if intensity == "zscore_nonzero":
            mean, std = (0.0, 1.0) if channels == 1 else ((0.0,) * channels, (1.0,) * channels)
        elif channels == 3:
            mean = tuple(float(v) for v in np.broadcast_to(backbone_spec.mean, (3,)))
            std = tuple(float(v) for v in np.broadcast_to(backbone_spec.std, (3,)))
        else:
            mean = float(np.mean(backbone_spec.mean))
            std = float(np.mean(backbone_spec.std))
    return PreprocessSpec(
        spatial_dims=cfg.spatial_dims,
        image_size=cfg.image_size,
        intensity=intensity,
        window=window,
        mean=mean,
        std=std,
        channels=channels,
        target_spacing=tuple(float(v) for v in target_spacing) if target_spacing is not None else None,
        channel_names=tuple(channel_names),
    )


#: Voxel sizes outside this range (mm) are not physical: the volume is rejected (code ``bad_spacing``).
SPACING_RANGE = (0.01, 50.0)


def ras_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size (mm) along R, A, S of a volume with this RAS+ affine (axes matched by nibabel's
    ``io_orientation``, the closest canonical orientation)."""
    import nibabel as nib

    a = np.asarray(affine, dtype=np.float64)
    sizes = np.linalg.norm(a[:3, :3], axis=0)
    ornt = nib.orientations.io_orientation(a)
    out = np.empty(3)
    for i, (axis, _flip) in enumerate(ornt):
        out[int(axis)] = sizes[i]
    return out


def check_spacing(affine: Any, case: str = "volume") -> np.ndarray:
    """The RAS voxel size of a 3D volume, or IngestError ``bad_spacing`` (missing, zero, out of range)."""
    a = np.asarray(affine, dtype=np.float64) if affine is not None else None
    if a is None or a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise IngestError(f"{case}: no usable affine; a 3D volume needs its voxel spacing", code="bad_spacing")
    sp = np.linalg.norm(a[:3, :3], axis=0)
    lo, hi = SPACING_RANGE
    if np.any(sp < lo) or np.any(sp > hi):
        raise IngestError(
            f"{case}: voxel spacing {np.round(sp, 4).tolist()} mm outside [{lo}, {hi}] mm; expected a physical spacing",
            code="bad_spacing",
        )
    return ras_spacing(a)


def target_spacing_of(spacings: list[np.ndarray]) -> tuple[float, float, float]:
    """The default target spacing: the per-axis median of the training cases' RAS spacings (as nnU-Net)."""
    if not spacings:
        raise IngestError("no training volume with a usable spacing to derive preprocess.target_spacing", code="bad_spacing")
    med = np.median(np.stack(spacings), axis=0)
    return tuple(float(round(v, 4)) for v in med)  # type: ignore[return-value]


def to_physical(vol: np.ndarray, affine: Any, target: tuple[float, ...]) -> np.ndarray:
    """Reorient a channel-last volume ``(X, Y, Z, C)`` to RAS and resample it to ``target`` mm (MONAI
    ``Orientation`` + ``Spacing`` on a MetaTensor, bilinear for images); returns ``(R, A, S, C)``."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    t = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(np.moveaxis(vol, -1, 0), dtype=np.float32)),
        affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    )
    t = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(t)
    t = Spacing(pixdim=tuple(target), mode="bilinear", padding_mode="border")(t)
    return np.moveaxis(np.asarray(t.as_tensor().numpy(), dtype=np.float32), 0, -1)


def to_rgb(array: np.ndarray, axis4: str | None) -> np.ndarray:
    """A volume as ``(X, Y, Z, 3)``: colour kept (alpha dropped), grey replicated to three channels."""
    if array.ndim == 4 and axis4 == "rgb" and array.shape[3] in (3, 4):
        return array[..., :3]
    grey = to_single_channel(array, axis4)
    return np.repeat(grey[..., None], 3, axis=3)


def to_single_channel(array: np.ndarray, axis4: str | None) -> np.ndarray:
    """Reduce a volume to ``(X, Y, Z)``: RGB -> luminance; a 4D series keeps its first volume."""
    if array.ndim == 3:
        return array
    if array.ndim == 4 and axis4 == "rgb" and array.shape[3] in (3, 4):
        return np.tensordot(array[..., :3].astype(np.float32), LUMA, axes=([3], [0]))
    if array.ndim == 4:
        return array[..., 0]
    raise IngestError(f"volume has shape {array.shape}; expected (X, Y, Z) or (X, Y, Z, C/T)", code="bad_shape")


def named_channels(array: np.ndarray, axis4: str | None, spec: PreprocessSpec) -> np.ndarray:
    """A multi-image case's cached volume ``(X, Y, Z, C)`` checked against the spec's named channels.

    Raises:
        IngestError: code ``channel_count_mismatch``: not a multi-channel case, or another channel count.
    """
    n = len(spec.channel_names)
    if array.ndim != 4 or axis4 != "channels" or array.shape[3] != n:
        got = f"{array.shape[3]} channel(s)" if array.ndim == 4 and axis4 == "channels" else "a single image"
        raise IngestError(
            f"input has {got}; expected the {n} named channels {list(spec.channel_names)} of a multi-image "
            "case "
            "(data.channels), combined by Ingest",
            code="channel_count_mismatch",
        )
    return array


def _intensity(x: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Intensity policy on the whole array (all channels at once for colour input)."""
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


def preprocess(array: np.ndarray, axis4: str | None, spec: PreprocessSpec, affine: Any = None) -> np.ndarray:
    """Turn a cached volume into a normalised float32 network input.

    Args:
        array: Voxels in NIfTI order ``(X, Y, Z[, C/T])``.
        axis4: What the 4th axis holds (``"rgb"``, ``"time"``, ...) or None.
        spec: The preprocessing spec.
        affine: The volume's 4x4 RAS+ affine; 3D specs with a ``target_spacing`` reorient to RAS and
            resample to it first (physical space, not array shape). 2D images need none.

    Returns:
        ``(C, S, S)`` for 2D or ``(C, S, S, S)`` for 3D, ``S = spec.image_size``, ``C = spec.channels``, in
        (Y, X) / (Z, Y, X) order.

    Raises:
        IngestError: A 3D volume was given to a 2D task (more than one slice), or the shape is unusable.
    """
    # torch and MONAI load here, not at import: the spec (make_spec, PreprocessSpec) is needed by code that
    # never resizes an image (planning, reading a trained model's facts).
    import torch
    from monai.transforms import Resize, SpatialPad

    # (X, Y, Z, C): C = 1 (grey), 3 (colour kept, grey replicated) or the named channels of the case
    if spec.channel_names:
        vol = named_channels(array, axis4, spec)
    else:
        vol = to_rgb(array, axis4) if spec.channels == 3 else to_single_channel(array, axis4)[..., None]
    if spec.spatial_dims == 2:
        if vol.shape[2] != 1:
            raise IngestError(
                f"preprocess.spatial_dims is 2 but the volume has {vol.shape[2]} slices (shape {vol.shape[:3]}); "
                "expected single-slice images, or set preprocess.spatial_dims: 3",
                code="wrong_dims",
            )
        img = vol[:, :, 0, :].transpose(2, 1, 0)  # (C, Y, X) = (channels, rows, columns)
    else:
        if min(vol.shape[:3]) < 2:
            raise IngestError(
                f"preprocess.spatial_dims is 3 but the volume has shape {vol.shape[:3]}; expected a 3D volume",
                code="wrong_dims",
            )
        if spec.target_spacing is not None:
            check_spacing(affine)
            vol = to_physical(vol, affine, spec.target_spacing)  # (R, A, S, C) at the target voxel size
        img = np.transpose(vol, (3, 2, 1, 0))  # (C, Z, Y, X) = (C, D, H, W)
    if spec.channel_names:  # each named channel on its own intensity scale (module doc)
        img = np.stack([_intensity(c, spec) for c in img])
    else:
        img = _intensity(img, spec)
    t = torch.from_numpy(np.ascontiguousarray(img))
    side = max(t.shape[1:])
    t = SpatialPad(spatial_size=[side] * spec.spatial_dims, mode="constant")(t)
    mode = "area" if side >= spec.image_size else ("bilinear" if spec.spatial_dims == 2 else "trilinear")
    t = Resize(spatial_size=[spec.image_size] * spec.spatial_dims, mode=mode)(t)
    t = torch.as_tensor(t)
    shape = (-1,) + (1,) * spec.spatial_dims
    mean = torch.as_tensor(spec.mean, dtype=t.dtype).reshape(shape)
    std = torch.as_tensor(spec.std, dtype=t.dtype).reshape(shape)
    return ((t - mean) / std).numpy().astype(np.float32)
