"""The TRIPOD+AI / CLAIM items beyond discrimination and calibration: participant flow and sample size,
participant characteristics per split, reference standard and class imbalance, subgroup fairness and
calibration differences, heterogeneity across sites, error analysis and external validation.

Every number is read from ``metrics["reporting"]`` (computed by ``pipeline.evaluate.reporting``), the
ingestion and training summaries, or the config; nothing is computed here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.report import plots
from pipeline.report.document import Doc, fmt, level_words, metric_rows, nice
from pipeline.report.sections.inputs import ReportInputs

SPLITS = ("train", "val", "calibration", "test")


def _rep(metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics.get("reporting") or {}


def flow_section(doc: Doc, run: ReportInputs) -> None:
    """Participant flow (diagram and table), events per split, the detectable difference and size warnings."""
    ingest, metrics = run.ingest, run.metrics
    ss = _rep(metrics).get("sample_size") or {}
    sizes = ss.get("splits") or {}
    if not ingest and not sizes:
        return
    doc.h("Participant flow and sample size")
    probs = ingest.get("problems_by_code") or {}
    excluded = sum(probs.values())
    holdout = metrics.get("promotion_holdout") or {}
    boxes = []
    if ingest:
        inputs = ingest.get("inputs")
        n_in = (
            inputs.get("entries", "?") if isinstance(inputs, dict) else inputs if inputs is not None else "?"
        )
        boxes.append((f"{n_in} entries under the source", []))
        boxes.append(
            (
                f"{ingest.get('cases', '?')} cases of {ingest.get('patients', '?')} patients ingested",
                [f"split rule: {ingest.get('split_rule', '?')}"],
            )
        )
    split_boxes = []
    rows = []
    for s in SPLITS:
        ing = (ingest.get("splits") or {}).get(s) or {}
        rep = sizes.get(s) or {}
        if not ing and not rep:
            continue
        lines = [
            f"{s}: {ing.get('cases', rep.get('cases', '?'))} cases",
            f"{ing.get('patients', rep.get('patients', '?'))} patients",
        ]
        note = ""
        if s == "test" and holdout.get("excluded_cases"):
            note = (
                f"{holdout['excluded_cases']} cases ({holdout.get('excluded_patients')} patients) "
                "held out for promotion"
            )
            lines.append(f"-{holdout['excluded_cases']} promotion holdout")
            lines.append(f"{holdout.get('reported_cases', rep.get('cases'))} reported")
        split_boxes.append("\n".join(lines))
        events = rep.get("events") or ing.get("per_class") or {}
        rows.append(
            [
                s,
                ing.get("cases", ""),
                rep.get("cases", ""),
                rep.get("patients", ing.get("patients", "")),
                ", ".join(f"{c} {n}" for c, n in events.items()),
                rep.get("min_events", ""),
                rep.get("use", ""),
                note,
            ]
        )
    if boxes or split_boxes:
        doc.fig(
            "flow",
            plots.to_png(
                plots.flow_figure(boxes, [f"{c}: {n}" for c, n in sorted(probs.items())], split_boxes)
            ),
            f"Participant flow: {excluded} input(s) or label row(s) excluded at ingestion (by reason code), "
            "then "
            "patient-level splits. Counts only; no patient appears in two splits.",
        )
    doc.table(
        [
            "split",
            "cases ingested",
            "cases evaluated",
            "patients",
            "cases per class",
            "cases of rarest class",
            "use",
            "note",
        ],
        rows,
    )
    dd = ss.get("detectable_difference") or {}
    a, sens = dd.get("auroc") or {}, dd.get("sensitivity") or {}
    if a:
        alpha = dd.get("alpha")
        doc.p(
            "Sample-size rationale: the split sizes follow the configured shares of the available patients "
            "(no "
            f"sample size was fixed in advance). With these test cases, a true AUROC differing from a fixed "
            f"reference value by less than {fmt(a.get('difference'))} (AUROC {fmt(a.get('auroc'))}, class "
            f"{a.get('class')}, Hanley-McNeil SE {fmt(a.get('se'))}) cannot be detected with "
            f"{dd.get('power', 0.8):.0%} power at two-sided alpha {fmt(alpha, 2)}"
            + (
                f"; for sensitivity (0.5 rule, {sens.get('n_positive')} positive cases) the smallest "
                "detectable "
                f"difference is {fmt(sens.get('difference'))}"
                if sens
                else ""
            )
            + "."
        )
    for w in ss.get("warnings") or []:
        doc.warn(f"Split too small for its use ({w.get('code')}): {w.get('message')}.")


def characteristics_section(doc: Doc, run: ReportInputs) -> None:
    """Cases per class and per subgroup value in each split, and missing subgroup values."""
    parts = _rep(run.metrics).get("participants") or {}
    if not parts:
        return
    doc.h("Participant characteristics per split")
    splits = [s for s in SPLITS if s in parts]
    rows = [
        ["cases"] + [parts[s]["cases"] for s in splits],
        ["patients"] + [parts[s]["patients"] for s in splits],
    ]
    for c in run.names:
        rows.append(
            [f"class {c}"] + [_pct(parts[s]["per_class"].get(c, 0), parts[s]["cases"]) for s in splits]
        )
    if any(parts[s].get("unlabelled") for s in splits):
        rows.append(["unlabelled"] + [parts[s].get("unlabelled", 0) for s in splits])
    cols = sorted({c for s in splits for c in parts[s].get("groups", {})})
    for col in cols:
        values = sorted({v for s in splits for v in (parts[s]["groups"].get(col) or {})})
        for v in values:
            rows.append(
                [f"{col}: {v}"]
                + [_pct((parts[s]["groups"].get(col) or {}).get(v, 0), parts[s]["cases"]) for s in splits]
            )
        rows.append(
            [f"{col}: missing"] + [_pct(parts[s]["missing"].get(col, 0), parts[s]["cases"]) for s in splits]
        )
    doc.table(["characteristic"] + splits, rows)
    pooling = (run.ingest or {}).get("subgroup_values") or {}
    if cols and pooling.get("rule"):
        doc.p(f"Subgroup values as recorded at ingestion: {pooling['rule']}.")
    missing = _rep(run.metrics).get("missing_subgroup_values") or {}
    total = {col: sum(v.values()) for col, v in missing.items()}
    if any(total.values()):
        doc.p(
            "Missing subgroup values (cases per split): "
            + "; ".join(
                f"{col}: " + ", ".join(f"{s} {n}" for s, n in v.items())
                for col, v in missing.items()
                if total[col]
            )
            + ". These cases are counted as 'unknown' in the subgroup tables and left out of the subgroup "
            "differences; nothing was imputed."
        )
    elif cols:
        doc.p("No subgroup value is missing in any split.")
    else:
        doc.p("No subgroup column (sex, age band, manufacturer, modality, configured groups) was recorded.")


def _pct(n: int, total: int) -> str:
    return f"{n} ({100 * n / total:.0f}%)" if total else str(n)


def methods_section(doc: Doc, run: ReportInputs) -> None:
    """Reference standard (from the config) and how class imbalance was handled."""
    cfg, train = run.cfg, run.train
    doc.h("Reference standard and class imbalance")
    ref = getattr(cfg.report, "reference_standard", None)
    mapping = ", ".join(f"'{k}' = {v}" for k, v in cfg.task.classes.items())
    doc.p(
        f"Reference standard: the label column '{cfg.data.label_column}' of {Path(cfg.data.labels_csv).name} "
        f"({mapping}), one label per case"
        + (f"; {ref}" if ref else "")
        + "."
        + (
            ""
            if ref
            else " How these labels were established (by whom, with which information, blinded or not) is "
            "not "
            "recorded in the run configuration and must be stated by the data provider."
        )
    )
    counts = train.get("train_class_counts")
    weighting, sampler = cfg.train.class_weighting, cfg.train.sampler
    how = {
        (
            "balanced",
            "shuffle",
        ): "inverse-frequency class weights in the loss; each case drawn once per epoch",
        (
            "none",
            "balanced",
        ): "classes drawn equally often by a balanced sampler (with replacement); unweighted loss",
        ("none", "shuffle"): "not corrected: unweighted loss and each case drawn once per epoch",
    }.get((weighting, sampler), f"class weighting '{weighting}', sampler '{sampler}'")
    doc.p(
        "Class imbalance: "
        + (f"training cases per class {dict(zip(run.names, counts, strict=False))}; " if counts else "")
        + f"handled by {how}. The reported probabilities are calibrated (or not) on the calibration split's "
        "own "
        "prevalence, and thresholds are chosen on validation, so the training correction does not shift them."
    )


def fairness_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """Each subgroup against the column's largest group: differences with CIs (fairness and calibration)."""
    diffs = _rep(metrics).get("subgroup_differences") or {}
    if not diffs:
        return
    level = level_words(metrics)
    doc.h("Subgroup fairness and calibration differences (test split)")
    binary = metrics.get("task", {}).get("kind") == "binary"
    methods = {
        m.get("ci_method")
        for d in diffs.values()
        for e in (d.get("groups") or {}).values()
        for m in (e.get("differences") or {}).values()
    }
    how = (
        "patient-cluster"
        if methods == {"cluster_bootstrap"}
        else "case"
        if methods == {"bootstrap"}
        else "mixed"
    )
    doc.p(
        f"Each group minus the largest group of its column, with {level} paired {how} bootstrap CIs "
        f"({metrics.get('options', {}).get('n_bootstrap')} resamples of the whole test split). "
        + (
            "Sensitivity gap = equal-opportunity difference; specificity gap = minus the false-positive-rate "
            "difference (0.5 rule); calibration-in-the-large = mean predicted risk minus observed frequency, "
            "whose gap shows one group's risks systematically over- or under-estimated."
            if binary
            else "Confidence gap = mean top-class probability minus accuracy (top-label "
            "calibration-in-the-large)."
        )
        + " A CI that excludes 0 is marked; a CI containing 0 is not evidence of equal performance."
    )
    rows, flagged = [], []
    for col, d in diffs.items():
        for g, e in (d.get("groups") or {}).items():
            dif = e.get("differences") or {}
            for name, m in dif.items():
                if m.get("excludes_zero"):
                    flagged.append(
                        f"{col} {g} vs {d.get('reference')}: "
                        f"{nice(name) if name != 'confidence_gap' else 'confidence gap'}"
                    )
            rows.append(
                [col, f"{g} vs {d.get('reference')}", f"{e.get('cases')} / {d.get('reference_cases')}"]
                + [fmt(m) + (" *" if m.get("excludes_zero") else "") for m in dif.values()]
            )
    names = next(iter(next(iter(diffs.values())).get("groups", {}).values()), {}).get("differences", {})
    header = ["column", "group vs reference", "cases"] + [
        {"calibration_in_the_large": "calibration-in-the-large gap", "confidence_gap": "confidence gap"}.get(
            k, f"{nice(k)} gap"
        )
        for k in names
    ]
    if rows:
        doc.table(header, rows)
    if flagged:
        doc.warn(f"Differences whose {level} CI excludes 0 (marked *): " + "; ".join(flagged) + ".")


