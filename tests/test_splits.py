from __future__ import annotations

import random
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest

from pipeline.config import SplitConfig
from pipeline.errors import IngestError
from pipeline.ingest.splits import (
    SplitLedger,
    assign_splits,
    seed_from_manifests,
    shares,
)

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
    cfg, ledger = SplitConfig(), SplitLedger()
    old = _patients(500)
    before = dict(zip(old, assign_splits(old, [None] * 500, KEY, cfg, ledger=ledger), strict=True))
    grown = old + _patients(700, start=500)
    after = dict(zip(grown, assign_splits(grown, [None] * len(grown), KEY, cfg, ledger=ledger), strict=True))
    assert all(after[p] == before[p] for p in old)


def test_fractions_match_config_within_each_label() -> None:
    cfg = SplitConfig(val=0.1, calibration=0.15, test=0.2)
    pats = _patients(6000)
    labels = np.arange(6000) % 3
    splits = np.array(assign_splits(pats, [None] * 6000, KEY, cfg, labels=labels.tolist()))
    for lab in range(3):
        c = Counter(splits[labels == lab])
        n = (labels == lab).sum()
        for name, share in (("val", 0.1), ("calibration", 0.15), ("test", 0.2), ("train", 0.55)):
            assert abs(c[name] - share * n) < 1, (lab, name, c[name], share * n)


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
    more = assign_splits(
        pats + _patients(100, 1000), fixed + ["train"] * 100, KEY, SplitConfig(calibration_from_train=0.15)
    )
    assert more[:1000] == splits


def test_fixed_split_with_calibration_column_is_kept() -> None:
    pats = _patients(10)
    fixed = ["train"] * 6 + ["calibration", "val", "test", "test"]
    assert assign_splits(pats, fixed, KEY, SplitConfig()) == fixed


def test_patient_in_two_fixed_splits_is_refused() -> None:
    with pytest.raises(IngestError, match="several splits"):
        assign_splits(["P1", "P1"], ["train", "test"], KEY, SplitConfig())


# ------------------------------------------------------------------ unlabelled cases and the ledger


def test_unlabelled_cases_never_held_out_and_pinned_to_train_when_labelled() -> None:
    cfg, ledger = SplitConfig(val=0.3, calibration=0.2, test=0.3), SplitLedger()
    pats = _patients(60)
    first = assign_splits(pats, [None] * 60, KEY, cfg, labels=[None] * 60, ledger=ledger)
    assert first == ["unlabelled"] * 60
    # the same patients, now labelled: every one goes to train (it may have trained as unlabelled data),
    # and none of them counts towards the quotas of later patients
    second = assign_splits(pats, [None] * 60, KEY, cfg, labels=[i % 2 for i in range(60)], ledger=ledger)
    assert second == ["train"] * 60
    assert ledger.counts()[0] == {}
    newcomers = _patients(100, 60)
    third = assign_splits(
        newcomers, [None] * 100, KEY, cfg, labels=[i % 2 for i in range(100)], ledger=ledger
    )
    assert Counter(third)["test"] == 30


def test_patient_with_labelled_and_unlabelled_cases() -> None:
    ledger = SplitLedger()
    out = assign_splits(
        ["A", "A", "B"], [None, None, None], KEY, SplitConfig(), labels=[1, None, None], ledger=ledger
    )
    assert (
        out[1] == "unlabelled"
        and out[2] == "unlabelled"
        and out[0] in ("train", "val", "calibration", "test")
    )
    assert ledger.entries["A"]["how"] == "rule" and ledger.entries["B"] == {
        "split": "train",
        "how": "unlabelled",
        "class": None,
        "stratum": None,
    }


def test_fixed_split_column_wins_over_the_ledger() -> None:
    ledger = SplitLedger()
    pats = _patients(40)
    before = assign_splits(pats, [None] * 40, KEY, SplitConfig(), labels=[0] * 40, ledger=ledger)
    moved = next(i for i, s in enumerate(before) if s != "test")
    fixed: list[str | None] = [None] * 40
    fixed[moved] = "test"
    after = assign_splits(pats, fixed, KEY, SplitConfig(), labels=[0] * 40, ledger=ledger)
    assert after[moved] == "test"
    assert [a for i, a in enumerate(after) if i != moved] == [b for i, b in enumerate(before) if i != moved]


def test_existing_workspace_keeps_its_assignments() -> None:
    # manifests written by the earlier (hashed) rule, deliberately off quota: every patient keeps its split
    old = [
        {"patient_id": p, "split": s, "label_index": str(i % 2)}
        for i, (p, s) in enumerate(zip(_patients(40), ["test"] * 20 + ["train"] * 20, strict=True))
    ]
    newer = [dict(r, split="val") if r["patient_id"] == "P000000" else r for r in old]
    ledger = seed_from_manifests([old, newer])
    assert ledger.entries["P000000"]["split"] == "val"
    pats = _patients(40) + _patients(200, 40)
    out = assign_splits(
        pats, [None] * 240, KEY, SplitConfig(), labels=[i % 2 for i in range(240)], ledger=ledger
    )
    expected = {r["patient_id"]: r["split"] for r in newer}
    assert all(out[i] == expected[p] for i, p in enumerate(pats[:40]))
    # the newcomers fill the deficits: test was over its share, so few newcomers go there
    assert Counter(out[40:])["test"] < 0.2 * 200


