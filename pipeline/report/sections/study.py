"""Scarce-labels study (label efficiency, strategies, negative transfer) and the comparison with the
previous model."""

from __future__ import annotations

from typing import Any

from pipeline.report import plots
from pipeline.report.document import Doc, fmt


def study_section(doc: Doc, metrics: dict[str, Any]) -> None:
    st = metrics.get("study")
    if not st:
        return
    doc.h("Scarce labels: label efficiency and strategies")
    runs = st.get("runs", [])
    doc.p(
        "Extra models trained on a stratified, patient-level share of the training labels with each strategy "
        "(scratch = the same backbone without pretrained weights), all scored on the same test split "
        "(uncalibrated probabilities; AUROC is unaffected by temperature scaling)."
    )
    if any(isinstance(r.get("test_auroc"), dict) for r in runs):
        doc.fig(
            "label_efficiency",
            plots.to_png(plots.label_efficiency_figure(runs)),
            "Test AUROC with 95% CI against the share of training labels, one line per strategy.",
        )
    rows = [
        [
            r.get("strategy"),
            f"{r.get('label_fraction', 0):.0%}",
            r.get("train_cases", ""),
            fmt(r.get("pretrained")),
            fmt(r.get("test_auroc")),
            fmt(r.get("best_val_auroc")),
            r.get("error") or ("this run's own model" if r.get("reused_main_model") else ""),
        ]
        for r in runs
    ]
    doc.table(
        [
            "strategy",
            "labels",
            "training cases",
            "pretrained",
            "test AUROC (95% CI)",
            "best val AUROC",
            "note",
        ],
        rows,
    )
    tr = st.get("transfer") or []
    if tr:
        trows = []
        for t in tr:
            dl = t.get("delong") or {}
            verdict = (
                "NEGATIVE TRANSFER: pretrained not better than scratch"
                if t.get("negative_transfer")
                else "pretrained better"
            )
            trows.append(
                [
                    f"{t['label_fraction']:.0%}",
                    t.get("best_pretrained"),
                    fmt(t.get("auroc_pretrained")),
                    fmt(t.get("auroc_scratch")),
                    fmt(t.get("difference")),
                    fmt({"value": dl.get("difference"), "ci": dl.get("ci")}) if dl else "n/a",
                    fmt(dl.get("p_value")) if dl else "n/a",
                    verdict,
                ]
            )
        doc.table(
            [
                "labels",
                "best pretrained",
                "AUROC pretrained",
                "AUROC scratch",
                "difference",
                "paired DeLong difference (95% CI)",
                "p",
                "verdict",
            ],
            trows,
        )
    if st.get("negative_transfer_at"):
        doc.warn(
            "Negative transfer: at "
            + ", ".join(f"{f:.0%}" for f in st["negative_transfer_at"])
            + " of the labels the pretrained model is not better than training from scratch; the pretrained "
            "weights may not suit this modality."
        )


def comparison_section(doc: Doc, metrics: dict[str, Any]) -> None:
    cmp_ = metrics.get("comparison")
    if not cmp_:
        return
    doc.h("Comparison with the previous model")
    doc.p(
        f"Previous model: {cmp_.get('previous')} ({cmp_.get('previous_kind')} folder). Matched by pseudonymous "
        f"case id on the test split: {cmp_.get('n_matched')} cases in common, {cmp_.get('n_current_only')} only in "
        f"this run, {cmp_.get('n_previous_only')} only in the previous one, {cmp_.get('n_label_mismatch')} left out "
        f"because their label changed. Scores: {cmp_.get('scores')}; difference = {cmp_.get('difference')}."
    )
    if cmp_.get("reason"):
        doc.warn(f"No comparison: {cmp_['reason']}.")
        return
    if cmp_.get("n_current_only") or cmp_.get("n_label_mismatch"):
        doc.warn("The two models were not compared on identical test sets; only the matched cases are used.")
    rows = []
    for cname, c in (cmp_.get("classes") or {}).items():
        if c.get("error"):
            rows.append([cname, "", "", c["error"], "", "", ""])
            continue
        dl, bt = c["delong"], c["paired_bootstrap"]
        rows.append(
            [
                cname,
                fmt(c["auroc_current"]),
                fmt(c["auroc_previous"]),
                fmt({"value": dl["difference"], "ci": dl["ci"]}),
                fmt(dl["p_value"]),
                fmt(bt),
                fmt(bt.get("p_value")),
            ]
        )
    doc.table(
        [
            "class",
            "AUROC now (95% CI)",
            "AUROC previous",
            "difference, DeLong (95% CI)",
            "DeLong p",
            "difference, paired bootstrap",
            "bootstrap p",
        ],
        rows,
    )
    for cname, c in (cmp_.get("classes") or {}).items():
        if c.get("error"):
            continue
        lo, hi = c["delong"]["ci"]
        if lo > 0:
            verdict = "higher than the previous model's (the 95% CI of the difference excludes 0)"
        elif hi < 0:
            verdict = "lower than the previous model's (the 95% CI of the difference excludes 0)"
        else:
            verdict = "not distinguishable from the previous model's on these cases (the 95% CI of the difference contains 0)"
        doc.p(f"{cname}: this model's AUROC is {verdict}.")
