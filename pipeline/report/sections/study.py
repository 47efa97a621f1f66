"""Scarce-labels study (label efficiency, strategies, negative transfer) and the comparison with the
previous model. Selections, differences, intervals and verdicts are read from metrics
(``pipeline.evaluate.study`` and ``pipeline.evaluate.compare``); nothing is decided here."""

from __future__ import annotations

from typing import Any

from pipeline.report import plots
from pipeline.report.document import Doc, fmt, level_words

#: How the primary paired test of a difference is named in the report.
TEST_NAMES = {"delong": "paired DeLong", "paired_bootstrap": "paired (patient-cluster) bootstrap"}


def study_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """Every study model's validation (and, when scored, test) AUROC; per label fraction the selected
    pretrained model against scratch on test, with the verdict of the paired difference."""
    st = metrics.get("study")
    if not st:
        return
    level = level_words(metrics)
    doc.h("Scarce labels: label efficiency and strategies")
    runs = st.get("runs", [])
    selection = (
        st.get("selection") or "per label fraction, the pretrained strategy with the highest validation AUROC"
    )
    doc.p(
        "Extra models trained on a stratified, patient-level share of the training labels with each strategy "
        "(scratch = the same backbone without pretrained weights). Selection: "
        f"{selection}. Validation AUROC is every study model's early-stopping set, so it is optimistic alike "
        "for each strategy: it serves to choose, not as an estimate. Test figures use uncalibrated "
        "probabilities (AUROC is unaffected by temperature scaling)."
    )
    if any(isinstance(r.get("val_auroc"), dict) for r in runs):
        doc.fig(
            "label_efficiency",
            plots.to_png(
                plots.label_efficiency_figure(runs, key="val_auroc", split="validation", level=level)
            ),
            f"Validation AUROC with {level} CI against the share of training labels, one line per strategy "
            "(the figure the pretrained strategy is selected by).",
        )
    selected = {(t.get("best_pretrained"), t.get("label_fraction")) for t in st.get("transfer") or []}
    rows = []
    for r in runs:
        key = (r.get("strategy"), r.get("label_fraction"))
        notes = [r["error"]] if r.get("error") else []
        if r.get("reused_main_model"):
            notes.append("this run's own model")
        if key in selected:
            notes.append("selected on validation")
        rows.append(
            [
                r.get("strategy"),
                f"{r.get('label_fraction', 0):.0%}",
                r.get("train_cases", ""),
                fmt(r.get("pretrained")),
                fmt(r.get("val_auroc")),
                fmt(r.get("test_auroc")) if r.get("test_auroc") else "not scored",
                "; ".join(notes),
            ]
        )
    doc.table(
        [
            "strategy",
            "labels",
            "training cases",
            "pretrained",
            f"val AUROC ({level} CI)",
            f"test AUROC ({level} CI)",
            "note",
        ],
        rows,
    )
    tr = st.get("transfer") or []
    if tr:
        trows = []
        for t in tr:
            primary = (t.get("comparison") or {}).get("primary")
            trows.append(
                [
                    f"{t['label_fraction']:.0%}",
                    t.get("best_pretrained"),
                    fmt(t.get("auroc_pretrained")),
                    fmt(t.get("auroc_scratch")),
                    fmt({"value": t.get("difference"), "ci": t.get("difference_ci")}),
                    TEST_NAMES.get(primary, primary or "n/a"),
                    t.get("verdict") or "not tested",
                ]
            )
        doc.table(
            [
                "labels",
                "selected pretrained",
                "test AUROC pretrained",
                "test AUROC scratch",
                f"difference ({level} CI)",
                "test",
                "verdict",
            ],
            trows,
        )
    if st.get("negative_transfer_at"):
        doc.warn(
            "Negative transfer: at "
            + ", ".join(f"{f:.0%}" for f in st["negative_transfer_at"])
            + " of the labels the pretrained model selected on validation is worse than training from "
            f"scratch on test (the {level} CI of the paired difference lies below 0); the pretrained weights "
            "may "
            "not suit this modality."
        )


#: The sentence for each comparison verdict (``pipeline.evaluate.compare.verdict``).
VERDICT_WORDS = {
    "better": "higher than the previous model's (the {level} CI of the difference excludes 0)",
    "worse": "lower than the previous model's (the {level} CI of the difference excludes 0)",
    "no evidence of a difference": "not distinguishable from the previous model's on these cases "
    "(the {level} CI of the difference contains 0)",
}


def comparison_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """This model against the previous one on the matched test cases: DeLong and paired bootstrap
    differences, and the verdict of the primary test."""
    cmp_ = metrics.get("comparison")
    if not cmp_:
        return
    level = level_words(metrics)
    doc.h("Comparison with the previous model")
    doc.p(
        f"Previous model: {cmp_.get('previous')} ({cmp_.get('previous_kind')} folder). Matched by "
        "pseudonymous "
        f"case id on the test split: {cmp_.get('n_matched')} cases in common, {cmp_.get('n_current_only')} "
        "only in "
        f"this run, {cmp_.get('n_previous_only')} only in the previous one, {cmp_.get('n_label_mismatch')} "
        "left out "
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
            f"AUROC now ({level} CI)",
            "AUROC previous",
            f"difference, DeLong ({level} CI)",
            "DeLong p",
            "difference, paired bootstrap",
            "bootstrap p",
        ],
        rows,
    )
    for cname, c in (cmp_.get("classes") or {}).items():
        if c.get("error"):
            continue
        v = c.get("verdict")
        words = VERDICT_WORDS.get(v, f"not judged (no verdict in the metrics: {v})" if v else "not judged")
        words = words.format(level=level)
        test = TEST_NAMES.get(c.get("primary"), c.get("primary") or "")
        doc.p(f"{cname}: this model's AUROC is {words}" + (f"; primary test: {test}." if test else "."))
