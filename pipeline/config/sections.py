"""Config sections of the data side: task, data, split, ingest, deid, preprocess, augment, model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

SPLITS = ("train", "val", "calibration", "test")
ID_TYPES = ("path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Section):
    """What is predicted.

    Attributes:
        kind: ``binary``, ``multiclass``, ``ordinal`` (ordered classes, label values 0..K-1 in order) or
            ``multilabel`` (findings that co-occur: one sigmoid output per finding).
        classes: Label value (as written in the labels CSV) -> class name, in class order. For
            ``multilabel``: labels-CSV column -> finding name, one column per finding (each cell 0/1, see
            :mod:`pipeline.ingest.labels`); ``data.label_column`` is then not used.
        positive_class: For binary tasks, the class whose detection "sensitivity" measures (name or label
            value). For BreastMNIST, ``malignant`` (label 0). Not allowed for ``multilabel`` (every finding
            is its own positive class).
    """

    kind: Literal["binary", "multiclass", "ordinal", "multilabel"]
    classes: dict[str, str] = Field(min_length=2)
    positive_class: str | None = None

    @field_validator("classes", mode="before")
    @classmethod
    def _stringify(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): str(val) for k, val in v.items()}
        if isinstance(v, list):
            return {str(i): str(name) for i, name in enumerate(v)}
        return v

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        names = list(self.classes.values())
        if len(set(names)) != len(names):
            raise ValueError(f"task.classes: class names must be unique, got {names}")
        if self.kind == "binary":
            if len(self.classes) != 2:
                raise ValueError(
                    f"task.classes: a binary task needs exactly 2 classes, got {len(self.classes)} "
                    f"({self.classes})"
                )
            if self.positive_class is None:
                raise ValueError(
                    "task.positive_class: required for a binary task; expected one of "
                    f"{names + list(self.classes)}"
                )
        if self.kind == "multilabel":
            if self.positive_class is not None:
                raise ValueError(
                    "task.positive_class: not used by a multilabel task (every finding is its own positive "
                    "class); remove it"
                )
            cols = [c.strip() for c in self.classes]
            if "" in cols or len(set(cols)) != len(cols):
                raise ValueError(
                    f"task.classes: a multilabel task maps labels-CSV columns to finding names; expected "
                    f"distinct, non-empty column names, got {list(self.classes)}"
                )
        if self.positive_class is not None and self.positive_class not in names + list(self.classes):
            raise ValueError(
                f"task.positive_class: {self.positive_class!r} is not a class; expected one of "
                f"names {names} or label values {list(self.classes)}"
            )
        return self

    @property
    def class_names(self) -> list[str]:
        return list(self.classes.values())

    @property
    def label_values(self) -> list[str]:
        return list(self.classes)

    @property
    def multilabel(self) -> bool:
        return self.kind == "multilabel"

    @property
    def finding_columns(self) -> dict[str, str]:
        """Multilabel tasks: finding name -> labels-CSV column, in output order (empty otherwise)."""
        return {name: col for col, name in self.classes.items()} if self.multilabel else {}

    @property
    def positive_index(self) -> int | None:
        """Column index of the positive class, or None."""
        if self.positive_class is None:
            return None
        if self.positive_class in self.classes.values():
            return self.class_names.index(self.positive_class)
        return self.label_values.index(self.positive_class)


class ChannelConfig(_Section):
    """One named input channel of a multi-image case (``data.channels``): selects ONE image of the case.

    Attributes:
        name: The channel's name (letters, digits, ``_ . -``), recorded in the trained model.
        series_description: DICOM sources: a regular expression searched (case-insensitive) in the
            SeriesDescription (0008,103E) of the case's series; exactly one series must match.
        column: NIfTI/PNG sources: a labels-CSV column holding the image's path relative to
            ``data.source``.
        volume: A 4D series (time/echo): which volume to take (0-based). Unset: the first, and the case is
            flagged ``4d_first_volume_only`` when the series has more than one.
    """

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    series_description: str | None = Field(None, min_length=1)
    column: str | None = Field(None, min_length=1)
    volume: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ChannelConfig:
        if (self.series_description is None) == (self.column is None):
            raise ValueError(
                f"channel {self.name!r}: set exactly one of series_description (a DICOM SeriesDescription "
                "pattern) or column (a labels-CSV column of paths)"
            )
        if self.series_description is not None:
            import re

            try:
                re.compile(self.series_description)
            except re.error as err:
                raise ValueError(
                    f"channel {self.name!r}: series_description is not a valid regular expression ({err}); "
                    "expected a Python regex such as 't1' or 'flair|t2.*fl'"
                ) from err
        return self


class DataConfig(_Section):
    """Where the images and labels are.

    Attributes:
        source: Folder of DICOM / NIfTI / PNG-JPEG files (searched recursively), relative to the config file.
        labels_csv: CSV with one row per case, relative to the config file.
        id_column: Column of the labels CSV that identifies the case.
        id_type: What ``id_column`` holds: a file path relative to ``source`` (``path``), or a DICOM
            identifier (PatientID, StudyInstanceUID, SeriesInstanceUID, AccessionNumber).
        label_column: Column with the label value (a key of ``task.classes``).
        split_column: Optional column fixing each case's split (train, val, calibration, test); rows left
            empty fall back to the hashed rule.
        patient_column: Optional column with the patient identifier, for sources without DICOM headers
            (NIfTI, PNG); hashed into a pseudonym like PatientID.
        group_columns: Optional extra CSV columns (e.g. site) kept, pseudonymised of nothing, as subgroups.
        kinds: Which file kinds to ingest.
        channels: Several images per case (:class:`ChannelConfig`, e.g. T1, T2, FLAIR; CT in two kernels).
            Empty (the default): one image per case. Set: the case is the label row's id (``id_type``:
            all series sharing that StudyInstanceUID / PatientID / AccessionNumber, or the folder named by a
            ``path``; with ``column`` channels, the CSV row); each channel selects one image of it, decoded
            as usual, then resampled (MONAI, world space) onto the FIRST channel's grid and cached as one
            multi-channel volume. Per-case codes: ``missing_channel``, ``ambiguous_channel``,
            ``channel_grid_mismatch`` (a channel covers under 50% of the first channel's field of view).
            The network gets one input channel per entry (``in_chans = len(channels)``), each normalised
            ON ITS OWN (the intensity policy per channel, then the backbone's mean/std cycled over the
            channels): sequences such as T1 and T2 have unrelated intensity scales, unlike the channels of
            a colour photograph, which share one scale so hues are kept. All channels share every spatial
            augmentation; colour jitter is never applied to them.
    """

    source: Path
    labels_csv: Path
    id_column: str = "path"
    id_type: Literal["path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber"] = "path"
    label_column: str = "label"
    split_column: str | None = None
    patient_column: str | None = None
    group_columns: tuple[str, ...] = ()
    kinds: tuple[Literal["dicom", "nifti", "image"], ...] = ("dicom", "nifti", "image")
    channels: tuple[ChannelConfig, ...] = ()

    @model_validator(mode="after")
    def _check_channels(self) -> DataConfig:
        names = [c.name for c in self.channels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.channels: channel names {dup} appear more than once; expected unique names")
        if len({c.column is None for c in self.channels}) > 1:
            raise ValueError(
                "data.channels: mixes series_description and column channels; expected all channels of a case "
                "to be chosen the same way (DICOM series by description, or CSV path columns)"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_no_channels(self, handler: Any) -> dict[str, Any]:
        # Without channels the dump (and so every stage digest and published config) is what it was
        # before data.channels existed: existing workspaces keep their folders.
        out = handler(self)
        if not self.channels and isinstance(out, dict):
            out.pop("channels", None)
        return out


class SplitConfig(_Section):
    """Patient-level split fractions (the rest is train), stratified by label and stable as data grows.

    Assignments are kept in the workspace's private split ledger: a patient never moves once placed; new
    patients are placed in keyed-hash order into the split with the largest deficit of their stratum,
    keeping each class's patient counts per split within one patient of ``share * n`` (see
    :mod:`pipeline.ingest.splits`). A fixed ``data.split_column`` still wins for its rows.

    Attributes:
        val: Share of patients for validation (early stopping, thresholds).
        calibration: Share for post-hoc calibration and conformal prediction.
        test: Share for the final, reported evaluation.
        calibration_from_train: With a fixed split column, the share of ``train`` patients moved to
            ``calibration`` (hashed, stable) when the column names no calibration cases.
        stratify_by: Labels CSV columns (e.g. ``[site]``) whose values stratify the splits within each
            class, besides the label; empty = by label only. Their values never leave ``private/``.
    """

    val: float = Field(0.15, ge=0.0, lt=1.0)
    calibration: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    calibration_from_train: float = Field(0.15, ge=0.0, lt=1.0)
    stratify_by: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check(self) -> SplitConfig:
        total = self.val + self.calibration + self.test
        if total >= 0.9:
            raise ValueError(
                f"split: val + calibration + test = {total:.2f}; expected < 0.9 so that training keeps "
                "at least 10% of patients"
            )
        return self


class IngestConfig(_Section):
    """Ingestion options.

    Attributes:
        tilt: Gantry-tilted CT series: ``correct`` (resample onto an orthogonal grid) or ``refuse``.
        uneven_spacing: Unevenly spaced series: ``resample`` or ``refuse``.
        processes: Decoder processes (not hashed; distinct from Luigi's ``--workers``).
        mask_regions: Boxes ``[x0, y0, x1, y1]`` in pixel coordinates (x = column, y = row, end exclusive)
            blanked in 2D images flagged for pixel review (US, SC, BurnedInAnnotation YES) before caching,
            e.g. where a scanner burns in the patient's name. Empty = no masking (cases are still flagged).
    """

    tilt: Literal["correct", "refuse"] = "correct"
    uneven_spacing: Literal["resample", "refuse"] = "resample"
    processes: int = Field(1, ge=1, le=64)
    mask_regions: tuple[tuple[int, int, int, int], ...] = ()

    @field_validator("mask_regions")
    @classmethod
    def _check_regions(cls, v: tuple[tuple[int, int, int, int], ...]) -> tuple[tuple[int, int, int, int], ...]:
        for i, (x0, y0, x1, y1) in enumerate(v):
            if not (0 <= x0 < x1 and 0 <= y0 < y1):
                raise ValueError(
                    f"ingest.mask_regions[{i}]: {[x0, y0, x1, y1]}; expected [x0, y0, x1, y1] with "
                    "0 <= x0 < x1 and 0 <= y0 < y1 (pixels)"
                )
        return v


class DeidConfig(_Section):
    """De-identification.

    Attributes:
        key_env: Environment variable holding the pseudonymisation key; unset means a key file created
            once in the workspace's ``private/`` folder.
    """

    key_env: str | None = None


class PreprocessConfig(_Section):
    """Deterministic preprocessing (cached by the Augment stage).

    Attributes:
        spatial_dims: 2 for images, 3 for volumes.
        image_size: Side of the square/cubic network input in pixels/voxels.
        intensity: ``auto`` (from the backbone's spec), ``minmax`` (per image to [0, 1]), ``window``
            (clip to ``window`` then scale), ``zscore_nonzero`` (MedicalNet convention).
        window: Intensity window [low, high] (e.g. a CT HU window) used by ``window``.
        channels: ``auto`` (three colour channels when at least half of the cases are colour images,
            else one grey channel), ``grey`` (colour becomes luminance) or ``rgb`` (grey images are
            replicated to three channels). Colour keeps the backbone's three-channel stem and per-channel
            mean/std; its intensity is scaled jointly over the channels (``auto``: the 8-bit window
            [0, 255]), never per channel, so hues are kept.
        target_spacing: 3D only: every volume is reoriented to RAS and resampled to this voxel size (mm,
            R/A/S order) before it is padded and resized, so anatomy keeps its physical proportions.
            ``auto``: the median spacing of the training cases (as nnU-Net), computed once and recorded
            in ``<workspace>/cache/target_spacing.json`` (a growing cohort does not change it; set a value
            here to change it); ``none``: resize by array shape (the former behaviour).
    """

    spatial_dims: Literal[2, 3] = 2
    image_size: int = Field(64, ge=8, le=1024)
    intensity: Literal["auto", "minmax", "window", "zscore_nonzero"] = "auto"
    window: tuple[float, float] | None = None
    channels: Literal["auto", "grey", "rgb"] = "auto"
    target_spacing: Literal["auto", "none"] | tuple[float, float, float] = "auto"

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.intensity == "window" and self.window is None:
            raise ValueError("preprocess.window: required when preprocess.intensity is 'window'")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"preprocess.window: {list(self.window)} must be [low, high] with low < high")
        if isinstance(self.target_spacing, tuple) and not all(0.01 <= v <= 50 for v in self.target_spacing):
            raise ValueError(
                f"preprocess.target_spacing: {list(self.target_spacing)} mm; expected three values in [0.01, 50]"
            )
        return self


class AugmentConfig(_Section):
    """Random training augmentation (MONAI), applied on the fly with a pipeline-owned RNG.

    A ``preset`` fills every field the config does not set itself (see
    ``pipeline.augment.transforms.PRESETS``); ``custom`` uses the fields as written.

    Attributes:
        preset: ``custom``, ``light``, ``standard``, ``strong`` (2D or 3D, per ``preprocess.spatial_dims``)
            or ``ct`` (3D CT: standard spatial plus a random intensity-window jitter on the windowed range).
        flip: Random left-right flip probability.
        flip_all_axes: Also flip the other spatial axes (orientation-free data such as masks or cells).
        rotate_deg: Maximum in-plane rotation in degrees (0 disables).
        rotate_3d: For 3D, rotate about all three axes (else about the in-plane axis only).
        scale: Maximum relative zoom (0.1 = +-10%).
        translate: Maximum shift as a fraction of the image size.
        intensity: Strength of intensity jitter (contrast/gamma and scale; 0 disables).
        noise_std: Standard deviation of additive Gaussian noise on normalised intensities (0 disables).
        window_jitter: ``ct`` preset: maximum relative change of the window's level and width (0 disables).
        colour: Colour input only (three channels): strength of brightness, contrast, saturation and hue
            jitter (0 disables; hue turns by up to ``colour`` x 180 degrees); ignored for grey input.
        prob: Probability of applying each of the affine and intensity transforms.
        preview: Number of augmented training samples drawn on the preview sheet.
    """

    preset: Literal["custom", "light", "standard", "strong", "ct"] = "custom"
    flip: float = Field(0.5, ge=0.0, le=1.0)
    flip_all_axes: bool = False
    rotate_deg: float = Field(10.0, ge=0.0, le=180.0)
    rotate_3d: bool = False
    scale: float = Field(0.1, ge=0.0, le=0.9)
    translate: float = Field(0.05, ge=0.0, le=0.5)
    intensity: float = Field(0.1, ge=0.0, le=1.0)
    noise_std: float = Field(0.0, ge=0.0, le=1.0)
    window_jitter: float = Field(0.0, ge=0.0, le=0.5)
    colour: float = Field(0.0, ge=0.0, le=0.5)
    prob: float = Field(0.8, ge=0.0, le=1.0)
    preview: int = Field(16, ge=0, le=64)


class ModelConfig(_Section):
    """The backbone.

    Attributes:
        backbone: A registered backbone name (``medtl backbones`` lists them).
        pretrained: Start from pretrained weights (ImageNet for 2D) or from scratch.
        weights: Optional explicit weights file (overrides the offline search), relative to the config.
        weights_sha256: Pin the pretrained file by content (64 hex digits): only a file with this sha256
            is loaded (the explicit ``weights`` file, or the first such file in the offline search).
        allow_unpinned: Accept a weights file with no pinned sha256 (neither in code nor
            ``weights_sha256``); its digest is still recorded. Off: such a file is refused when given as
            ``weights`` and skipped by the search (a pinned file later in the order is used instead).
    """

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: Path | None = None
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    allow_unpinned: bool = False

    @field_validator("weights_sha256")
    @classmethod
    def _lower_sha(cls, v: str | None) -> str | None:
        return v.lower() if v else v
