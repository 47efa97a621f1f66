"""The whole run configuration (:class:`Config`): its sections, per-stage hashing and the public view."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from pipeline.config.operations import OpsConfig, RuntimeConfig
from pipeline.config.sections import (
    AugmentConfig,
    DataConfig,
    DeidConfig,
    IngestConfig,
    ModelConfig,
    PreprocessConfig,
    SplitConfig,
    TaskConfig,
    _Section,
)
from pipeline.config.training import EvaluateConfig, ReportConfig, TrainConfig


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
            for field, neutral in _HASHED_WHEN_SET.get(name, {}).items():
                if dumped.get(field) == neutral:
                    dumped.pop(field)
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
        out["evaluate"]["external"] = [{"name": e["name"]} for e in out["evaluate"].get("external", [])]
        if out["model"].get("weights"):
            out["model"]["weights"] = Path(out["model"]["weights"]).name
        return out


# Fields that never change results, per section. The data paths are not hashed either: the data snapshot
# (file list, sizes, mtimes, labels CSV digest) stands for the data.
_UNHASHED: dict[str, tuple[str, ...]] = {
    "ingest": ("processes",),
    "train": ("device", "amp"),
    "data": ("source", "labels_csv"),
    "evaluate": ("external",),  # the external sources' snapshots are hashed instead (plan_stages)
    "model": ("weights", "weights_sha256", "allow_unpinned"),  # the weights' content is hashed instead
}

# Fields added after workspaces existed, hashed only when set away from the value that reproduces the
# earlier behaviour: upgrading medtl does not retrain every workspace's model for a feature it does not use.
_HASHED_WHEN_SET: dict[str, dict[str, Any]] = {
    "train": {"mixup_alpha": 0.0},
}
