"""Config sections of training and evaluation: train, evaluate, report."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipeline.config.sections import _Section


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
        mixup_alpha: Mixup (Zhang et al. 2018): each labelled micro-batch is blended with a shuffled copy
            of itself by a factor drawn from Beta(alpha, alpha), and the loss is blended alike (0 disables;
            0.2-0.4 is the usual range). Labelled cases only; semi-supervised extra inputs are not mixed.
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
        semi_supervised: Use unlabelled cases (``pipeline/train/semi.py``): ``auto`` (self-training with
            pseudo-labels whenever unlabelled cases exist), ``off``, or a method (``pseudo_label``,
            ``mean_teacher``: ``pipeline/train/mean_teacher.py``).
        ssl_threshold: Minimum teacher confidence (after distribution alignment) for a pseudo-label.
        ssl_pseudo_per_labelled: At most this many pseudo-labelled cases per labelled training case.
        ssl_unlabelled_per_labelled: Unlabelled cases scored per labelled case and fold (a seeded sample:
            bounds the cost when unlabelled cases outnumber labelled ones).
        ssl_student_epochs: The student's epochs as a share of ``epochs`` (it starts from the teacher).
        ssl_consistency_weight: ``mean_teacher``: weight of the consistency loss (softmax MSE averaged
            over classes and unlabelled cases), reached after a sigmoid ramp-up. Default 50: the USB
            benchmark's Mean Teacher setting (``ulb_loss_ratio``, Wang et al. 2022) for this loss form;
            the original code used 100 (Tarvainen & Valpola 2017). To be tuned on the bench.
        ssl_ema_decay: ``mean_teacher``: decay of the EMA teacher per optimizer step. Default 0.99: the
            paper's value for the ramp-up phase, fitting a student of hundreds of steps (0.999, its later
            value, would leave the teacher where the student started).
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
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0)
    seed: int = 0
    deterministic: bool = False
    folds: int = Field(1, ge=1, le=20)
    devices: int = Field(1, ge=1, le=64)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)
    tta: Literal["none", "flip", "flip_all"] = "none"
    semi_supervised: Literal["auto", "off", "pseudo_label", "mean_teacher"] = "auto"
    ssl_threshold: float = Field(0.9, ge=0.5, lt=1.0)
    ssl_pseudo_per_labelled: float = Field(1.0, gt=0.0, le=20.0)
    ssl_unlabelled_per_labelled: int = Field(10, ge=1, le=1000)
    ssl_student_epochs: float = Field(0.5, gt=0.0, le=2.0)
    ssl_consistency_weight: float = Field(50.0, gt=0.0, le=1000.0)
    ssl_ema_decay: float = Field(0.99, gt=0.0, lt=1.0)

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


class ExternalSource(_Section):
    """A second labelled test source (another site, scanner or period) scored in Evaluate.

    Attributes:
        name: Short label shown in the report (letters, digits, ``_`` and ``-``; not a patient value).
        source: Folder of scans, read like ``data.source`` (relative: against the config file's folder).
        labels_csv: Its labels CSV, with the columns of ``data`` (id, label and patient columns).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,40}$")
    source: Path
    labels_csv: Path


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
        external: Second labelled test sources (:class:`ExternalSource`): each is scored with this run's
            model and calibrator (nothing refitted) and reported beside the internal test set
            (:func:`pipeline.ops.external.validate_external`, the work of ``medtl validate``).
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
    external: tuple[ExternalSource, ...] = ()

    @field_validator("study_label_fractions")
    @classmethod
    def _fractions_in_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [f for f in v if not 0.0 < f <= 1.0]
        if bad:
            raise ValueError(f"evaluate.study_label_fractions: fractions must lie in (0, 1], got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"evaluate.study_label_fractions: duplicate fractions in {list(v)}")
        return tuple(sorted(v))

    @field_validator("external")
    @classmethod
    def _unique_external(cls, v: tuple[ExternalSource, ...]) -> tuple[ExternalSource, ...]:
        names = [e.name for e in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"evaluate.external: names {dup} appear more than once; expected unique names")
        return v

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
