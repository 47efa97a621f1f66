"""The report's document model: an ordered list of blocks (heading, paragraph, warning, key figures,
table, figure) that the renderers turn into HTML (:mod:`pipeline.report.html`), PDF
(:mod:`pipeline.report.pdf`) and Markdown (the model card), plus the number formatting every section uses.

Nothing here computes a statistic: sections format what ``metrics.json`` already holds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config

#: How ``train.tta`` is described in the report and the model card.
TTA_WORDS = {
    "none": "",
    "flip": ", mean over the image and its left-right mirror (test-time augmentation)",
    "flip_all": ", mean over every mirror combination of the axes (test-time augmentation)",
}


def ensemble_words(cfg: Config) -> str:
    """``"ensemble of K fold models"`` for a k-fold run, else ``""``."""
    return f"ensemble of {cfg.train.folds} fold models" if cfg.train.folds > 1 else ""


def fmt(v: Any, digits: int = 3) -> str:
    """Format a number or a ``{"value", "ci"}`` dict as ``0.912 [0.871, 0.948]``."""
    if isinstance(v, dict) and "value" in v:
        s = fmt(v["value"], digits)
        ci = v.get("ci")
        if ci and all(c is not None for c in ci):
            s += f" [{fmt(ci[0], digits)}, {fmt(ci[1], digits)}]"
        return s
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "n/a"
        return f"{float(v):.{digits}f}"
    if isinstance(v, (list, tuple)):
        if len(v) > 12:
            return f"[{len(v)} values]"
        return "[" + ", ".join(fmt(x, digits) for x in v) + "]"
    return str(v)


def is_metric(v: Any) -> bool:
    return isinstance(v, dict) and "value" in v


NICE = {
    "auroc": "AUROC",
    "auprc": "AUPRC (average precision)",
    "ppv": "PPV",
    "npv": "NPV",
    "f1": "F1",
    "nll": "NLL (log loss)",
    "ece": "ECE (equal-width bins)",
    "ece_equal_mass": "ECE (equal-mass bins)",
    "mce": "MCE (max bin error)",
    "l2_ce_debiased": "L2 calibration error (debiased)",
    "brier": "Brier score",
    "calibration_intercept": "calibration intercept",
    "calibration_slope": "calibration slope",
    "balanced_accuracy": "balanced accuracy",
    "macro_auroc": "macro AUROC",
    "macro_f1": "macro F1",
    "kappa_quadratic": "quadratic-weighted kappa",
    "per_class": "",
    "prevalence": "prevalence",
}


def nice(name: str) -> str:
    """Readable metric name for a dotted metrics key (``per_class.a.auroc`` -> ``a: AUROC``)."""
    parts = [NICE.get(p, p) for p in name.split(".")]
    parts = [p for p in parts if p]
    return parts[-1] if len(parts) == 1 else f"{': '.join(parts[:-1])}: {parts[-1]}"


def metric_rows(block: dict[str, Any], prefix: str = "", depth: int = 3) -> list[tuple[str, Any]]:
    """Flatten the ``{"value","ci"}`` leaves of a metrics block into (name, metric), depth-first."""
    rows = []
    for k, v in block.items():
        name = f"{prefix}{k}"
        if is_metric(v):
            rows.append((name, v))
        elif isinstance(v, dict) and depth > 1:
            rows.extend(metric_rows(v, prefix=f"{name}.", depth=depth - 1))
    return rows


def level_words(metrics: dict[str, Any]) -> str:
    """The confidence level of the run's intervals, from ``metrics.options.ci_level`` (``"95%"``)."""
    level = (metrics.get("options") or {}).get("ci_level")
    if not isinstance(level, (int, float)):
        return "stated"  # no level recorded: say nothing false
    return f"{100 * level:.4g}%"


#: How each ``ci_method`` of ``metrics.json`` is named in a sentence.
CI_METHOD_WORDS = {
    "wilson": "Wilson score",
    "cluster_wilson_t": "Wilson score on the patient-cluster design-effect sample size with a t quantile",
    "delong": "DeLong",
    "delong_logit_t": "DeLong on the logit scale with a t quantile",
    "obuchowski_logit_t": "patient-clustered DeLong (Obuchowski) on the logit scale with a t quantile",
    "sandwich_t": "robust (sandwich) standard error with a t quantile",
    "cluster_sandwich_t": "patient-cluster robust (sandwich) standard error with a t quantile",
    "bootstrap": "case bootstrap",
    "cluster_bootstrap": "patient-cluster bootstrap",
    "bootstrap_bca": "case bootstrap, bias-corrected and accelerated",
    "cluster_bootstrap_bca": "patient-cluster bootstrap, bias-corrected and accelerated",
    "bootstrap_bias_shifted": "case bootstrap, bias-shifted",
    "cluster_bootstrap_bias_shifted": "patient-cluster bootstrap, bias-shifted",
    "parametric_bootstrap_inversion": "parametric-bootstrap test inversion (may lie below the plug-in value)",
    "cluster_parametric_bootstrap_inversion": "patient-cluster parametric-bootstrap test inversion (may lie "
    "below the plug-in value)",
}