def site_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """Per-site performance and the random-effects heterogeneity summary."""
    h = _rep(metrics).get("site_heterogeneity")
    if not h:
        return
    metric = "AUROC" if h.get("metric") == "auroc" else "accuracy"
    doc.h("Heterogeneity across sites (test split)")
    rows = [
        [
            r.get("site"),
            r.get("cases"),
            r.get("events", ""),
            fmt(r.get("value")),
            fmt(r.get("se")),
            r.get("error", ""),
        ]
        for r in h.get("sites") or []
    ]
    doc.table(["site", "cases", "events", metric, "SE (DeLong)" if metric == "AUROC" else "SE", "note"], rows)
    if h.get("reason"):
        doc.p(f"No heterogeneity summary: {h['reason']}.")
        return
    doc.p(
        f"Random-effects summary (DerSimonian-Laird) over {h.get('df', 0) + 1} sites in column "
        f"'{h.get('column')}': "
        f"pooled {metric} {fmt(h.get('pooled'))} ({level_words(metrics)} CI); Cochran's Q = "
        f"{fmt(h.get('q'), 2)} on "
        f"{h.get('df')} df (p = {fmt(h.get('p_value'))}); I^2 = {100 * (h.get('i2') or 0):.0f}% of the "
        "variation "
        f"between sites is beyond chance; tau^2 = {fmt(h.get('tau2'), 4)}."
    )


