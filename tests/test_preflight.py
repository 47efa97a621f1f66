"""`medtl check` (and `medtl run`, before any stage) refuse what would fail later: exit 2, no traceback, a
message naming the field, and CSV lines by number only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.cli import main
from tests.conftest import make_dataset, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    make_dataset(root, n_patients=12)
    return root


def _check(config: Path, capsys) -> tuple[int, str]:
    rc = main(["check", str(config)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_a_good_config_passes(data: Path, capsys) -> None:
    rc, out = _check(write_config(data), capsys)
    assert rc == 0 and "valid" in out


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [
        ({"model": {"backbone": "efficientnet_lite9", "pretrained": True}}, "model.backbone", "unknown_backbone"),
        ({"model": {"backbone": "resnet10_3d_compact", "pretrained": False}}, "preprocess.spatial_dims", "dims_mismatch"),
        ({"model": {"backbone": "medicalnet_resnet10", "pretrained": True},
          "preprocess": {"spatial_dims": 3, "image_size": 16}}, "model.pretrained", "weights_"),
        ({"data": {"source": "images", "labels_csv": "labels.csv", "id_column": "file", "id_type": "path",
                   "label_column": "diagnosis", "split_column": "fold"}}, "data.split_column", "missing_column"),
        ({"data": {"source": "images", "labels_csv": "labels.csv", "id_column": "filename", "id_type": "path",
                   "label_column": "diagnosis"}}, "data.id_column", "missing_column"),
        ({"data": {"source": "images", "labels_csv": "labels.csv", "id_column": "file", "id_type": "path",
                   "label_column": "diagnosis", "group_columns": ["site"]}}, "data.group_columns[0]", "missing_column"),
        ({"task": {"kind": "multiclass", "classes": {"normal": "normal", "lesion": "lesion", "cyst": "cyst"}}},
         "task.classes", "class_without_cases"),
    ],
)
def test_each_mistake_is_refused_with_its_field(data: Path, capsys, overrides, field, code) -> None:
    rc, out = _check(write_config(data, **overrides), capsys)
    assert rc == 2 and field in out and f"code {code}" in out, out
    assert "Traceback" not in out


def test_unknown_labels_are_counted_by_line_never_quoted(tmp_path: Path, capsys) -> None:
    make_dataset(tmp_path, n_patients=12)
    csv_path = tmp_path / "labels.csv"
    lines = csv_path.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    col = header.split(",").index("diagnosis")
    cells = rows[2].split(",")
    cells[col] = "Jane Doe"  # a patient's name typed into the label column
    rows[2] = ",".join(cells)
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    rc, out = _check(write_config(tmp_path), capsys)
    assert rc == 2 and "data.label_column" in out and "CSV lines 4" in out and "unknown_label" in out
    assert "jane" not in out.lower()


def test_empty_source_folder_and_run_refuses_before_any_stage(tmp_path: Path, capsys) -> None:
    make_dataset(tmp_path, n_patients=12)
    for f in sorted((tmp_path / "images").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    config = write_config(tmp_path)
    rc, out = _check(config, capsys)
    assert rc == 2 and "data.source" in out and "empty_source" in out
    rc = main(["run", str(config)])
    out = capsys.readouterr()
    assert rc == 2 and "empty_source" in (out.out + out.err)
    assert not (tmp_path / "ws" / "ingest").exists()  # no stage started


def test_run_goes_on_past_single_bad_rows(tmp_path: Path) -> None:
    """A label typo in one row is refused by `check` but is a per-row problem for `run` (batch rule)."""
    from pipeline.config import load_config
    from pipeline.preflight import preflight

    make_dataset(tmp_path, n_patients=12)
    csv_path = tmp_path / "labels.csv"
    text = csv_path.read_text().splitlines()
    text[3] = text[3].replace("lesion", "lesoin").replace("normal", "lesoin")
    csv_path.write_text("\n".join(text) + "\n")
    problems = preflight(load_config(write_config(tmp_path)), models=False)
    assert [p.code for p in problems] == ["unknown_label"] and problems[0].per_row
