from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import IngestError
from pipeline.ingest.splits import assign_splits

KEY = b"k" * 32


def _patients(n: int, start: int = 0) -> list[str]:
    return [f"P{i:06d}" for i in range(start, start + n)]


def test_no_patient_in_two_splits_with_several_cases() -> None:
    pats = [p for p in _patients(300) for _ in range(3)]  # three cases per patient
    splits = assign_splits(pats, [None] * len(pats), KEY, SplitConfig())
    by_patient: dict[str, set[str]] = {}
    for p, s in zip(pats, splits, strict=True):
        by_patient.setdefault(p, set()).add(s)
    assert all(len(s) == 1 for s in by_patient.values())


def test_adding_patients_moves_none() -> None:
    cfg = SplitConfig()
    old = _patients(500)
    before = dict(zip(old, assign_splits(old, [None] * 500, KEY, cfg), strict=True))
    grown = old + _patients(700, start=500)
    after = dict(zip(grown, assign_splits(grown, [None] * len(grown), KEY, cfg), strict=True))
    assert all(after[p] == before[p] for p in old)


def test_fractions_match_config_within_each_label() -> None:
    cfg = SplitConfig(val=0.1, calibration=0.15, test=0.2)
    pats = _patients(6000)
    labels = np.arange(6000) % 3
    splits = np.array(assign_splits(pats, [None] * 6000, KEY, cfg))
    for lab in range(3):
        c = Counter(splits[labels == lab])
        n = (labels == lab).sum()
        for name, share in (("val", 0.1), ("calibration", 0.15), ("test", 0.2), ("train", 0.55)):
            assert abs(c[name] / n - share) < 0.03, (lab, name, c[name] / n)


def test_key_changes_assignment() -> None:
    pats = _patients(200)
    a = assign_splits(pats, [None] * 200, KEY, SplitConfig())
    b = assign_splits(pats, [None] * 200, b"other-key-000000", SplitConfig())
    assert a != b


def test_fixed_split_column_overrides_and_carves_calibration() -> None:
    pats = _patients(1000)
    fixed = ["test"] * 100 + ["val"] * 100 + ["train"] * 800
    splits = assign_splits(pats, fixed, KEY, SplitConfig(calibration_from_train=0.15))
    assert splits[:100] == ["test"] * 100 and splits[100:200] == ["val"] * 100
    carved = Counter(splits[200:])
    assert set(carved) == {"train", "calibration"}
    assert abs(carved["calibration"] / 800 - 0.15) < 0.04
    # stable: the same patients are carved when more patients arrive
    more = assign_splits(pats + _patients(100, 1000), fixed + ["train"] * 100, KEY, SplitConfig(calibration_from_train=0.15))
    assert more[:1000] == splits


def test_fixed_split_with_calibration_column_is_kept() -> None:
    pats = _patients(10)
    fixed = ["train"] * 6 + ["calibration", "val", "test", "test"]
    assert assign_splits(pats, fixed, KEY, SplitConfig()) == fixed


def test_patient_in_two_fixed_splits_is_refused() -> None:
    with pytest.raises(IngestError, match="several splits"):
        assign_splits(["P1", "P1"], ["train", "test"], KEY, SplitConfig())