def error_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """The most confident false positives and false negatives, by pseudonym."""
    ea = _rep(metrics).get("error_analysis")
    if not ea:
        return
    doc.h("Error analysis (test split)")
    rows = []
    counts = []
    for cname, c in (ea.get("classes") or {}).items():
        counts.append(
            f"{cname}: {c.get('n_false_positives')} false positive(s), {c.get('n_false_negatives')} false "
            "negative(s)"
        )
        for kind, label in (("false_positives", "false positive"), ("false_negatives", "false negative")):
            for rank, e in enumerate(c.get(kind) or [], 1):
                rows.append(
                    [
                        cname,
                        label,
                        rank,
                        e["case_id"],
                        e["patient_id"],
                        e["true"],
                        e["predicted"],
                        fmt(e["probability"]),
                    ]
                )
    doc.p(
        f"Rule: {ea.get('rule')} on the primary probabilities. " + "; ".join(counts) + ". Listed: up to "
        f"{ea.get('per_class')} most confident errors of each kind (false positives by highest, false "
        "negatives by "
        "lowest probability of the class), by pseudonymous case and patient id; the Grad-CAM figures below "
        "show "
        "them when explanations are enabled. Review these cases against the images and the reference "
        "standard."
    )
    if rows:
        doc.table(["class", "error", "rank", "case", "patient", "true", "predicted", "p(class)"], rows)