def ci_methods_sentence(blocks: list[dict[str, Any]], n_bootstrap: Any = None) -> str:
    """Which interval method each metric of ``blocks`` carries (its ``ci_method``), as one sentence.

    E.g. ``"Interval methods: DeLong for AUROC; Wilson score for accuracy, sensitivity; patient-cluster
    bootstrap (2000 resamples) for AUPRC."`` Read from the metrics, so it cannot disagree with them.
    """
    by_method: dict[str, list[str]] = {}
    for block in blocks:
        for name, m in metric_rows(block or {}, depth=1):
            method = m.get("ci_method")
            if method and m.get("ci") and nice(name) not in by_method.setdefault(method, []):
                by_method[method].append(nice(name))
    if not by_method:
        return "No interval method is recorded in the metrics."
    parts = []
    for method, names in by_method.items():
        words = CI_METHOD_WORDS.get(method, method.replace("_", " "))
        if "bootstrap" in method and n_bootstrap:
            words += f" ({n_bootstrap} resamples)"
        parts.append(f"{words} for {', '.join(names)}")
    return "Interval methods: " + "; ".join(parts) + "."


@dataclass(frozen=True)
class Table:
    """A table: header, rows of cell texts, and which columns are numeric (right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    numeric_cols: list[bool]

    def is_num(self, i: int, cell: str) -> bool:
        """Right-align this cell: a numeric column and a numeric cell."""
        return self.numeric_cols[i] and numeric(cell)


@dataclass(frozen=True)
class Figure:
    """A figure: a name (the HTML id is ``fig-<name>``), PNG bytes and a caption."""

    name: str
    png: bytes
    caption: str = ""


@dataclass
class Doc:
    """Accumulates the report as ``(kind, payload)`` blocks rendered to HTML, PDF and Markdown.

    Kinds and payloads: ``"h"``/``"p"``/``"warn"``: text; ``"kpi"``: (label, value) pairs;
    ``"table"``: :class:`Table`; ``"fig"``: :class:`Figure`.
    """

    blocks: list[tuple[str, Any]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h", str(text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", str(text)))

    def warn(self, text: str) -> None:
        self.blocks.append(("warn", str(text)))

    def table(self, header: list[Any], rows: list[list[Any]]) -> None:
        cells = [[str(c) for c in r] for r in rows]
        self.blocks.append(
            ("table", Table([str(c) for c in header], cells, numeric_columns(cells, len(header))))
        )

    def fig(self, name: str, png: bytes, caption: str = "") -> None:
        self.blocks.append(("fig", Figure(name, png, caption)))

    def kpis(self, items: list[tuple[str, str]]) -> None:
        self.blocks.append(("kpi", [(str(a), str(b)) for a, b in items]))

    # -- renderers (each in its own module) --------------------------------------------------------------
    def html(self, title: str, subtitle: str) -> str:
        """The self-contained HTML page (Jinja2 template, autoescaped)."""
        from pipeline.report.html import render_html

        return render_html(self, title, subtitle)

    def markdown(self) -> str:
        """The blocks as Markdown (figures become a pointer to the HTML/PDF)."""
        from pipeline.report.html import render_markdown

        return render_markdown(self)

    def pdf(self, path: Path, title: str, subtitle: str) -> None:
        """Write the same blocks as an A4 PDF (reportlab), atomically."""
        from pipeline.report.pdf import write_pdf

        write_pdf(self, path, title, subtitle)


_NUM = re.compile(r"^-?\d+(\.\d+)?%?( \[[-\d., ]+\])?$")


def numeric_columns(rows: list[list[Any]], ncol: int) -> list[bool]:
    """Columns whose non-empty cells are mostly numeric (right-aligned)."""
    out = []
    for i in range(ncol):
        filled = [r[i] for r in rows if i < len(r) and str(r[i]).strip() not in ("", "n/a")]
        out.append(bool(filled) and sum(numeric(c) for c in filled) > len(filled) / 2)
    return out


def numeric(c: Any) -> bool:
    """True for a number, a percentage or a ``value [lo, hi]`` cell (right-aligned in tables)."""
    return bool(_NUM.match(str(c).strip()))
