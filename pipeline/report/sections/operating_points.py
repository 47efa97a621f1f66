"""Operating points (chosen on validation, reported on test) and the decision curve."""

from __future__ import annotations

from typing import Any

from pipeline.report import plots
from pipeline.report.document import Doc, fmt

_OP_LABEL = {"youden": "Youden (max sens + spec - 1)"}


def _op_label(rule: str, op: dict[str, Any]) -> str:
    if rule in _OP_LABEL:
        return _OP_LABEL[rule]
    t = op.get("target")
    if rule.startswith("sens") and t is not None:
        return f"sensitivity >= {t:.0%}"
    if rule.startswith("spec") and t is not None:
        return f"specificity >= {t:.0%}"
    return rule


def operating_points_section(
    doc: Doc, metrics: dict[str, Any], prim: dict[str, Any], names: list[str], pos: int | None
) -> None:
    ops = prim.get("operating_points")
    dc = prim.get("decision_curve")
    if not ops and not (isinstance(dc, dict) and "thresholds" in dc):
        return
    doc.h("Operating points (chosen on validation, reported on test)")
    splits = metrics.get("splits", {})
    pos_name = names[pos] if pos is not None else "positive"
    n_val = splits.get("val", {}).get("cases")
    n_val_pos = splits.get("val", {}).get("per_class", {}).get(pos_name)
    n_test_pos = splits.get("test", {}).get("per_class", {}).get(pos_name)
    primary = ((metrics.get("evaluation") or {}).get("test") or {}).get("primary", "uncalibrated")
    if ops:
        doc.p(
            f"Each threshold on the {primary} probability of {pos_name} was chosen on the validation split "
            f"({n_val} cases, {n_val_pos} {pos_name}) and applied unchanged to the test split ({n_test_pos} "
            f"{pos_name}). "
            "Validation and test rows are shown side by side: the test row is the estimate to rely on."
        )
        doc.p(threshold_rationale(ops, pos_name))
        if isinstance(n_val_pos, int) and n_val_pos > 0:
            step = 1.0 / n_val_pos
            if n_val_pos < 100:
                doc.warn(
                    f"The validation split has only {n_val_pos} {pos_name} cases: one case moves validation "
                    f"sensitivity by {step:.1%}, so a threshold chosen there transfers poorly to new data "
                    "and a "
                    "sensitivity target met on validation is often missed on test. Prefer the test row and "
                    "its CI."
                )
        header = [
            "operating point",
            "split",
            "threshold",
            "sensitivity",
            "specificity",
            "PPV",
            "NPV",
            "TP",
            "FP",
            "TN",
            "FN",
            "target met",
        ]
        rows = []
        for rule, op in ops.items():
            if not isinstance(op, dict):
                continue
            val = op.get("val") or {
                "sensitivity": op.get("val_sensitivity"),
                "specificity": op.get("val_specificity"),
            }
            for split, blk in (("val", val), ("test", op.get("test") or {})):
                cmx = blk.get("confusion_matrix") or {}
                met = ""
                if split == "test" and "target_met_on_test" in op:
                    met = fmt(op.get("target_met_on_test"))
                rows.append(
                    [
                        _op_label(rule, op) if split == "val" else "",
                        split,
                        fmt(op.get("threshold")),
                        fmt(blk.get("sensitivity")),
                        fmt(blk.get("specificity")),
                        fmt(blk.get("ppv")),
                        fmt(blk.get("npv")),
                        cmx.get("tp", ""),
                        cmx.get("fp", ""),
                        cmx.get("tn", ""),
                        cmx.get("fn", ""),
                        met,
                    ]
                )
        doc.table(header, rows)
        missed = [
            _op_label(r, op)
            for r, op in ops.items()
            if isinstance(op, dict) and op.get("target_met_on_test") is False
        ]
        if missed:
            doc.warn(
                f"Target not reached on test for: {', '.join(missed)} (chosen on validation; see the CIs)."
            )
    if isinstance(dc, dict) and "thresholds" in dc:
        doc.fig(
            "decision_curve",
            plots.to_png(plots.decision_curve_figure(dc)),
            f"Decision curve, test split: net benefit of acting on the model ({primary} probabilities) "
            "against "
            "treating everyone and no one, over threshold probabilities (Vickers & Elkin 2006). The model is "
            "useful where its curve lies above both.",
        )


def threshold_rationale(ops: dict[str, Any], pos_name: str) -> str:
    """Why each threshold is where it is: the rule it follows and the clinical use that rule serves."""
    parts = []
    for rule, op in ops.items():
        if not isinstance(op, dict):
            continue
        t, thr = op.get("target"), fmt(op.get("threshold"))
        if rule == "youden":
            parts.append(
                f"Youden ({thr}) maximises sensitivity + specificity - 1 on validation, weighing a missed "
                f"{pos_name} case and a false alarm equally"
            )
        elif rule.startswith("sens") and t is not None:
            parts.append(
                f"'sensitivity >= {t:.0%}' ({thr}) is the highest threshold whose validation sensitivity "
                "reaches "
                f"{t:.0%}: a rule-out use, where missing {pos_name} costs more than a false alarm"
            )
        elif rule.startswith("spec") and t is not None:
            parts.append(
                f"'specificity >= {t:.0%}' ({thr}) is the lowest threshold whose validation specificity "
                "reaches "
                f"{t:.0%}: a rule-in use, where false alarms cost more"
            )
    return (
        "Threshold rationale: "
        + "; ".join(parts)
        + ". No threshold was chosen on test; the default rule 'p >= 0.5' of the other tables is not tuned "
        "and "
        "serves comparison only. Which rule suits a clinical use is a decision for the clinical team."
    )
