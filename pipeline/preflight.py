"""Refuse what would fail later: ``medtl check`` and ``medtl run`` (before any stage) run these checks.

Each problem names the config field, what is wrong and what is expected, with a stable code; CSV cells are
never quoted (counts and CSV line numbers only). Checks: the backbone exists and matches
``preprocess.spatial_dims``; pretrained weights are on this machine when ``model.pretrained`` (which file
and where to put it); the labels CSV has the id, label, split, patient and group columns; every
``task.classes`` key occurs in the label column; every label in the CSV is a class; the source folder holds
files; ``data.channels`` have unique names, patterns that compile and CSV columns that exist. The backbone
and weights checks import the model registry (torch): ``medtl run`` runs them only on a night that will do
work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config

__all__ = ["Problem", "preflight"]

#: At most this many CSV line numbers are listed per problem.
MAX_LINES = 10


@dataclass(frozen=True)
class Problem:
    """One refusal: the config field, the message, a stable code. ``per_row`` problems concern some CSV
    rows only: ``medtl check`` refuses them, ``medtl run`` lets Ingest report those rows and go on."""

    field: str
    message: str
    code: str
    per_row: bool = False

    def line(self) -> str:
        return f"  - {self.field}: {self.message} (code {self.code})"


def _backbone(cfg: Config) -> list[Problem]:
    from models import get_spec, list_backbones

    name = cfg.model.backbone
    try:
        spec = get_spec(name)
    except (ValueError, KeyError):
        near = [b for b in list_backbones() if name.split("_")[0].lower() in b.lower()][:5]
        return [
            Problem(
                "model.backbone",
                f"unknown backbone {name!r}; expected one of `medtl backbones`" + (f" (e.g. {near})" if near else ""),
                "unknown_backbone",
            )
        ]
    dims = cfg.preprocess.spatial_dims
    if spec.spatial_dims != dims and f"inflated_{name}" not in list_backbones():
        return [
            Problem(
                "preprocess.spatial_dims",
                f"{dims}, but backbone {name!r} is {spec.spatial_dims}D; expected a {dims}D backbone "
                f"(`medtl backbones`) or preprocess.spatial_dims: {spec.spatial_dims}",
                "dims_mismatch",
            )
        ]
    return []


def _weights(cfg: Config) -> list[Problem]:
    from models.errors import WeightsError
    from pipeline.workspace import load_weights_memo, pretrained_weights

    if not cfg.model.pretrained:
        return []
    try:  # the workspace's remembered digests: a weight file is not hashed again for planning's sake
        pretrained_weights(cfg, dict(load_weights_memo(Path(cfg.runtime.workspace))))
    except WeightsError as err:
        return [Problem("model.pretrained", str(err), err.code)]
    return []


def _lines(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:MAX_LINES])
    return shown + (f" and {len(rows) - MAX_LINES} more" if len(rows) > MAX_LINES else "")


def _labels_csv(cfg: Config) -> list[Problem]:
    from pipeline.errors import ConfigError
    from pipeline.ingest.labels import canonical_label, read_table, wanted_columns

    data = cfg.data
    try:
        header, rows = read_table(Path(data.labels_csv))
    except ConfigError as err:
        return [Problem("data.labels_csv", "cannot be read as a UTF-8 CSV file", err.code)]
    header = [h.strip() for h in header]
    out = []
    for field, col in wanted_columns(data, getattr(cfg.split, "stratify_by", ()) or (), cfg.task).items():
        if col not in header:
            out.append(
                Problem(field, f"column {col!r} is not in the labels CSV's header ({len(header)} columns: {header})",
                        "missing_column")
            )
    if any(p.field == "data.label_column" for p in out):
        return out
    if cfg.task.multilabel:  # finding cells: Ingest reports bad cells and partial rows per row
        from pipeline.train.validation import multilabel_refusals

        return out + [
            Problem(f, m.split(": ", 1)[1], "multilabel_unsupported") for f, m in multilabel_refusals(cfg)
        ]
    keys = {str(k) for k in cfg.task.classes}
    seen, unknown = set(), []
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        v = (r.get(data.label_column) or "").strip()
        if not v:
            continue  # an unlabelled case: allowed
        v = canonical_label(v, keys)  # as Ingest reads it ("1.0" is class "1")
        if v in keys:
            seen.add(v)
        else:
            unknown.append(line)
    if unknown:
        out.append(
            Problem(
                "data.label_column",
                f"{len(unknown)} row(s) hold a label that is not a key of task.classes (CSV lines {_lines(unknown)}); "
                "expected one of the keys, or an empty cell for an unlabelled case",
                "unknown_label",
                per_row=True,
            )
        )
    missing = sorted(keys - seen)
    if missing:
        out.append(
            Problem(
                "task.classes",
                f"{len(missing)} class key(s) never occur in the label column ({missing}); expected every class to have "
                "labelled cases",
                "class_without_cases",
            )
        )
    return out


def _channels(cfg: Config) -> list[Problem]:
    """``data.channels``: unique names, SeriesDescription patterns that compile, path columns in the CSV.
    (Loading a YAML config already refuses the first two; a config built in code is checked here too.)"""
    import re

    from pipeline.errors import ConfigError
    from pipeline.ingest.labels import read_table

    channels = cfg.data.channels
    out = []
    names = [c.name for c in channels]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        out.append(
            Problem("data.channels", f"channel names {dup} appear more than once; expected unique names",
                    "duplicate_channel")
        )
    for i, ch in enumerate(channels):
        if ch.series_description is not None:
            try:
                re.compile(ch.series_description)
            except re.error as err:
                out.append(Problem(f"data.channels[{i}].series_description",
                                   f"not a valid regular expression ({err})", "bad_channel_pattern"))
    columns = [(i, ch.column) for i, ch in enumerate(channels) if ch.column is not None]
    if columns:
        try:
            header = [h.strip() for h in read_table(Path(cfg.data.labels_csv))[0]]
        except ConfigError:
            return out  # reported by the labels CSV check
        for i, col in columns:
            if col not in header:
                out.append(
                    Problem(
                        f"data.channels[{i}].column",
                        f"column {col!r} is not in the labels CSV's header ({len(header)} columns: "
                        f"{header}); expected the column of this channel's image paths",
                        "missing_column",
                    )
                )
    return out


def _source(cfg: Config) -> list[Problem]:
    src = Path(cfg.data.source)
    try:
        for _root, _dirs, files in os.walk(src):
            if any(not f.startswith(".") for f in files):
                return []
    except OSError:
        pass
    return [Problem("data.source", "the folder holds no file; expected the images to ingest", "empty_source")]


def preflight(cfg: Config, models: bool = True) -> list[Problem]:
    """Every problem found (empty when the config can run). ``models=False`` skips the torch-importing
    backbone and weights checks."""
    out = _source(cfg) + _labels_csv(cfg) + _channels(cfg)
    if models:
        out += _backbone(cfg)
        if not out or all(p.field != "model.backbone" for p in out):
            out += _weights(cfg)
    return out
