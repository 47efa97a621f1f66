"""Reading and checking the labels CSV.

One row per case: an identifier column (a relative file path or a DICOM identifier), a label column, and
optionally a fixed split, a patient identifier, subgroup and stratification columns. Bad rows are reported,
never silently dropped: an unknown label value, an empty identifier, duplicate rows that disagree. A row with
an empty label cell is kept as an unlabelled case (``label == ""``; its split cell is ignored, as unlabelled
cases never go to val, calibration or test).

Multilabel tasks (``task.kind: multilabel``, ``task.classes`` = labels-CSV column -> finding name) read one
column per finding instead of ``data.label_column``. A cell is ``1``/``0``, written also as ``1.0``/``0.0``
or ``true``/``false`` (any case, as spreadsheets and pandas export booleans); surrounding spaces are
ignored. The row's label is the vector of its findings in ``task.classes`` order, written ``"0;1;0"``. A row
whose finding cells are ALL empty is an unlabelled case (as an empty label cell). A cell that is anything
else is a per-row problem ``bad_multilabel_value`` (line and column named, never the value); a row with
some but not all finding cells empty is rejected as ``partial_multilabel``: reading an empty cell as
"absent" would plant false negatives, and no loss here masks unknown findings. Both rows are left out and
the run goes on with the rest.

Privacy: a CSV cell is free text and may hold a patient's name. A problem's ``reason`` (published in the
ingest report, the run report and logs) names only the line number, the configured column and what was
expected, never a cell's value; the offending value goes to ``detail``, which is written under ``private/``
only.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
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


#: Multilabel cell spellings -> 0/1 (an empty cell is "unknown", see the module docstring).
MULTILABEL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "false": 0, "true": 1}
MULTILABEL_SEPARATOR = ";"


def wanted_columns(
    data: DataConfig, stratify_by: Sequence[str] = (), task: TaskConfig | None = None
) -> dict[str, str]:
    """Config field -> labels-CSV column every configured column must name (a multilabel ``task``'s finding
    columns replace ``data.label_column``)."""
    wanted = {"data.id_column": data.id_column}
    if task is not None and task.multilabel:
        for col in task.classes:
            wanted[f"task.classes[{col!r}]"] = col
    else:
        wanted["data.label_column"] = data.label_column
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
    wanted = wanted_columns(data, stratify_by, task)
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
        if not ref:
            problems.append(
                LabelProblem(line, "empty_id", f"line {line}: column {data.id_column!r} is empty")
            )
            continue
        if task.multilabel:
            label, problem = multilabel_vector(row, task, line, ref)
            if problem is not None:
                problems.append(problem)
                continue
        else:
            label = (row.get(data.label_column) or "").strip()
            label = canonical_label(label, allowed) if label else ""
        if label and not task.multilabel and label not in allowed:
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


def multilabel_vector(
    row: dict[str, str], task: TaskConfig, line: int, ref: str = ""
) -> tuple[str, LabelProblem | None]:
    """A multilabel row's label: ``"0;1;0"`` in ``task.classes`` order, ``""`` when every finding cell is
    empty (unlabelled), or a problem (``bad_multilabel_value``, ``partial_multilabel``; reasons name the
    line and columns, the offending values go to the private ``detail``)."""
    cells = {col: (row.get(col) or "").strip() for col in task.classes}
    empty = [col for col, v in cells.items() if v == ""]
    if len(empty) == len(cells):
        return "", None
    bad = [col for col, v in cells.items() if v != "" and v.lower() not in MULTILABEL_VALUES]
    if bad:
        return "", LabelProblem(
            line,
            "bad_multilabel_value",
            f"line {line}: the value in column(s) {bad} is not a finding label; expected 0 or 1 (also 0.0/1.0, "
            "true/false) or empty (task.classes of a multilabel task)",
            ref,
            detail="; ".join(f"{col} {cells[col]!r}" for col in bad),
        )
    if empty:
        return "", LabelProblem(
            line,
            "partial_multilabel",
            f"line {line}: column(s) {empty} are empty while other findings are labelled; expected every "
            "finding column filled (0/1), or all of them empty for an unlabelled case",
            ref,
        )
    return MULTILABEL_SEPARATOR.join(str(MULTILABEL_VALUES[v.lower()]) for v in cells.values()), None


def parse_multilabel(label: str, n_findings: int) -> list[int]:
    """``"0;1;0"`` -> ``[0, 1, 0]`` (a manifest's or index's multilabel ``label``).

    Raises:
        ValueError: Not ``n_findings`` values of 0/1.
    """
    parts = label.split(MULTILABEL_SEPARATOR)
    if len(parts) != n_findings or any(p not in ("0", "1") for p in parts):
        raise ValueError(f"multilabel label: expected {n_findings} values 0/1 separated by ';'")
    return [int(p) for p in parts]


def multilabel_stratum(vector: Sequence[int], prevalence: Sequence[float]) -> int:
    """The class a multilabel case is stratified and balanced under: 0 with no finding, else ``1 + j`` for
    its rarest positive finding ``j`` (lowest ``prevalence``; ties: the first finding). The manifest's
    ``label_index`` of a multilabel case is this stratum."""
    pos = [j for j, v in enumerate(vector) if v]
    if not pos:
        return 0
    return 1 + min(pos, key=lambda j: (prevalence[j], j))


def finding_prevalence(rows: Iterable[LabelRow | None], task: TaskConfig) -> list[float]:
    """Share of the labelled rows positive for each finding (multilabel tasks; empty list otherwise)."""
    if not task.multilabel:
        return []
    vectors = [parse_multilabel(r.label, len(task.classes)) for r in rows if r is not None and r.labelled]
    n = max(1, len(vectors))
    return [sum(v[j] for v in vectors) / n for j in range(len(task.classes))]


def label_index_of(row: LabelRow, task: TaskConfig, prevalence: Sequence[float] = ()) -> int | str:
    """The manifest's ``label_index``: the class index, the :func:`multilabel_stratum` of a multilabel
    case, ``""`` when unlabelled."""
    if not row.labelled:
        return ""
    if task.multilabel:
        return multilabel_stratum(parse_multilabel(row.label, len(task.classes)), prevalence)
    return task.label_values.index(row.label)


def class_name_of(row: LabelRow, task: TaskConfig) -> str:
    """The manifest's ``class_name``: the class, or a multilabel case's positive findings joined by ``;``
    (``none`` without any)."""
    if not row.labelled:
        return ""
    if task.multilabel:
        vec = parse_multilabel(row.label, len(task.classes))
        return MULTILABEL_SEPARATOR.join(n for n, v in zip(task.class_names, vec, strict=True) if v) or "none"
    return task.classes[row.label]


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