def test_ledger_round_trip_and_bad_file(tmp_path) -> None:
    ledger = SplitLedger()
    assign_splits(_patients(10), [None] * 10, KEY, SplitConfig(), labels=[0, 1] * 5, ledger=ledger)
    path = tmp_path / "ledger.json"
    ledger.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert SplitLedger.load(path).entries == ledger.entries
    assert SplitLedger.load(tmp_path / "none.json") is None
    path.write_text("{not json")
    with pytest.raises(IngestError) as e:
        SplitLedger.load(path)
    assert e.value.code == "bad_split_ledger" and "ledger.json" in str(e.value)


# ------------------------------------------------------------------ property tests: growing cohorts

CONFIGS = [
    SplitConfig(),
    SplitConfig(val=0.1, calibration=0.15, test=0.2),
    SplitConfig(val=0.3, calibration=0.0, test=0.3),
    SplitConfig(val=0.05, calibration=0.05, test=0.1),
    SplitConfig(val=0.33, calibration=0.27, test=0.29),
]


def _cohort(rng: random.Random, n: int) -> list[tuple[str, list[int | None], str]]:
    """Patients with 1-4 cases, a skewed class mix (3 classes, some mixed-label patients) and a site."""
    out = []
    for i in range(n):
        base = rng.choices([0, 1, 2], weights=[6, 3, 1])[0]
        cases: list[int | None] = [
            base if rng.random() < 0.85 else rng.randrange(3) for _ in range(rng.randint(1, 4))
        ]
        if rng.random() < 0.1:
            cases.append(None)  # an unlabelled case of a labelled patient
        out.append((f"Q{i:05d}", cases, rng.choice(["siteA", "siteA", "siteB", "siteC"])))
    return out


def _orders(cohort, rng: random.Random) -> dict[str, list[list]]:
    """Three arrival orders of the same cohort, each as a list of nightly batches of varying size."""

    def batches(seq):
        out, i = [], 0
        while i < len(seq):
            k = rng.choice([1, 1, 2, 5, 17, 40])
            out.append(seq[i : i + k])
            i += k
        return out

    shuffled = list(cohort)
    rng.shuffle(shuffled)
    by_site = sorted(cohort, key=lambda c: (c[2], c[0]))  # all of site A first, then B, then C
    return {"given": batches(list(cohort)), "shuffled": batches(shuffled), "site_by_site": batches(by_site)}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.val}-{c.calibration}-{c.test}")
@pytest.mark.parametrize("seed", [0, 1])
def test_growing_cohorts_stay_within_one_patient_of_quota_and_never_move(cfg: SplitConfig, seed: int) -> None:
    rng = random.Random(seed)
    cohort = _cohort(rng, 260)
    f = shares(cfg)
    for order, nights in _orders(cohort, rng).items():
        ledger = SplitLedger()
        seen: list = []
        placed: dict[str, str] = {}
        for batch in nights:
            seen.extend(batch)
            pats, labels, strata = [], [], []
            for p, cases, site in seen:  # every night re-reads the whole cohort so far
                for y in cases:
                    pats.append(p)
                    labels.append(y)
                    strata.append(site)
            out = assign_splits(
                pats, [None] * len(pats), KEY, cfg, labels=labels, strata=strata, ledger=ledger
            )
            split_of: dict[str, set[str]] = defaultdict(set)
            for p, y, s in zip(pats, labels, out, strict=True):
                if y is None:
                    assert s == "unlabelled"
                else:
                    split_of[p].add(s)
            assert all(len(s) == 1 for s in split_of.values()), "a patient in two splits"
            for p, s in split_of.items():
                assert placed.setdefault(p, next(iter(s))) == next(iter(s)), f"{order}: patient moved"
            by_class, by_stratum = ledger.counts()
            for k, counts in by_class.items():
                n = sum(counts.values())
                for name, share in f.items():
                    assert abs(counts[name] - share * n) < 1, (order, k, name, dict(counts), n)
            # the site strata inside each class are balanced too (not guaranteed within one, but close)
            for (k, g), counts in by_stratum.items():
                n = sum(counts.values())
                assert all(abs(counts[name] - share * n) <= 3 for name, share in f.items()), (k, g, counts)
        # the report counts: patients per class per split match the ledger's class counts
        classes = Counter(e["class"] for e in ledger.entries.values())
        assert sum(classes.values()) == len(cohort)


def test_shares_are_exact() -> None:
    assert shares(SplitConfig()) == {
        "train": Fraction(1, 2),
        "val": Fraction(3, 20),
        "calibration": Fraction(3, 20),
        "test": Fraction(1, 5),
    }


def test_small_cohort_quotas_at_every_size() -> None:
    # a single class arriving one patient a night: counts within one patient of share * n at every n
    cfg, ledger = SplitConfig(), SplitLedger()
    f = shares(cfg)
    pats: list[str] = []
    for i in range(120):
        pats.append(f"S{i:04d}")
        assign_splits(pats, [None] * len(pats), KEY, cfg, labels=[0] * len(pats), ledger=ledger)
        counts = Counter(e["split"] for e in ledger.entries.values())
        assert all(abs(counts[s] - f[s] * (i + 1)) < 1 for s in f), (i, counts)
