"""Every input accounted for (issue 15 point 6): each entry under data.source, including hidden files,
symlinks, folders that cannot be listed and non-regular files, is counted in ingest_report.json and every
one not ingested carries a code; nothing is dropped silently (os.walk skipped unreadable folders without a
word: in a tree of 50 entries, 44 were accounted for)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.ingest.sources import scan_sources
from pipeline.ingest.stage import run_ingest
from tests.conftest import make_dataset, write_config


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


def _odd_tree(img: Path) -> None:
    """Add one of every kind of entry beside the dataset's case folders."""
    first = sorted(img.rglob("*.dcm"))[0]
    (img / ".hidden_file").write_bytes(first.read_bytes())
    (img / ".hidden_dir").mkdir()
    (img / ".hidden_dir" / "x.dcm").write_bytes(first.read_bytes())
    (img / "locked").mkdir()
    (img / "locked" / "y.dcm").write_bytes(first.read_bytes())
    (img / "notes.txt").write_text("free text")
    os.symlink(first.parent, img / "link_to_folder")
    os.symlink(first, img / "link_to_file.dcm")
    os.symlink(img / "gone.dcm", img / "broken_link")
    os.mkfifo(img / "a_pipe")


def _all_entries(root: Path, skip: set[str]) -> int:
    """Independent count: every name listed in every folder that is walked (not hidden, not skipped)."""
    n = 0
    for _dirpath, dirnames, filenames in os.walk(root):
        n += len(dirnames) + len(filenames)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip]
    return n


@pytest.fixture
def unlistable(monkeypatch):
    """``locked`` cannot be listed (tests run as root, where chmod 000 does not stop a listing)."""
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_every_entry_is_counted_with_a_code(tmp_path: Path, unlistable) -> None:
    make_dataset(tmp_path, n_patients=12)
    img = tmp_path / "images"
    _odd_tree(img)
    cfg = load_config(
        write_config(
            tmp_path,
            deid={"key_env": "MEDTL_TEST_KEY"},
            split={"val": 0.25, "calibration": 0.2, "test": 0.25},
        )
    )
    out = tmp_path / "ws" / "ingest" / "a"
    out.mkdir(parents=True)
    report = run_ingest(cfg, out, tmp_path / "ws")
    inputs = report["inputs"]
    assert inputs["entries"] == _all_entries(img, {"locked"}) == 32  # 12 case folders + 12 files + 8 odd
    cats = inputs["by_category"]
    assert cats == {
        "broken_symlink": 1,
        "folder": 12,
        "hidden_file": 1,
        "hidden_folder": 1,
        "not_regular": 1,
        "regular_file": 13,
        "symlink_followed": 1,
        "symlink_not_followed": 1,
        "unreadable_folder": 1,
    }
    assert sum(cats.values()) == inputs["entries"]
    codes = report["problems_by_code"]
    for code in (
        "hidden",
        "symlink_not_followed",
        "broken_symlink",
        "unreadable_folder",
        "not_regular",
        "skipped",
    ):
        assert codes.get(code), code
    assert codes["hidden"] == 2 and "followed" in inputs["symlinks"]
    # the followed symlink is read as the file it points to: one more case
    assert report["cases"] == 13
    text = json.dumps(report)
    assert str(img) not in text and "locked" not in text and "link_to" not in text


def test_unselected_kinds_and_side_cars_are_reported_for_any_kinds(tmp_path: Path) -> None:
    """Today: with data.kinds not holding dicom, side-cars and other kinds' files vanish without a code."""
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.dcm").write_bytes(b"not really")
    census: dict = {}
    items, rejected = scan_sources(tmp_path, kinds=("nifti",), census=census)
    assert items == [] and sorted(r.code for r in rejected) == ["kind_not_selected", "skipped"]
    assert census["entries"] == 2 and census["rejected_by_code"] == {"kind_not_selected": 1, "skipped": 1}


def test_unreadable_root_is_a_clear_error(tmp_path: Path, unlistable) -> None:
    from pipeline.errors import IngestError

    (tmp_path / "locked").mkdir()
    with pytest.raises(IngestError) as err:
        scan_sources(tmp_path / "locked")
    assert err.value.code == "unreadable_folder"
