"""Patient-level, stable splits.

Rule: each patient pseudonym is mapped by a keyed hash to a number u in [0, 1); u < test goes to test, then
val, then calibration, the rest to train. Because u depends only on the patient (and the secret key), adding
patients never moves an existing one, and a patient never appears in two splits. The share in each split
matches the configured fractions within each label in expectation (the hash is independent of the label).

A fixed split column in the labels CSV overrides the rule for its rows (e.g. MedMNIST's official splits);
``calibration_from_train`` then moves a hashed, stable share of the fixed ``train`` patients to
``calibration``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from pipeline.config import SplitConfig
from pipeline.errors import IngestError


def unit_hash(patient: str, key: bytes, salt: str = "split") -> float:
    """Keyed hash of a patient pseudonym to [0, 1)."""
    digest = hmac.new(key, f"{salt}:{patient}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hashed_split(patient: str, key: bytes, cfg: SplitConfig) -> str:
    """The split of one patient under the hashed rule."""
    u = unit_hash(patient, key)
    edges = (("test", cfg.test), ("val", cfg.val), ("calibration", cfg.calibration))
    acc = 0.0
    for name, share in edges:
        acc += share
        if u < acc:
            return name
    return "train"


def assign_splits(
    patients: Sequence[str], fixed: Sequence[str | None], key: bytes, cfg: SplitConfig
) -> list[str]:
    """Assign a split to every case.

    Args:
        patients: Patient pseudonym of each case.
        fixed: Fixed split of each case from the labels CSV, or None to use the hashed rule.
        key: The workspace's secret key.
        cfg: Split fractions.

    Returns:
        The split name of each case.

    Raises:
        IngestError: A patient's cases carry different fixed splits (that would leak the patient).
    """
    fixed_by_patient: dict[str, set[str]] = defaultdict(set)
    for p, f in zip(patients, fixed, strict=True):
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
    out = []
    for p, f in zip(patients, fixed, strict=True):
        if f is None:
            f = next(iter(fixed_by_patient[p])) if p in fixed_by_patient else hashed_split(p, key, cfg)
        elif f == "train" and unit_hash(p, key, salt="calibration") < carve:
            f = "calibration"
        out.append(f)
    return out


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
    leaves it out of its test metrics, so the holdout serves promotion decisions only).
    """
    mask = holdout_mask(patients, key, fraction)
    if mask.sum() >= min_cases and len(np.unique(y[mask])) == n_classes:
        return mask
    return None
