"""Patient-level splits: stratified by label (and ``split.stratify_by`` columns), and stable.

No pure keyed hash can be both stable (adding patients never moves one) and within one patient of each
split's quota at every cohort size, so the assignments are kept in a private ledger
(:class:`SplitLedger`, ``<workspace>/private/splits/ledger.json``, pseudonyms and codes only). A patient in
the ledger keeps its split forever. New patients are placed one at a time in keyed-hash order: a patient of
class ``k`` goes to the split with the largest deficit (``share * (n + 1) - count``) within its stratum
(class and ``stratify_by`` values), among the splits that keep class ``k``'s counts within one patient of
``share * n`` now and for every later arrival. The last condition is a scheduling check (the ``j``-th
patient of a split must arrive in the window ``((j - 1) / share, j / share]``; a state stays feasible for
every future arrival iff no horizon ``T`` has more due patients than ``T``, see :class:`_Quota`); it is
written here because no maintained library offers stable, sequential quota apportionment.

Counts are patients. Only patients placed by this rule (or seeded from an existing workspace's manifests,
see :func:`seed_from_manifests`) count towards the quotas; two kinds of patients are forced instead:

- A fixed split column in the labels CSV wins for its rows (e.g. MedMNIST's official splits);
  ``calibration_from_train`` then moves a hashed, stable share of the fixed ``train`` patients to
  ``calibration``.
- A patient whose only cases are unlabelled is pinned to ``train`` in the ledger the first time it is
  seen (its cases may be used as unlabelled training data), so it goes to ``train`` when labelled.

Unlabelled cases themselves always get the split ``unlabelled``; never val, calibration or test.

Multilabel tasks: a case's class here is its finding pattern's stratum (the manifest's ``label_index``,
:func:`pipeline.ingest.labels.multilabel_stratum`): 0 with no finding, else ``1 + j`` for its rarest positive
finding ``j``, so every finding's rare positives are spread over the splits by quota like a class; the
ledger, seeding and property guarantees are the same (counts are per stratum).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import SplitConfig
from pipeline.errors import IngestError

#: Split order: ties between equal deficits go to the earlier one.
SPLIT_ORDER = ("train", "val", "calibration", "test")
HELD_OUT = ("val", "calibration", "test")
UNLABELLED = "unlabelled"
LEDGER_VERSION = 1


def unit_hash(patient: str, key: bytes, salt: str = "split") -> float:
    """Keyed hash of a patient pseudonym to [0, 1)."""
    digest = hmac.new(key, f"{salt}:{patient}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def shares(cfg: SplitConfig) -> dict[str, Fraction]:
    """Exact share of each split (train takes the rest); decimal config values become exact fractions."""
    out = {s: Fraction(str(getattr(cfg, s))) for s in HELD_OUT}
    return {"train": 1 - sum(out.values()), **out}


class _Quota:
    """Which split may take the next patient of one stratum so that every split stays within one patient
    of ``share * n`` for this and every later arrival.

    With ``c`` the counts after a placement and ``n`` their sum, the state is valid when
    ``share * n - 1 < c < share * n + 1`` for every split, and it can be continued forever iff for every
    horizon ``T >= 1`` the patients due by ``n + T`` (``sum max(0, floor(share * (n + T)) - c)``) number
    at most ``T`` (Hall's condition for unit jobs with windows of length ``1 / share``; only
    ``T <= max(1 / share) + 1`` can bind, as the due count sums to at most ``T`` beyond that). Shares are
    kept as integers over a common denominator, so the arithmetic is exact and vectorised.
    """

    def __init__(self, split_shares: dict[str, Fraction]) -> None:
        self.f = {s: v for s, v in split_shares.items() if v > 0}
        self.order = [s for s in SPLIT_ORDER if s in self.f]
        self.den = math.lcm(*(v.denominator for v in self.f.values()))
        self.num = np.array([int(self.f[s] * self.den) for s in self.order], dtype=np.int64)
        self.horizon = np.arange(1, math.ceil(max(1 / v for v in self.f.values())) + 2, dtype=np.int64)

    def safe(self, counts: Counter, split: str) -> bool:
        c = np.array([counts[s] + (s == split) for s in self.order], dtype=np.int64)
        n = int(c.sum())
        scaled, an = c * self.den, self.num * n
        if np.any(scaled <= an - self.den) or np.any(scaled >= an + self.den):
            return False
        due = (self.num[:, None] * (n + self.horizon)[None, :]) // self.den - c[:, None]
        return bool(np.all(np.maximum(due, 0).sum(axis=0) <= self.horizon))

    def choose(self, class_counts: Counter, stratum_counts: Counter) -> str:
        """The split for the next patient: largest stratum deficit among the safe splits (then largest
        class deficit, then :data:`SPLIT_ORDER`). A ledger seeded off quota may have no safe split; the
        largest class deficit then brings it back towards its quotas."""
        n_k = sum(class_counts[s] for s in self.order) + 1
        n_g = sum(stratum_counts[s] for s in self.order) + 1

        def class_deficit(s: str) -> Fraction:
            return self.f[s] * n_k - class_counts[s]

        ranked = sorted(
            self.order,
            key=lambda s: (self.f[s] * n_g - stratum_counts[s], class_deficit(s), -self.order.index(s)),
            reverse=True,
        )
        for s in ranked:
            if self.safe(class_counts, s):
                return s
        return max(self.order, key=lambda s: (class_deficit(s), -self.order.index(s)))


@dataclass
class SplitLedger:
    """The workspace's split assignments: patient pseudonym -> entry (PRIVATE; pseudonyms and codes only).

    An entry is ``{"split", "how", "class", "stratum"}``: ``how`` is ``rule`` (placed by quota),
    ``seeded`` (taken from an existing manifest) or ``unlabelled`` (pinned to train when first seen with
    unlabelled cases only); ``class`` the label index the quota counted it under (None when pinned);
    ``stratum`` a keyed token of its ``stratify_by`` values (never the values).
    """

    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> SplitLedger | None:
        """The ledger at ``path``, or None when there is none yet.

        Raises:
            IngestError: The file exists but is not a ledger (code ``bad_split_ledger``).
        """
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            entries = doc["patients"]
            if doc.get("version") != LEDGER_VERSION or not isinstance(entries, dict):
                raise ValueError(f"version {doc.get('version')!r}")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IngestError(
                f"split ledger private/splits/{path.name}: unreadable ({type(err).__name__}); expected the "
                f"JSON written by Ingest (version {LEDGER_VERSION})",
                code="bad_split_ledger",
            ) from err
        return cls(dict(entries))

    def save(self, path: Path) -> None:
        """Write atomically (mode 0600)."""
        from pipeline.io import write_json

        write_json(path, {"version": LEDGER_VERSION, "patients": self.entries}, mode=0o600)

    def counts(self) -> tuple[dict[int, Counter], dict[tuple[int, str], Counter]]:
        """Patients per split of each class and of each (class, stratum), over the quota-counted entries."""
        by_class: dict[int, Counter] = defaultdict(Counter)
        by_stratum: dict[tuple[int, str], Counter] = defaultdict(Counter)
        for e in self.entries.values():
            if e.get("how") in ("rule", "seeded") and e.get("class") is not None:
                by_class[e["class"]][e["split"]] += 1
                by_stratum[(e["class"], e.get("stratum") or "")][e["split"]] += 1
        return by_class, by_stratum


def seed_from_manifests(manifests: Iterable[list[dict[str, str]]]) -> SplitLedger:
    """A ledger holding the current assignments of an existing workspace (manifests oldest first; a later
    manifest's split wins). Only labelled rows of the four splits count."""
    ledger = SplitLedger()
    for rows in manifests:
        labels: dict[str, Counter] = defaultdict(Counter)
        split_of: dict[str, str] = {}
        for r in rows:
            if r.get("split") in SPLIT_ORDER and str(r.get("label_index", "")).strip() != "":
                labels[r["patient_id"]][int(r["label_index"])] += 1
                split_of[r["patient_id"]] = r["split"]
        for p, s in split_of.items():
            ledger.entries[p] = {
                "split": s,
                "how": "seeded",
                "class": _patient_class(labels[p]),
                "stratum": None,
            }
    return ledger


def _patient_class(labels: Counter) -> int:
    """A patient's class for stratification: its most frequent label index (ties: the lowest)."""
    return min(labels, key=lambda k: (-labels[k], k))


def assign_splits(
    patients: Sequence[str],
    fixed: Sequence[str | None],
    key: bytes,
    cfg: SplitConfig,
    labels: Sequence[int | None] | None = None,
    strata: Sequence[str] | None = None,
    ledger: SplitLedger | None = None,
) -> list[str]:
    """Assign a split to every case, updating ``ledger`` (a fresh one when None).

    Args:
        patients: Patient pseudonym of each case.
        fixed: Fixed split of each case from the labels CSV, or None to use the ledger / quota rule.
        key: The workspace's secret key (orders new patients; carves calibration from a fixed train).
        cfg: Split fractions.
        labels: Label index of each case, None for an unlabelled case (default: all labelled, one class).
        strata: Keyed token of each case's ``stratify_by`` values (default: none).
        ledger: The workspace's assignments; new patients are added to it.

    Returns:
        The split name of each case (``unlabelled`` for unlabelled cases).

    Raises:
        IngestError: A patient's cases carry different fixed splits (that would leak the patient).
    """
    n = len(patients)
    labels = list(labels) if labels is not None else [0] * n
    strata = list(strata) if strata is not None else [""] * n
    ledger = ledger if ledger is not None else SplitLedger()
    fixed_by_patient: dict[str, set[str]] = defaultdict(set)
    class_votes: dict[str, Counter] = defaultdict(Counter)
    stratum_of: dict[str, str] = {}
    for p, f, y, g in zip(patients, fixed, labels, strata, strict=True):
        if y is None:
            continue
        class_votes[p][y] += 1
        stratum_of.setdefault(p, g)
        if f is not None:
            fixed_by_patient[p].add(f)
    leaking = {p: s for p, s in fixed_by_patient.items() if len(s) > 1}
    if leaking:
        example, splits = next(iter(leaking.items()))
        raise IngestError(
            f"split column: {len(leaking)} patient(s) have cases in several splits (e.g. patient {example} "
            f"in {sorted(splits)}); expected every case of a patient in one split",
            code="patient_in_two_splits",
        )
    # Only carve calibration out of a fixed train split when the column names no calibration cases.
    carve = cfg.calibration_from_train if "calibration" not in set(fixed) else 0.0
    split_of: dict[str, str] = {}
    for p, fs in fixed_by_patient.items():
        f = next(iter(fs))
        split_of[p] = "calibration" if f == "train" and unit_hash(p, key, salt="calibration") < carve else f

    new = sorted(
        (p for p in class_votes if p not in split_of and p not in ledger.entries),
        key=lambda p: (unit_hash(p, key, salt="order"), p),
    )
    if new:
        quota = _Quota(shares(cfg))
        by_class, by_stratum = ledger.counts()
        for p in new:
            k, g = _patient_class(class_votes[p]), stratum_of[p]
            s = quota.choose(by_class[k], by_stratum[(k, g)])
            ledger.entries[p] = {"split": s, "how": "rule", "class": k, "stratum": g or None}
            by_class[k][s] += 1
            by_stratum[(k, g)][s] += 1
    for p in class_votes:
        if p in split_of:
            continue
        entry = ledger.entries[p]
        if entry.get("stratum") is None and stratum_of[p] and entry["how"] == "seeded":
            entry["stratum"] = stratum_of[p]
        split_of[p] = entry["split"]
    for p in set(patients) - set(class_votes):
        # Unlabelled cases only: pinned to train the first time, as they may train as unlabelled data.
        ledger.entries.setdefault(p, {"split": "train", "how": UNLABELLED, "class": None, "stratum": None})
    return [UNLABELLED if y is None else split_of[p] for p, y in zip(patients, labels, strict=True)]


# The locked promotion holdout: a keyed-hash share of the test patients (stable as data grows), used by
# promotion decisions only and left out of the Evaluate report's test metrics.


def holdout_mask(patients: np.ndarray, key: bytes, fraction: float) -> np.ndarray:
    """Boolean ``(N,)``: the case's patient belongs to the locked holdout (keyed hash, stable as data grows)."""
    return np.array(
        [unit_hash(str(p), key, salt="promotion-holdout") < fraction for p in patients], dtype=bool
    )


def usable_holdout(
    patients: np.ndarray, y: np.ndarray, n_classes: int, key: bytes, fraction: float, min_cases: int
) -> np.ndarray | None:
    """The locked holdout mask when it is usable (at least ``min_cases`` cases and every class), else None.

    The one rule shared by promotion decisions (which use the holdout) and the Evaluate report (which
    leaves it out of its test metrics, so the holdout serves promotion decisions only). ``y`` may be a
    multilabel matrix ``(N, F)``: then "every class" is "positive and negative cases of every finding".
    """
    mask = holdout_mask(patients, key, fraction)
    if mask.sum() >= min_cases and every_class(np.asarray(y)[mask], n_classes):
        return mask
    return None


def every_class(y: np.ndarray, n_classes: int) -> bool:
    """All ``n_classes`` labels occur in ``y`` (a multilabel matrix: every finding both present and absent)."""
    y = np.asarray(y)
    if y.ndim == 2:
        return bool(len(y)) and all(0 < int(y[:, j].sum()) < len(y) for j in range(y.shape[1]))
    return len(np.unique(y)) == n_classes
