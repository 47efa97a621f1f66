"""Config sections that never change results: runtime and nightly operation (ops)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config.sections import _Section


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
