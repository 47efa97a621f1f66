"""The run configuration: one YAML file, validated when it is loaded, hashed per stage.

Every option has one home here. Loading fails with one message that names the key, the bad value and what
is allowed. Each stage's output folder is named by a hash of only the sections that stage depends on (plus
the data snapshot), so changing a training option does not re-ingest; the ``runtime`` section (workers,
scheduler, workspace path, threads) never changes results and is never hashed.

Layout (one module per job): ``sections`` (data-side sections), ``training`` (train, evaluate, report),
``operations`` (runtime and ops, never hashed), ``schema`` (:class:`Config`: hashing and the public view),
``loading`` (:func:`load_config`: YAML, validation messages, path resolution). Import from
``pipeline.config``; the submodules are an implementation detail.
"""

from __future__ import annotations

from pipeline.config.loading import load_config
from pipeline.config.operations import (
    NotifyConfig,
    OpsConfig,
    PromotionPolicy,
    RetentionPolicy,
    RetrainPolicy,
    RuntimeConfig,
)
from pipeline.config.schema import Config
from pipeline.config.sections import (
    ID_TYPES,
    SPLITS,
    AugmentConfig,
    DataConfig,
    DeidConfig,
    IngestConfig,
    ModelConfig,
    PreprocessConfig,
    SplitConfig,
    TaskConfig,
)
from pipeline.config.training import EvaluateConfig, ExternalSource, ReportConfig, TrainConfig

__all__ = [
    "ID_TYPES",
    "SPLITS",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "DeidConfig",
    "EvaluateConfig",
    "ExternalSource",
    "IngestConfig",
    "ModelConfig",
    "NotifyConfig",
    "OpsConfig",
    "PreprocessConfig",
    "PromotionPolicy",
    "ReportConfig",
    "RetentionPolicy",
    "RetrainPolicy",
    "RuntimeConfig",
    "SplitConfig",
    "TaskConfig",
    "TrainConfig",
    "load_config",
]
