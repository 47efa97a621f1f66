"""Scarce labels: how many unlabelled cases there are, what semi-supervised training did with them (and
the out-of-fold evidence for it), and how to choose the next cases to label. Numbers are read from the
ingest report and ``train_summary.json``; nothing is computed here."""

from __future__ import annotations

from pipeline.report.document import Doc, fmt
from pipeline.report.sections.inputs import ReportInputs


def scarce_labels_section(doc: Doc, run: ReportInputs) -> None:
    """The section appears when the data hold unlabelled cases."""
    unl = (run.ingest or {}).get("unlabelled") or {}
    semi = (run.train or {}).get("semi_supervised") or {}
    n = unl.get("cases") or semi.get("unlabelled_available") or 0
    if not n:
        return
    doc.h("Scarce labels: unlabelled cases")
    usable = semi.get("unlabelled_available")
    left = semi.get("unlabelled_left_out", 0)
    doc.p(
        f"{n} unlabelled case(s) ({unl.get('patients', '?')} patients) were ingested"
        + (f"; {usable} could be used for training" if usable is not None else "")
        + (f" ({left} left out: their patient has a validation, calibration or test case)" if left else "")
        + ". They are never in validation, calibration or test, and their labels never reach any metric."
    )
    method = semi.get("method", "off")
    guard = semi.get("harm_guard") or {}
    if method == "off" or not guard:
        doc.p(
            "Semi-supervised training was not used (train.semi_supervised: off, or no usable unlabelled case)."
        )
    else:
        per_fold = semi.get("per_fold") or []
        level = guard.get("ci_level", 0.95)
        ci = guard.get("ci") or [None, None]
        if method == "mean_teacher":
            first = per_fold[0] if per_fold else {}
            how = (
                "each supervised model started a student trained with a consistency loss between its "
                "predictions and those of its exponential-moving-average teacher on differently augmented "
                f"unlabelled cases (weight {fmt(first.get('consistency_weight'), 1)}, EMA decay "
                f"{fmt(first.get('ema_decay'))}); {len(per_fold)} model(s), each using up to "
                f"{max((f.get('unlabelled_used') or 0 for f in per_fold), default=0)} unlabelled case(s). "
                "The EMA teacher (the model kept)"
            )
        else:
            n_pseudo = sum(f.get("pseudo_labelled") or 0 for f in per_fold)
            how = (
                "each supervised model pseudo-labelled unlabelled cases (distribution alignment, confidence "
                f"threshold); {n_pseudo} pseudo-label(s) in all over {len(per_fold)} model(s). The student"
            )
        doc.p(
            f"Semi-supervised training ({method}): {how} was compared with the supervised model on the same "
            f"out-of-fold (or validation) cases: AUROC {fmt(guard.get('auroc_semi_supervised'))} vs "
            f"{fmt(guard.get('auroc_supervised'))}, difference {fmt({'value': guard.get('difference'), 'ci': ci})} "
            f"({level:.0%} CI, {str(guard.get('ci_method', '')).replace('_', ' ')}). Decision: "
            f"{guard.get('decision', 'n/a')}."
        )
        if not semi.get("used"):
            doc.warn(
                "The semi-supervised model was not kept: the interval of its difference with the supervised "
                "model lies below 0 (evidence of harm). The reported model is the supervised one."
            )
    doc.p(
        "Which cases to label next: `medtl suggest CONFIG -n N` ranks the unlabelled cases with this model "
        "(by default the entropy of its calibrated probabilities) and writes the list for the labeller to the private "
        "folder only. The value of labelling more is estimated by the optional label-efficiency study "
        "(evaluate.study_label_fractions), reported below when it is on."
    )
