"""The nightly report: one self-contained HTML page per night, beside the night's JSON record.

It answers what an operator asks every morning: did tonight train, why or why not; was the new model
promoted, with which numbers (AUROC difference with its interval, Brier, on the locked holdout or the test
split) and how many decisions have looked at the holdout so far; what drifted; and where the full
evaluation report is. Built from the run record (``runs/<night>_<snapshot>_<config>.json``), the
decision file and the registry's drift history; no identifiers are in any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.io import write_text
from pipeline.report.document import Doc, fmt

DECISION_ROWS = (
    ("promoted", "promoted"),
    ("promote", "passes the promotion rule"),
    ("evaluated_on", "decided on"),
    ("note", "cases used"),
    ("n_cases", "cases"),
    ("method", "test"),
    ("auroc_challenger", "AUROC, new model"),
    ("auroc_champion", "AUROC, champion"),
    ("auroc_difference", "AUROC difference (new - champion)"),
    ("difference_ci", "95% CI of the difference"),
    ("auroc_ci", "95% CI of the new model's AUROC"),
    ("brier_challenger", "Brier, new model"),
    ("brier_champion", "Brier, champion"),
    ("holdout_uses", "decisions that have used the locked holdout so far"),
)


def nightly_document(record: dict[str, Any], drift_history: list[dict[str, Any]] | None = None) -> Doc:
    """Assemble the nightly report from a run record (see ``tasks/run.py``)."""
    doc = Doc()
    retrain = record.get("retrain") or {}
    decision = record.get("promotion")
    doc.h("Tonight")
    doc.kpis(
        [
            ("trained", "yes" if retrain.get("train") else "no"),
            ("promoted", fmt(decision.get("promoted")) if decision else "n/a"),
            ("champion model id", fmt(record.get("champion_id"))),
        ]
    )
    for reason in retrain.get("reasons", []):
        doc.p(f"Retraining policy: {reason}.")
    if record.get("report"):
        doc.p(f"Full evaluation report of tonight's model: {record['report']} (relative to the workspace).")
    headline = record.get("headline") or {}
    if headline:
        doc.table(
            ["test figure", "value [95% CI]"], [[k.replace("_", " "), fmt(v)] for k, v in headline.items()]
        )

    doc.h("Champion / challenger decision")
    if not decision:
        doc.p("No model was trained tonight, so no promotion decision was made.")
    else:
        rows = [[label, fmt(decision[key])] for key, label in DECISION_ROWS if key in decision]
        doc.table(["item", "value"], rows)
        for reason in decision.get("reasons", []):
            doc.p(f"Reason: {reason}.")

    doc.h("Drift")
    drift = record.get("drift") or {}
    flat = _flatten(drift)
    if flat:
        doc.table(["figure", "tonight"], [[k, fmt(v)] for k, v in flat])
    else:
        doc.p("No drift figures were recorded tonight.")
    if drift_history:
        rows = []
        for d in drift_history[-14:]:
            fig = _flatten(d.get("figures") or d)
            rows.append([str(d.get("ts", ""))[:16], "; ".join(f"{k} {fmt(v)}" for k, v in fig[:4])])
        doc.p("Recent nights (most recent last):")
        doc.table(["night", "figures"], rows)
    return doc


def _flatten(d: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and not ("value" in v and "ci" in v) and depth > 1:
            out.extend(_flatten(v, f"{name}.", depth - 1))
        elif isinstance(v, (int, float, str, bool)) or v is None or (isinstance(v, dict) and "value" in v):
            out.append((name, v))
        elif isinstance(v, list) and len(v) <= 6 and all(isinstance(x, (int, float, str)) for x in v):
            out.append((name, v))
    return out


def write_nightly_report(
    path: Path, record: dict[str, Any], drift_history: list[dict[str, Any]] | None = None
) -> None:
    """Write the nightly report HTML to ``path`` (atomically)."""
    doc = nightly_document(record, drift_history)
    subtitle = (
        f"night {record.get('night', '?')}, data snapshot {record.get('data_snapshot', '?')}, "
        f"run '{record.get('name', '')}'"
    )
    write_text(path, doc.html(f"medtl nightly report: {record.get('name', '')}", subtitle))
