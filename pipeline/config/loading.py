"""Loading a YAML config: validation messages that name the key, the value and what is allowed; paths."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.config.schema import Config
from pipeline.errors import ConfigError


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
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ConfigError(
            f"Config file {path} is not UTF-8 text (byte {err.start} at line {line}, column {column} is not "
            "valid UTF-8); expected a UTF-8 YAML file: re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            code="config_not_utf8",
        ) from err
    try:
        raw = yaml.safe_load(text) or {}
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
    external = tuple(
        e.model_copy(update={"source": resolve(e.source), "labels_csv": resolve(e.labels_csv)})
        for e in cfg.evaluate.external
    )
    evaluate = cfg.evaluate.model_copy(update={"external": external})
    cfg = cfg.model_copy(
        update={"data": data, "model": model, "runtime": runtime, "evaluate": evaluate, "source_path": path}
    )
    problems = []
    if not data.source.is_dir():
        problems.append(f"  - data.source: folder {data.source} does not exist; expected a folder of images")
    if not data.labels_csv.is_file():
        problems.append(f"  - data.labels_csv: file {data.labels_csv} does not exist; expected a CSV file")
    for e in external:
        src, train_src = Path(e.source).resolve(), Path(data.source).resolve()
        if src == train_src or src.is_relative_to(train_src) or train_src.is_relative_to(src):
            problems.append(
                f"  - evaluate.external ({e.name}).source: folder {e.source} overlaps data.source; expected a "
                "second source with other cases (its scans would otherwise be the training data)"
            )
        if not e.source.is_dir():
            problems.append(
                f"  - evaluate.external ({e.name}).source: folder {e.source} does not exist; expected a folder "
                "of images"
            )
        if not e.labels_csv.is_file():
            problems.append(
                f"  - evaluate.external ({e.name}).labels_csv: file {e.labels_csv} does not exist; expected a "
                "CSV file"
            )
    if model.weights is not None and not model.weights.is_file():
        problems.append(f"  - model.weights: file {model.weights} does not exist; expected a weights file")
    if problems:
        raise ConfigError("\n".join([f"Invalid configuration {path}:", *problems]))
    return cfg
