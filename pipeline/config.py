"""The run configuration: one YAML file, validated when it is loaded, hashed per stage.

Every option has one home here. Loading fails with one message that names the key, the bad value and what
is allowed. Each stage's output folder is named by a hash of only the sections that stage depends on (plus
the data snapshot), so changing a training option does not re-ingest; the ``runtime`` section (workers,
scheduler, workspace path, threads) never changes results and is never hashed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

SPLITS = ("train", "val", "calibration", "test")
ID_TYPES = ("path", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskConfig(_Section):
    """What is predicted.

    Attributes:
        kind: ``binary``, ``multiclass`` or ``ordinal`` (ordered classes, label values 0..K-1 in order).
        classes: Label value (as written in the labels CSV) -> class name, in class order.
        positive_class: For binary tasks, the class whose detection "sensitivity" measures (name or label
            value). For BreastMNIST, ``malignant`` (label 0).
    """

    kind: Literal["binary", "multiclass", "ordinal"]
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
    def positive_index(self) -> int | None:
        """Column index of the positive class, or None."""
        if self.positive_class is None:
            return None
        if self.positive_class in self.classes.values():
            return self.class_names.index(self.positive_class)
        return self.label_values.index(self.positive_class)


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


class SplitConfig(_Section):
    """Patient-level split fractions of the hashed rule (the rest is train).

    Attributes:
        val: Share of patients for validation (early stopping, thresholds).
        calibration: Share for post-hoc calibration and conformal prediction.
        test: Share for the final, reported evaluation.
        calibration_from_train: With a fixed split column, the share of ``train`` patients moved to
            ``calibration`` (hashed, stable) when the column names no calibration cases.
    """

    val: float = Field(0.15, ge=0.0, lt=1.0)
    calibration: float = Field(0.15, ge=0.0, lt=1.0)
    test: float = Field(0.2, ge=0.0, lt=1.0)
    calibration_from_train: float = Field(0.15, ge=0.0, lt=1.0)

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
    """

    spatial_dims: Literal[2, 3] = 2
    image_size: int = Field(64, ge=8, le=1024)
    intensity: Literal["auto", "minmax", "window", "zscore_nonzero"] = "auto"
    window: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> PreprocessConfig:
        if self.intensity == "window" and self.window is None:
            raise ValueError("preprocess.window: required when preprocess.intensity is 'window'")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"preprocess.window: {list(self.window)} must be [low, high] with low < high")
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
    prob: float = Field(0.8, ge=0.0, le=1.0)
    preview: int = Field(16, ge=0, le=64)


class ModelConfig(_Section):
    """The backbone.

    Attributes:
        backbone: A registered backbone name (``medtl backbones`` lists them).
        pretrained: Start from pretrained weights (ImageNet for 2D) or from scratch.
        weights: Optional explicit weights file (overrides the offline search), relative to the config.
    """

    backbone: str = "efficientnet_lite0"
    pretrained: bool = True
    weights: Path | None = None