def external_section(doc: Doc, metrics: dict[str, Any]) -> None:
    """Robustness / external validation: each second test source of ``evaluate.external``
    (``metrics["external"]``), scored with this model and its calibrator, beside the internal test set."""
    sources = metrics.get("external")
    if not sources:
        return
    doc.h("Robustness and external validation")
    doc.p(
        f"{len(sources)} second test source(s), named in the config (evaluate.external), were scored with this "
        "run's model and the calibrator fitted on its own calibration split; nothing was refitted on them. "
        f"Intervals are {level_words(metrics)} CIs, as for the internal test set."
    )
    for src in sources:
        c = src.get("counts") or {}
        codes = ", ".join(f"{n} {code}" for code, n in sorted((src.get("problem_codes") or {}).items()))
        ood = src.get("ood_rate")
        doc.p(
            f"Source '{src.get('name')}': {c.get('scored', 0)} case(s) scored, {c.get('labelled', 0)} with a "
            f"label ({c.get('unlabelled', 0)} with an empty label, {c.get('no_label_row', 0)} without a row in "
            f"its labels CSV; {c.get('label_rows_without_case', 0)} row(s) naming no scored case)"
            + (f"; not scored or refused: {codes}" if codes else "")
            + (f"; {100 * ood:.0f}% of the scored cases look unlike the training data" if ood else "")
            + "."
        )
        if src.get("error"):
            doc.warn(f"Source '{src.get('name')}': {src['error']}.")
            continue
        rows = []
        for blk in ("discrimination", "calibration"):
            for k, v in metric_rows((src.get("metrics") or {}).get(blk) or {}):
                rows.append([nice(k), fmt(v)])
        if rows:
            doc.table([f"metric ('{src.get('name')}', calibrated)", "value (CI)"], rows)
        diff = src.get("auroc_difference")
        if diff:
            doc.p(
                f"AUROC on '{src.get('name')}' {fmt(diff.get('external'))} vs the internal test set "
                f"{fmt(diff.get('internal'))}: difference {fmt(diff)} ({diff.get('verdict')}; independent "
                "samples, the two variances added)."
            )
