from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import DataConfig, TaskConfig
from pipeline.errors import ConfigError
from pipeline.ingest.labels import read_labels

TASK = TaskConfig(kind="binary", classes={"0": "malignant", "1": "benign"}, positive_class="malignant")


def _data(tmp_path: Path, text: str, **kw) -> DataConfig:
    (tmp_path / "labels.csv").write_text(text)
    return DataConfig(source=tmp_path, labels_csv=tmp_path / "labels.csv", id_column="path", label_column="label", **kw)


def test_problems_are_reported_with_line_and_reason(tmp_path: Path) -> None:
    text = "path,label\na.dcm,0\nb.dcm,\nc.dcm,7\n,1\nd.dcm,1\nd.dcm,0\ne.dcm,1.0\ne.dcm,1\n"
    rows, problems = read_labels(_data(tmp_path, text), TASK)
    assert set(rows) == {"a.dcm", "b.dcm", "e.dcm"}
    assert rows["e.dcm"].label == "1" and rows["e.dcm"].line == 8
    # an empty label cell is an unlabelled case, not a problem
    assert rows["b.dcm"].label == "" and not rows["b.dcm"].labelled and rows["b.dcm"].line == 3
    codes = {p.code: p for p in problems}
    assert "missing_label" not in codes
    # the published reason names the line, the column and what was expected, never the cell's value (a CSV
    # cell may hold a name); the value is kept in the private ``detail``
    assert "'7'" not in codes["unknown_label"].reason and "['0', '1']" in codes["unknown_label"].reason
    assert "line 4" in codes["unknown_label"].reason and "'label'" in codes["unknown_label"].reason
    assert codes["unknown_label"].detail == "label '7'" and codes["unknown_label"].ref == "c.dcm"
    assert codes["empty_id"].row == 5
    assert "d.dcm" not in rows and codes["conflicting_duplicate"].row == 7
    assert codes["duplicate"].row == 9


def test_missing_column_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        read_labels(_data(tmp_path, "file,label\na,0\n"), TASK)
    assert "data.id_column" in str(e.value) and "'path'" in str(e.value) and "file" in str(e.value)


def test_split_aliases_and_bad_split(tmp_path: Path) -> None:
    text = "path,label,s\na,0,Validation\nb,1,Holdout Marigold\n"
    rows, problems = read_labels(_data(tmp_path, text, split_column="s"), TASK)
    assert rows["a"].split == "val"
    assert problems[0].code == "bad_split" and problems[0].row == 3
    # neither the cell nor its lower-cased form is in the published reason; the private detail keeps it
    assert "marigold" not in problems[0].reason.lower() and "holdout" not in problems[0].reason.lower()
    assert problems[0].detail == "split 'Holdout Marigold'"


def test_unlabelled_row_ignores_its_split_and_keeps_strata(tmp_path: Path) -> None:
    text = "path,label,s,site\na,,test,X\nb,1,test,Y\n"
    rows, problems = read_labels(_data(tmp_path, text, split_column="s"), TASK, stratify_by=("site",))
    assert problems == []
    assert rows["a"].split is None and rows["a"].strata == ("X",)
    assert rows["b"].split == "test" and rows["b"].strata == ("Y",)


def test_missing_stratify_column_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        read_labels(_data(tmp_path, "path,label\na,0\n"), TASK, stratify_by=("site",))
    assert "split.stratify_by[0]" in str(e.value) and "'site'" in str(e.value)
