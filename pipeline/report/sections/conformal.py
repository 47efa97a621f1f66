"""Conformal prediction sets: coverage and set size per method and per true class.

The coverage intervals are computed by ``pipeline.evaluate.conformal.coverage_report`` (``coverage_ci``);
this section only compares them with the target.
"""

from __future__ import annotations

from typing import Any

from pipeline.report.document import Doc, fmt, level_words


def conformal_section(doc: Doc, metrics: dict[str, Any]) -> None:
    conf = metrics.get("conformal")
    if not conf:
        return
    doc.h("Conformal prediction sets")
    alpha = conf.get("alpha")
    methods = conf.get("methods") or {}
    if not methods:
        doc.p(f"No conformal sets were built: {conf.get('reason', 'n/a')}.")
        return
    doc.p(
        f"Split-conformal sets fitted on the {conf.get('n_calibration')} calibration cases "
        f"({conf.get('fitted_on')}), aiming at coverage >= {fmt(conf.get('target_coverage'))} (alpha = "
        f"{alpha}). "
        "A set lists every class the model cannot rule out; a set with more than one class flags a case to "
        "review. "
        "Coverage = share of test cases whose true class is in their set."
    )
    if (conf.get("n_calibration") or 0) < (conf.get("min_calibration_cases") or 0):
        doc.warn(
            f"Only {conf.get('n_calibration')} calibration cases, fewer than 1/alpha - 1 = "
            f"{conf.get('min_calibration_cases')}: every set contains all classes and the coverage is "
            "trivial."
        )
    rows, per_class = [], []
    for name, d in methods.items():
        t = d.get("test") or {}
        v = d.get("val") or {}
        rows.append(
            [
                name,
                fmt(d.get("qhat")),
                fmt(t.get("coverage")),
                fmt(t.get("mean_set_size")),
                fmt(t.get("empty_fraction")),
                fmt(v.get("coverage")),
                fmt(v.get("mean_set_size")),
            ]
        )
        for cname, c in (t.get("per_class") or {}).items():
            per_class.append([name, cname, c.get("n"), *coverage_cells(c, conf.get("target_coverage"))])
    doc.table(
        [
            "method",
            "qhat",
            "test coverage",
            "test mean set size",
            "test empty sets",
            "val coverage",
            "val mean set size",
        ],
        rows,
    )
    if per_class:
        doc.p(
            "Per true class, test split (the guarantee is marginal: a class can be under-covered, see the "
            "note):"
        )
        doc.table(
            [
                "method",
                "true class",
                "cases",
                f"coverage ({level_words(metrics)} CI)",
                "mean set size",
                "note",
            ],
            per_class,
        )


def coverage_cells(c: dict[str, Any], target: float | None) -> list[str]:
    """Coverage with its interval (from metrics), mean set size, and a note when the interval lies below
    the target."""
    cov, ci = c.get("coverage"), c.get("coverage_ci")
    if cov is None or not c.get("n"):
        return [fmt(cov), fmt(c.get("mean_set_size")), ""]
    note = ""
    if target is not None and ci and ci[1] is not None and ci[1] < target:
        note = f"under-covered: CI below {target:.2f}"
    elif target is not None and cov < target:
        note = "below target, within chance"
    return [fmt({"value": cov, "ci": ci}), fmt(c.get("mean_set_size")), note]
