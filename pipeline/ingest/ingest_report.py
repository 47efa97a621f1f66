"""The Ingest stage's published summary: split checks, the ingestion report and the manifest's age bands.

Everything here sees only pseudonymised rows (case and patient pseudonyms, labels, splits, codes, counts),
never a source path or identifier.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from pipeline.config import Config
from pipeline.errors import IngestError

#: A subgroup value (a labels CSV group cell, or a DICOM tag such as Manufacturer) is published only when at
#: least this many patients share it; rarer values are pooled as :data:`OTHER` (a rare free-text value can
#: identify a patient, or be one: a CSV cell may hold a name).
MIN_PATIENTS_PER_VALUE = 5
OTHER = "other"
POOLING_RULE = (
    f"values shared by fewer than {MIN_PATIENTS_PER_VALUE} patients are pooled as {OTHER!r} "
    "(subgroup columns, sex, modality, manufacturer); the raw values are kept only under private/"
)


def pool_rare_values(
    rows: list[dict[str, Any]], columns: Sequence[str], min_patients: int = MIN_PATIENTS_PER_VALUE
) -> dict[str, dict[str, int]]:
    """Replace, in place, each value of ``columns`` that fewer than ``min_patients`` distinct patients
    (``patient_id``) share by :data:`OTHER`; empty cells stay empty (missing, never imputed).

    Returns:
        Per column: how many distinct values and cases were pooled (counts only, no values).
    """
    pooled: dict[str, dict[str, int]] = {}
    for col in columns:
        patients: dict[str, set[str]] = defaultdict(set)
        for r in rows:
            if r.get(col):
                patients[r[col]].add(r["patient_id"])
        rare = {v for v, ps in patients.items() if len(ps) < min_patients and v != OTHER}
        n_cases = 0
        for r in rows:
            if r.get(col) in rare:
                r[col] = OTHER
                n_cases += 1
        pooled[col] = {"values": len(rare), "cases": n_cases}
    return pooled


def age_band(age_years: Any) -> str:
    """Coarse age band ('<18', '18-39', '40-59', '60-79', '>=80') or '' when unknown."""
    if age_years is None or age_years == "":
        return ""
    a = float(age_years)
    if a < 18:
        return "<18"
    if a < 40:
        return "18-39"
    if a < 60:
        return "40-59"
    if a < 80:
        return "60-79"
    return ">=80"


def check_splits(rows: list[dict[str, Any]], cfg: Config) -> None:
    """Refuse splits no model can be trained and judged on: no labelled training case at all (code
    ``no_labelled_cases``), train holding fewer than two classes, or an empty val or test split (code
    ``unusable_split``). Unlabelled rows (split ``unlabelled``) count for none of these."""
    labelled = [r for r in rows if r["split"] != "unlabelled"]
    counts = Counter((r["split"], r["label"]) for r in labelled)
    train_labels = {lab for (s, lab) in counts if s == "train"}
    if not train_labels:
        n_unlabelled = len(rows) - len(labelled)
        raise IngestError(
            f"Ingest: no labelled training cases ({len(labelled)} labelled and {n_unlabelled} unlabelled "
            f"case(s) ingested); expected labelled cases in data.labels_csv (column "
            f"data.label_column) before training can start",
            code="no_labelled_cases",
        )
    if len(train_labels) < 2:
        raise IngestError(
            f"Ingest: the train split holds label(s) {sorted(train_labels)} only; expected at least two "
            "classes "
            f"(check data.labels_csv and split fractions)",
            code="unusable_split",
        )
    for split in ("val", "test"):
        if not any(s == split for (s, _) in counts):
            raise IngestError(
                f"Ingest: the {split} split is empty ({len(labelled)} labelled cases in all); expected some "
                "cases there: "
                f"raise split.{split} or add cases",
                code="unusable_split",
            )


def _has(row: dict[str, Any], j: int, value: str, cfg: Config) -> bool:
    """The row is of class ``value`` (column ``j``); multilabel: its finding ``j`` is positive."""
    if cfg.task.multilabel:
        return row["label"].split(";")[j:j + 1] == ["1"]
    return row["label"] == value


def build_report(
    cfg: Config, rows: list[dict[str, Any]], problems: list[dict[str, Any]], n_inputs: int, n_labels: int
) -> dict:
    """The public ``ingest_report.json``: counts per split and class (cases and patients), unlabelled
    cases, problems by code (redacted), case flags, and how splits and de-identification were done."""
    splits: dict[str, dict[str, Any]] = {}
    for s in ("train", "val", "calibration", "test"):
        sel = [r for r in rows if r["split"] == s]
        splits[s] = {
            "cases": len(sel),
            "patients": len({r["patient_id"] for r in sel}),
            "per_class": {
                cfg.task.classes[v]: sum(_has(r, j, v, cfg) for r in sel)
                for j, v in enumerate(cfg.task.label_values)
            },
            "per_class_patients": {
                cfg.task.classes[v]: len({r["patient_id"] for r in sel if _has(r, j, v, cfg)})
                for j, v in enumerate(cfg.task.label_values)
            },
        }
    unl = [r for r in rows if r["split"] == "unlabelled"]
    held = {r["patient_id"] for r in rows if r["split"] in ("val", "calibration", "test")}
    review = [
        r["case_id"]
        for r in rows
        if "needs_pixel_review" in r["flags"] or "burned_in_annotation" in r["flags"]
    ]
    return {
        "schema_version": 1,
        "inputs": n_inputs,
        "label_rows": n_labels,
        "cases": len(rows),
        "patients": len({r["patient_id"] for r in rows}),
        "splits": splits,
        # unlabelled cases: ingested and cached, never in val/calibration/test; those of a patient with a
        # held-out case are never training data (the ledger's held-out patients are left out altogether)
        "unlabelled": {
            "cases": len(unl),
            "patients": len({r["patient_id"] for r in unl}),
            "of_held_out_patients": sum(r["patient_id"] in held for r in unl),
            "left_out_held_out_patient": 0,
        },
        "kinds": dict(Counter(r["kind"] for r in rows)),
        "modalities": dict(Counter(r["modality"] for r in rows)),
        "problems_by_code": dict(Counter(p["code"] for p in problems)),
        # cases ingested with a stated fallback or a review note (e.g. assumed_unit_pixel_spacing)
        "case_flags": dict(Counter(f for r in rows for f in r["flags"].split(";") if f)),
        "problems": problems,
        "pixel_review": review,
        "split_rule": (
            "fixed split column, calibration carved from train by keyed hash; other patients "
            if cfg.data.split_column
            else ""
        )
        + "stratified by label"
        + (f" and {len(cfg.split.stratify_by)} stratify_by column(s)" if cfg.split.stratify_by else "")
        + ", patient-level, stable (kept in a private ledger; new patients fill the largest deficit)",
        "deidentification": (
            "Patient and case identifiers replaced by keyed HMAC-SHA256 pseudonyms; no names, identifiers, "
            "dates, institutions or source paths in shared outputs (paths only under private/)."
        ),
    }