class TrainConfig(_Section):
    """Fine-tuning.

    Attributes:
        strategy: ``linear_probe`` (logistic regression on frozen features, written into the head),
            ``partial`` (last ``trainable_groups`` parameter groups), ``finetune`` (all layers,
            discriminative learning rates), ``gradual`` (gradual unfreezing from the head),
            ``scratch`` (random init baseline) or ``auto`` (train ``auto_candidates`` and keep the best
            by validation AUROC).
        auto_candidates: Strategies tried by ``auto``, run cheapest first.
        auto_tolerance: ``auto`` keeps the cheaper candidate unless a costlier one beats it by more.
        trainable_groups: ``partial``: trailing parameter groups trained (1 = head only).
        unfreeze_milestones: ``gradual``: epochs at which more groups are unfrozen.
        unfreeze_groups_per_step: ``gradual``: groups unfrozen at each milestone.
        probe_c: ``linear_probe``: inverse L2 strengths tried; the best by validation AUROC is kept.
        bn_reestimate: Re-estimate BatchNorm running statistics on the training images before training
            (target-domain statistics for frozen or partially frozen backbones).
        probe_init: ``partial``/``gradual``/``finetune``: start from the fitted linear probe as the head
            (LP-FT, Kumar et al. 2022: fine-tuning distorts pretrained features less).
        ema_decay: Keep an exponential moving average of the weights (0 disables, e.g. 0.98); the EMA
            weights are the ones validated, early-stopped and saved.
        epochs: Maximum epochs.
        min_steps_per_epoch: Small training sets: an epoch draws the cases as many times as needed (each
            draw reshuffled and augmented anew) to make at least this many optimizer steps (0: one draw).
        batch_size: Mini-batch size (per optimizer step, over all devices).
        accumulate_steps: Gradient accumulation: each optimizer step sums this many micro-batches of
            ``batch_size / accumulate_steps`` samples.
        lr: Peak learning rate of the new head; the backbone gets ``lr * backbone_lr_mult``.
        backbone_lr_mult: Discriminative learning-rate factor for pretrained layers.
        weight_decay: AdamW weight decay.
        schedule: ``cosine`` (after ``warmup_epochs`` of linear warm-up), ``onecycle`` or ``constant``.
        patience: Early stopping: epochs without validation-AUROC improvement.
        warmup_epochs: Linear warm-up before the cosine schedule.
        class_weighting: ``balanced`` (inverse-frequency loss weights) or ``none``.
        sampler: ``shuffle`` (each case once per epoch) or ``balanced`` (classes drawn equally often,
            with replacement; use with ``class_weighting: none``).
        label_smoothing: Cross-entropy label smoothing.
        seed: Seed of every RNG of the run (weights init, order, augmentation).
        deterministic: Ask torch for deterministic kernels (``torch.use_deterministic_algorithms``).
        folds: K-fold cross-validation over train+val patients when >= 2; the model is the ensemble of
            the K fold models (mean probability).
        devices: Processes/GPUs; > 1 launches ``torchrun`` (DistributedDataParallel) as a child process.
        device: ``auto`` (CUDA when present), ``cpu`` or ``cuda`` (not hashed).
        amp: Mixed precision on CUDA (bf16 where supported, else fp16); ignored on CPU (not hashed).
        label_fraction: Use only this stratified share of training labels (label-efficiency studies).
        tta: Test-time augmentation by mirroring, for validation (early stopping), evaluation and
            prediction: ``flip`` averages the probabilities of the image and its left-right mirror,
            ``flip_all`` of every combination of mirrored axes (4 passes in 2D, 8 in 3D; for
            orientation-free data, with ``augment.flip_all_axes``); ``none`` by default. Use it only when
            training flipped the images the same way.
    """

    strategy: Literal["auto", "linear_probe", "partial", "finetune", "gradual", "scratch"] = "finetune"
    auto_candidates: tuple[Literal["linear_probe", "partial", "finetune", "gradual", "scratch"], ...] = (
        "linear_probe",
        "finetune",
    )
    auto_tolerance: float = Field(0.005, ge=0.0, le=0.2)
    trainable_groups: int = Field(2, ge=1, le=100)
    unfreeze_milestones: tuple[int, ...] = (2, 4, 6)
    unfreeze_groups_per_step: int = Field(1, ge=1, le=100)
    probe_c: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    bn_reestimate: bool = False
    probe_init: bool = False
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    epochs: int = Field(30, ge=1, le=1000)
    min_steps_per_epoch: int = Field(0, ge=0, le=100000)
    batch_size: int = Field(32, ge=1, le=4096)
    accumulate_steps: int = Field(1, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    backbone_lr_mult: float = Field(0.3, gt=0.0, le=1.0)
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    patience: int = Field(8, ge=1, le=1000)
    warmup_epochs: int = Field(1, ge=0, le=100)
    class_weighting: Literal["balanced", "none"] = "balanced"
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    seed: int = 0
    deterministic: bool = False
    folds: int = Field(1, ge=1, le=20)
    devices: int = Field(1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    tta: Literal["none", "flip", "flip_all"] = "none"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if not self.auto_candidates:
            raise ValueError("train.auto_candidates: expected at least one strategy")
        if len(set(self.auto_candidates)) != len(self.auto_candidates):
            raise ValueError(f"train.auto_candidates: {list(self.auto_candidates)} lists a strategy twice")
        ms = list(self.unfreeze_milestones)
        if any(b <= a for a, b in zip(ms, ms[1:])) or any(m < 0 for m in ms):
            raise ValueError(f"train.unfreeze_milestones: {ms}; expected strictly increasing epochs >= 0")
        if not self.probe_c or any(c <= 0 for c in self.probe_c):
            raise ValueError(f"train.probe_c: {list(self.probe_c)}; expected one or more positive numbers")
        if self.batch_size % self.accumulate_steps:
            raise ValueError(
                f"train.accumulate_steps: {self.accumulate_steps} does not divide train.batch_size "
                f"{self.batch_size}; expected a divisor (micro-batch = batch_size / accumulate_steps)"
            )
        if self.sampler == "balanced" and self.class_weighting == "balanced":
            raise ValueError(
                "train.sampler: 'balanced' with train.class_weighting 'balanced' corrects the imbalance "
                "twice; set train.class_weighting: none"
            )
        if self.folds > 1 and self.strategy == "auto":
            raise ValueError("train.folds: k-fold ensembles need a fixed train.strategy, not 'auto'")
        return self


class EvaluateConfig(_Section):
    """Evaluation.

    Attributes:
        calibration: Post-hoc calibrator fitted on the calibration split.
        n_bootstrap: Bootstrap resamples for confidence intervals.
        ci_level: Confidence level of every interval.
        ece_bins: Bins of the expected calibration error.
        conformal_alpha: Miscoverage of conformal prediction sets (0.1 = 90% coverage).
        min_subgroup: Subgroups smaller than this are reported with a warning.
        explain_cases: Grad-CAM overlays in the report: this many correctly and this many wrongly
            classified test cases (0 turns explanations off).
        compare_with: An earlier run's evaluate folder (or its ``predictions.csv``) to compare this model
            with on the same test cases (paired DeLong test and paired bootstrap of the AUROC
            difference). A relative path is resolved against the config file's folder.
        study_label_fractions: Optional scarce-label study (trains extra models): training-label fractions,
            e.g. ``[0.1, 0.25, 0.5, 1.0]``. Empty (default) turns the study off.
        study_strategies: Strategies of the study, e.g. ``[linear_probe, finetune, scratch]``; ``scratch``
            trains the same backbone from random initialisation (``model.pretrained: false``).
    """

    calibration: Literal["none", "temperature", "vector", "platt", "isotonic", "auto"] = "temperature"
    n_bootstrap: int = Field(2000, ge=100, le=100000)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)
    ece_bins: int = Field(15, ge=2, le=100)
    conformal_alpha: float = Field(0.1, gt=0.0, lt=0.5)
    min_subgroup: int = Field(30, ge=1)
    explain_cases: int = Field(3, ge=0, le=16)
    compare_with: Path | None = None
    study_label_fractions: tuple[float, ...] = ()
    study_strategies: tuple[Literal["linear_probe", "partial", "finetune", "gradual", "scratch"], ...] = ()

    @field_validator("study_label_fractions")
    @classmethod
    def _fractions_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in v if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"evaluate.study_label_fractions: fractions must lie in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"evaluate.study_label_fractions: duplicate fractions in {list(v)}")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _study_complete(self) -> EvaluateConfig:
        if bool(self.study_label_fractions) != bool(self.study_strategies):
            raise ValueError(
                "evaluate.study_label_fractions and evaluate.study_strategies: give both lists (the study "
                f"trains every strategy at every fraction) or neither; got {list(self.study_label_fractions)} "
                f"and {list(self.study_strategies)}"
            )
        return self


class ReportConfig(_Section):
    """The exported report.

    Attributes:
        title: Report title.
        intended_use: Sentence for the model card's intended-use section.
    """

    title: str = "medtl evaluation report"
    intended_use: str = (
        "Research use only: decision support evaluated retrospectively; not a medical device."
    )


class RuntimeConfig(_Section):
    """Where and how to run; never hashed (does not change results).

    Attributes:
        workspace: Workspace folder, relative to the config file.
        workers: Luigi workers.
        scheduler_host: Central ``luigid`` host; None runs Luigi's local scheduler.
        scheduler_port: ``luigid`` port.
        threads: Torch CPU threads (None: torch's default).
        num_workers: DataLoader worker processes.
    """

    workspace: Path = Path("medtl-workspace")
    workers: int = Field(1, ge=1, le=256)
    scheduler_host: str | None = None
    scheduler_port: int = Field(8082, ge=1, le=65535)
    threads: int | None = Field(None, ge=1, le=1024)
    num_workers: int = Field(0, ge=0, le=64)


class RetrainPolicy(_Section):
    """When a nightly run trains a new model (never hashed: it decides whether to train, not how).

    Attributes:
        min_new_cases: Retrain when at least this many labelled cases arrived since the champion's data.
        max_days: Retrain when the champion is at least this many days old (None: never for age alone).
        warm_start: Start a retraining from the ``pretrained`` backbone (default) or from the current
            ``champion``'s weights (same backbone and classes; a k-fold champion starts every fold from
            its first member). The champion used is fixed per data snapshot and training config, so the
            FineTune folder name stays stable across reruns of the night.

    A changed training configuration (model, train, preprocess, augment sections) always retrains.
    """

    min_new_cases: int = Field(1, ge=0)
    max_days: float | None = Field(None, gt=0)
    warm_start: Literal["pretrained", "champion"] = "pretrained"


class PromotionPolicy(_Section):
    """Champion/challenger rule (see ``pipeline.ops.promotion``).

    Attributes:
        auto: Promote automatically when the rule passes (else the decision is recorded only).
        method: Test of the AUROC difference: ``delong`` (binary) or paired cluster ``bootstrap``.
        auroc_margin: Non-inferiority margin: promote only if the lower CI bound of
            AUROC(challenger) - AUROC(champion) is above ``-auroc_margin``.
        brier_margin: Calibration not worse: Brier(challenger) <= Brier(champion) + ``brier_margin``.
        min_auroc: A first model (no champion) is promoted only if its AUROC lower CI bound exceeds this.
        holdout_fraction: Share of test patients (keyed hash) locked for promotion decisions.
        min_holdout_cases: Below this many holdout cases (or one class only) the whole test split is used.
        n_bootstrap: Resamples of the paired bootstrap.
        ci_level: Confidence level of the difference interval.
    """

    auto: bool = True
    method: Literal["delong", "bootstrap"] = "delong"
    auroc_margin: float = Field(0.02, ge=0.0, le=0.5)
    brier_margin: float = Field(0.01, ge=0.0, le=1.0)
    min_auroc: float = Field(0.5, ge=0.0, lt=1.0)
    holdout_fraction: float = Field(0.5, ge=0.0, le=1.0)
    min_holdout_cases: int = Field(20, ge=1)
    n_bootstrap: int = Field(2000, ge=100, le=100000)
    ci_level: float = Field(0.95, gt=0.5, lt=1.0)


class NotifyConfig(_Section):
    """End-of-run notification (a failing hook only warns; the run's exit status is unchanged).

    Attributes:
        command: Shell-free command (list or string split with shlex); the summary JSON is on stdin and
            in ``MEDTL_SUMMARY`` (a file path).
        webhook: URL receiving the summary as a JSON POST.
        timeout_s: Time limit of each hook.
    """

    command: list[str] | str | None = None
    webhook: str | None = None
    timeout_s: float = Field(10.0, gt=0.0, le=600.0)


class RetentionPolicy(_Section):
    """What ``medtl gc`` keeps (registered models' stage folders are always kept).

    Attributes:
        keep_runs: Keep the stage folders of the last K nightly run records.
        keep_retired: Keep the folders of retired models too (else only champions and candidates).
        cache_days: Remove decoded volumes not used by a kept ingest folder and older than this many days.
    """

    keep_runs: int = Field(7, ge=1)
    keep_retired: bool = False
    cache_days: float = Field(30.0, ge=0.0)


class OpsConfig(_Section):
    """Nightly operation: retraining, promotion, notification, retention, retries (never hashed).

    Attributes:
        retries: Reruns of a failed chain after a transient (non-medtl) error.
        retry_backoff_s: First back-off delay; doubled after each attempt.
    """

    retrain: RetrainPolicy = RetrainPolicy()
    promotion: PromotionPolicy = PromotionPolicy()
    notify: NotifyConfig = NotifyConfig()
    retention: RetentionPolicy = RetentionPolicy()
    retries: int = Field(2, ge=0, le=20)
    retry_backoff_s: float = Field(30.0, ge=0.0, le=3600.0)


class Config(_Section):
    """A whole medtl run configuration (see ``configs/*.yaml``)."""

    name: str = Field("medtl-run", min_length=1)
    task: TaskConfig
    data: DataConfig
    split: SplitConfig = SplitConfig()
    ingest: IngestConfig = IngestConfig()
    deid: DeidConfig = DeidConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    report: ReportConfig = ReportConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    ops: OpsConfig = OpsConfig()

    source_path: Path | None = Field(None, exclude=True)

    def hashed(self, *sections: str, extra: dict[str, Any] | None = None) -> str:
        """Return a 12-hex-digit hash of the named sections (plus ``extra``), excluding unhashed fields."""
        payload: dict[str, Any] = {}
        for name in sections:
            value = getattr(self, name)
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            for field in _UNHASHED.get(name, ()):
                dumped.pop(field, None)
            payload[name] = dumped
        if extra:
            payload["extra"] = extra
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")
        return hashlib.sha256(blob).hexdigest()[:12]

    def public_dict(self) -> dict[str, Any]:
        """The config as written into reports: no paths at all (folder and file names may contain names).

        The data source and labels file are named only by placeholders; the private run record and the
        operator's own config file say where they are.
        """
        out = self.model_dump(mode="json", exclude={"runtime", "ops", "source_path"})
        out["data"]["source"] = "<data.source>"
        out["data"]["labels_csv"] = "<data.labels_csv>"
        if out["model"].get("weights"):
            out["model"]["weights"] = Path(out["model"]["weights"]).name
        return out


# Fields that never change results, per section. The data paths are not hashed either: the data snapshot
# (file list, sizes, mtimes, labels CSV digest) stands for the data.
_UNHASHED: dict[str, tuple[str, ...]] = {
    "ingest": ("processes",),
    "train": ("device", "amp"),
    "data": ("source", "labels_csv"),
    "model": ("weights",),
}


def _format_validation_error(err: ValidationError, path: Path) -> str:
    lines = [f"Invalid configuration {path}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = e["loc"][:-1]
            allowed = _allowed_keys(parent)
            lines.append(f"  - {loc}: unknown key; allowed keys here: {', '.join(allowed)}")
            continue
        value = e.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"  - {loc}: required key is missing")
        else:
            lines.append(f"  - {loc}: {msg} (got {shown})")
    return "\n".join(lines)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return [k for k, f in model.model_fields.items() if not f.exclude]


def load_config(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Config:
    """Load and validate a YAML config; relative paths are resolved against the config's folder.

    Args:
        path: The YAML file.
        overrides: Optional nested dict merged over the file (used by the CLI and benchmarks).

    Raises:
        ConfigError: With one message naming each bad key, its value and what is allowed.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist; expected a YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file {path}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    if overrides:
        raw = _deep_merge(raw, overrides)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, path)) from err
    return _resolve_paths(cfg, path)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _resolve_paths(cfg: Config, path: Path) -> Config:
    base = path.parent

    def resolve(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(os.path.expandvars(str(p))).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    data = cfg.data.model_copy(update={"source": resolve(cfg.data.source), "labels_csv": resolve(cfg.data.labels_csv)})
    model = cfg.model.model_copy(update={"weights": resolve(cfg.model.weights)})
    runtime = cfg.runtime.model_copy(update={"workspace": resolve(cfg.runtime.workspace)})
    cfg = cfg.model_copy(update={"data": data, "model": model, "runtime": runtime, "source_path": path})
    problems = []
    if not data.source.is_dir():
        problems.append(f"  - data.source: folder {data.source} does not exist; expected a folder of images")
    if not data.labels_csv.is_file():
        problems.append(f"  - data.labels_csv: file {data.labels_csv} does not exist; expected a CSV file")
    if model.weights is not None and not model.weights.is_file():
        problems.append(f"  - model.weights: file {model.weights} does not exist; expected a weights file")
    if problems:
        raise ConfigError("\n".join([f"Invalid configuration {path}:", *problems]))
    return cfg
