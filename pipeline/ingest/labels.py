"""Reading and checking the labels CSV.

One row per case: an identifier column (a relative file path or a DICOM identifier), a label column, and
optionally a fixed split, a patient identifier, subgroup and stratification columns. Bad rows are reported,
never silently dropped: an unknown label value, an empty identifier, duplicate rows that disagree. A row with
an empty label cell is kept as an unlabelled case (``label == ""``; its split cell is ignored, as unlabelled
cases never go to val, calibration or test).

Privacy: a CSV cell is free text and may hold a patient's name. A problem's ``reason`` (published in the
ingest report, the run report and logs) names only the line number, the configured column and what was
expected, never a cell's value; the offending value goes to ``detail``, which is written under ``private/``
only.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import SPLITS, DataConfig, TaskConfig
from pipeline.errors import ConfigError

SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "calibration": "calibration",
    "cal": "calibration",
    "calib": "calibration",
    "test": "test",
    "testing": "test",
}


@dataclass(frozen=True)
class LabelRow:
    """One usable row of the labels CSV (identifiers are private: never written to shared outputs).

    ``label`` is ``""`` for an unlabelled case; ``line`` is the row's 1-based CSV line (header = 1);
    ``strata`` holds the ``split.stratify_by`` values in their configured order.
    """

    case_ref: str
    label: str
    split: str | None
    patient: str | None
    groups: dict[str, str] = field(default_factory=dict)
    line: int = 0
    strata: tuple[str, ...] = ()

    @property
    def labelled(self) -> bool:
        return self.label != ""


@dataclass
class LabelProblem:
    """A row that was not used, with the reason (no cell values: safe to publish).

    ``ref`` (the case it names) and ``detail`` (the offending cell values) are PRIVATE, never published.
    """

    row: int
    code: str
    reason: str
    ref: str = ""
    detail: str = ""


def normalise_ref(value: str, id_type: str) -> str:
    """Canonical form of a case reference: forward slashes and no leading ``./`` for paths; stripped ids."""
    value = value.strip()
    if id_type == "path":
        value = value.replace("\\", "/")
        while value.startswith("./"):
            value = value[2:]
    return value


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The labels CSV's header and rows (UTF-8, an optional BOM); ConfigError when it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ConfigError(f"data.labels_csv: cannot read {path}: {err}", code="labels_unreadable") from err
    return header, rows


def wanted_columns(data: DataConfig, stratify_by: Sequence[str] = ()) -> dict[str, str]:
    """Config field -> labels-CSV column every configured column must name."""
    wanted = {"data.id_column": data.id_column, "data.label_column": data.label_column}
    if data.split_column:
        wanted["data.split_column"] = data.split_column
    if data.patient_column:
        wanted["data.patient_column"] = data.patient_column
    for i, col in enumerate(data.group_columns):
        wanted[f"data.group_columns[{i}]"] = col
    for i, col in enumerate(stratify_by):
        wanted[f"split.stratify_by[{i}]"] = col
    return wanted


def read_labels(
    data: DataConfig, task: TaskConfig, stratify_by: Sequence[str] = ()
) -> tuple[dict[str, LabelRow], list[LabelProblem]]:
    """Read ``data.labels_csv``.

    Args:
        stratify_by: Extra columns whose values stratify the splits (``split.stratify_by``).

    Returns:
        Usable rows keyed by normalised case reference, and the problems found (row numbers are 1-based
        line numbers of the CSV, header = line 1).

    Raises:
        ConfigError: The file cannot be read, or a configured column is missing.
    """
    path = Path(data.labels_csv)
    header, rows = read_table(path)
    wanted = wanted_columns(data, stratify_by)
    for key, col in wanted.items():
        if col not in header:
            raise ConfigError(
                f"{key}: column {col!r} is not in {path.name}; expected one of its columns {header}"
            )

    allowed = set(task.label_values)
    by_ref: dict[str, LabelRow] = {}
    first_line: dict[str, int] = {}
    problems: list[LabelProblem] = []
    conflicted: set[str] = set()
    for line, row in enumerate(rows, start=2):
        ref = normalise_ref(row.get(data.id_column) or "", data.id_type)
        label = (row.get(data.label_column) or "").strip()
        if not ref:
            problems.append(
                LabelProblem(line, "empty_id", f"line {line}: column {data.id_column!r} is empty")
            )
            continue
        label = canonical_label(label, allowed) if label else ""
        if label and label not in allowed:
            problems.append(
                LabelProblem(
                    line,
                    "unknown_label",
                    f"line {line}: the value in column {data.label_column!r} is not a configured class; "
                    f"expected one of {sorted(allowed)} (task.classes)",
                    ref,
                    detail=f"label {row.get(data.label_column)!r}",
                )
            )
            continue
        split = None
        if data.split_column and label:
            raw_split = (row.get(data.split_column) or "").strip().lower()
            if raw_split:
                split = SPLIT_ALIASES.get(raw_split)
                if split is None:
                    problems.append(
                        LabelProblem(
                            line,
                            "bad_split",
                            f"line {line}: the value in column {data.split_column!r} is not a split; "
                            f"expected one of {list(SPLITS)} (or an alias such as 'validation') or empty",
                            ref,
                            detail=f"split {row.get(data.split_column)!r}",
                        )
                    )
                    continue
        patient = (row.get(data.patient_column) or "").strip() if data.patient_column else None
        groups = {c: (row.get(c) or "").strip() for c in data.group_columns}
        strata = tuple((row.get(c) or "").strip() for c in stratify_by)
        new = LabelRow(ref, label, split, patient or None, groups, line, strata)
        if ref in by_ref:
            old = by_ref[ref]
            if (old.label, old.split) != (new.label, new.split):
                problems.append(
                    LabelProblem(
                        line,
                        "conflicting_duplicate",
                        f"line {line}: case listed again with label {label!r} (split {split}) but line "
                        f"{first_line[ref]} says {old.label!r} (split {old.split}); the case is left out",
                        ref,
                    )
                )
                conflicted.add(ref)
            else:
                problems.append(
                    LabelProblem(
                        line,
                        "duplicate",
                        f"line {line}: duplicate of line {first_line[ref]} (same label; kept once)",
                    )
                )
            continue
        by_ref[ref] = new
        first_line[ref] = line
    for ref in conflicted:
        by_ref.pop(ref, None)
    return by_ref, problems


def canonical_label(label: str, allowed: set[str]) -> str:
    """Map ``1.0`` to ``1`` when the configured labels are integers."""
    if label in allowed:
        return label
    try:
        as_float = float(label)
    except ValueError:
        return label
    if as_float.is_integer() and str(int(as_float)) in allowed:
        return str(int(as_float))
    return label
