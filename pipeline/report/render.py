"""The exported report: one self-contained HTML file, the same content as PDF, and a model card.

The HTML embeds its figures as base64 PNG and has no external URL (no CDN, fonts or scripts), so it opens
on an offline hospital machine and can be mailed as one file. The PDF is drawn with matplotlib's PdfPages
(text pages + the same figures), which needs no browser. Nothing here may contain an identifier: the
inputs are pseudonymous predictions and the metrics dict.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import json
import re
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.io import atomic_path, write_text
from pipeline.report import plots

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;color:#234;border-bottom:1px solid #dde}
.tbl{overflow-x:auto}table{border-collapse:collapse;margin:.6em 0;font-size:.86em}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
.note{color:#555;font-size:.88em}img{max-width:100%;margin:.5em 0}.kpi{display:inline-block;margin:0 1.2em .6em 0;
padding:.5em .9em;border:1px solid #ccd;border-radius:6px;background:#f7f9fc}.kpi b{font-size:1.3em;display:block}
figure{margin:.8em 0}figcaption{max-width:900px}
"""

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


def esc(s: Any) -> str:
    return html.escape(str(s))


class Doc:
    """Accumulates the report as (kind, payload) blocks rendered to HTML, PDF and Markdown."""

    def __init__(self) -> None:
        self.blocks: list[tuple[str, Any]] = []

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def warn(self, text: str) -> None:
        self.blocks.append(("warn", text))

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", (header, rows)))

    def fig(self, name: str, png: bytes, caption: str = "") -> None:
        self.blocks.append(("fig", (name, png, caption)))

    def kpis(self, items: list[tuple[str, str]]) -> None:
        self.blocks.append(("kpi", items))

    # -- renderers -------------------------------------------------------------------------------------
    def html(self, title: str, subtitle: str) -> str:
        out = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
            f"<h1>{esc(title)}</h1><p class='note'>{esc(subtitle)}</p>",
        ]
        for kind, x in self.blocks:
            if kind == "h":
                out.append(f"<h2>{esc(x)}</h2>")
            elif kind == "p":
                out.append(f"<p>{esc(x)}</p>")
            elif kind == "warn":
                out.append(f"<div class='warn'>&#9888; {esc(x)}</div>")
            elif kind == "kpi":
                out.append(
                    "<div>"
                    + "".join(f"<span class='kpi'>{esc(a)}<b>{esc(b)}</b></span>" for a, b in x)
                    + "</div>"
                )
            elif kind == "table":
                header, rows = x
                out.append(
                    "<div class='tbl'><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
                )
                num_col = _numeric_columns(rows, len(header))
                for r in rows:
                    cells = "".join(
                        f"<td class='num'>{esc(c)}</td>"
                        if num_col[i] and _numeric(c)
                        else f"<td>{esc(c)}</td>"
                        for i, c in enumerate(r)
                    )
                    out.append(f"<tr>{cells}</tr>")
                out.append("</table></div>")
            elif kind == "fig":
                name, png, caption = x
                b64 = base64.b64encode(png).decode("ascii")
                out.append(
                    f"<figure><img alt='{esc(name)}' id='fig-{esc(name)}' src='data:image/png;base64,{b64}'>"
                )
                if caption:
                    out.append(f"<figcaption class='note'>{esc(caption)}</figcaption>")
                out.append("</figure>")
        out.append("</body></html>")
        return "\n".join(out)

    def markdown(self) -> str:
        out = []
        for kind, x in self.blocks:
            if kind == "h":
                out.append(f"\n## {x}\n")
            elif kind in ("p",):
                out.append(f"{x}\n")
            elif kind == "warn":
                out.append(f"> **Warning:** {x}\n")
            elif kind == "kpi":
                out.append("\n".join(f"- **{a}:** {b}" for a, b in x) + "\n")
            elif kind == "table":
                header, rows = x
                out.append("| " + " | ".join(header) + " |")
                out.append("|" + "---|" * len(header))
                out.extend("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows)
                out.append("")
            elif kind == "fig":
                out.append(f"*Figure ({x[0]}): {x[2] or x[0]} (see report.html / report.pdf)*\n")
        return "\n".join(out)

    def pdf(self, path: Path, title: str, subtitle: str) -> None:
        """The same blocks as the HTML, flowed onto A4 portrait pages with matplotlib's PdfPages."""
        _PdfFlow(path, title, subtitle).render(self.blocks)


class _PdfFlow:
    """A small flow layout on A4 pages: text is wrapped, tables are drawn in a monospace font (columns
    wrapped or the font shrunk to fit the width), figures are scaled to the text width and moved to the
    next page when they do not fit."""

    W, H, M = 8.27, 11.69, 0.6  # page width, height and margin (inches)

    def __init__(self, path: Path, title: str, subtitle: str) -> None:
        self.path, self.title, self.subtitle = path, title, subtitle
        self.fig = None
        self.y = 0.0
        self.page = 0
        self.width = self.W - 2 * self.M

    # -- primitives ------------------------------------------------------------------------------------
    def _new_page(self) -> None:
        import matplotlib.pyplot as plt

        self._finish_page()
        self.fig = plt.figure(figsize=(self.W, self.H))
        self.page += 1
        self.y = self.M
        self.fig.text(
            self.M / self.W,
            0.35 / self.H,
            f"{self.title}  -  page {self.page}",
            fontsize=6.5,
            color="#777",
            va="bottom",
        )

    def _finish_page(self) -> None:
        import matplotlib.pyplot as plt

        if self.fig is not None:
            self.pdf.savefig(self.fig)
            plt.close(self.fig)
            self.fig = None

    def _need(self, h: float) -> None:
        if self.fig is None or self.y + h > self.H - self.M - 0.15:
            self._new_page()

    @staticmethod
    def _lh(size: float) -> float:
        return size * 1.32 / 72.0

    def _line(
        self,
        text: str,
        size: float = 8.5,
        weight: str = "normal",
        family: str = "sans-serif",
        color: str = "#222",
        x: float = 0.0,
    ) -> None:
        self._need(self._lh(size))
        self.fig.text(
            (self.M + x) / self.W,
            1 - self.y / self.H,
            text,
            fontsize=size,
            weight=weight,
            family=family,
            color=color,
            va="top",
        )
        self.y += self._lh(size)

    def _wrap(self, text: str, size: float, mono: bool = False) -> list[str]:
        char_w = (0.6 if mono else 0.56) * size / 72.0
        return textwrap.wrap(text, max(20, int(self.width / char_w))) or [""]

    def _rule(self, color: str = "#999", lw: float = 0.5) -> None:
        from matplotlib.lines import Line2D

        yy = 1 - (self.y - 0.02) / self.H
        self.fig.add_artist(Line2D([self.M / self.W, 1 - self.M / self.W], [yy, yy], lw=lw, color=color))

    # -- blocks ----------------------------------------------------------------------------------------
    def heading(self, text: str, keep: float = 0.9) -> None:
        """A section heading, kept on one page with the first ``keep`` inches of what follows."""
        self._need(0.2 + self._lh(12) * len(self._wrap(text, 12)) + keep)
        self.y += 0.12
        for ln in self._wrap(text, 12):
            self._line(ln, 12, "bold", color="#234")
        self._rule("#bbc")
        self.y += 0.05

    def para(self, text: str, size: float = 8.5, color: str = "#222") -> None:
        for ln in self._wrap(text, size):
            self._line(ln, size, color=color)
        self.y += 0.05

    def warn(self, text: str) -> None:
        from matplotlib.patches import Rectangle

        lines = self._wrap("WARNING: " + text, 8.5)
        h = len(lines) * self._lh(8.5) + 0.08
        self._need(h)
        self.fig.add_artist(
            Rectangle(
                ((self.M - 0.05) / self.W, 1 - (self.y + h - 0.02) / self.H),
                (self.width + 0.1) / self.W,
                h / self.H,
                facecolor="#fff4d6",
                edgecolor="#e0a800",
                lw=0.6,
                zorder=-1,
            )
        )
        self.y += 0.03
        for ln in lines:
            self._line(ln, 8.5, x=0.05)
        self.y += 0.1

    def table(self, header: list[Any], rows: list[list[Any]]) -> None:
        cells = [[str(c) for c in header]] + [["" if c is None else str(c) for c in r] for r in rows]
        ncol = len(header)
        natural = [max(len(r[i]) for r in cells) for i in range(ncol)]
        size = 7.0
        for size in (7.0, 6.5, 6.0, 5.5):
            cap = int(self.width / (0.6 * size / 72.0)) - 2 * (ncol - 1)
            if sum(natural) <= cap:
                break
        # A column is not wrapped below its longest unbreakable piece (a word, or the "[lo, hi]" of a CI)
        # unless nothing else fits; header words may break.
        floor = [max([6] + [len(p) for r in cells[1:] for p in _cell_pieces(r[i])]) for i in range(ncol)]
        widths = list(natural)
        while sum(widths) > cap:  # wrap the column with the most slack first
            slack = [w - f for w, f in zip(widths, floor, strict=True)]
            i = int(np.argmax(slack)) if max(slack) > 0 else int(np.argmax(widths))
            if widths[i] <= 6:
                break
            widths[i] -= 1
        lh = self._lh(size)
        num_col = _numeric_columns(cells[1:], ncol)
        for r_i, row in enumerate(cells):
            wrapped = [_wrap_cell(c, widths[i]) for i, c in enumerate(row)]
            n = max(len(w) for w in wrapped)
            if r_i == 0 or self.fig is None:
                self._need(lh * (n + 2))
            else:
                self._need(lh * n)
            for k in range(n):
                parts = []
                for i, w in enumerate(wrapped):
                    t = w[k] if k < len(w) else ""
                    right = num_col[i] and (r_i == 0 or _numeric(row[i]))
                    parts.append(t.rjust(widths[i]) if right else t.ljust(widths[i]))
                self._line("  ".join(parts), size, "bold" if r_i == 0 else "normal", "monospace")
            if r_i == 0:
                self._rule()
                self.y += 0.02
        self._rule("#ccc")
        self.y += 0.1

    def _fig_size(self, name: str, png: bytes, caption: str) -> tuple[Any, float, float, list[str]]:
        import io

        import matplotlib.image as mpimg

        img = mpimg.imread(io.BytesIO(png), format="png")
        h_px, w_px = img.shape[:2]
        w = min(self.width, w_px / 110.0)
        h = w * h_px / w_px
        max_h = self.H - 2 * self.M - 1.0
        if h > max_h:
            h, w = max_h, max_h * w_px / h_px
        return img, w, h, self._wrap(caption or name, 7.5)

    def figure(self, name: str, png: bytes, caption: str) -> None:
        img, w, h, cap = self._fig_size(name, png, caption)
        self._need(h + len(cap) * self._lh(7.5) + 0.15)
        ax = self.fig.add_axes(
            [(self.M + (self.width - w) / 2) / self.W, 1 - (self.y + h) / self.H, w / self.W, h / self.H]
        )
        ax.imshow(img, interpolation="antialiased")
        ax.axis("off")
        self.y += h + 0.06
        for ln in cap:
            self._line(ln, 7.5, color="#555")
        self.y += 0.12

    def render(self, blocks: list[tuple[str, Any]]) -> None:
        from matplotlib.backends.backend_pdf import PdfPages

        with atomic_path(self.path) as tmp, PdfPages(tmp) as pdf:
            self.pdf = pdf
            self._new_page()
            for ln in self._wrap(self.title, 16.5):
                self._line(ln, 15, "bold")
            self.para(self.subtitle, 7.5, "#555")
            for i, (kind, x) in enumerate(blocks):
                if kind == "h":
                    nxt = blocks[i + 1] if i + 1 < len(blocks) else ("", None)
                    keep = 0.9
                    if nxt[0] == "fig":
                        _, _, h, cap = self._fig_size(*nxt[1])
                        keep = h + len(cap) * self._lh(7.5) + 0.15
                    self.heading(x, keep)
                elif kind == "p":
                    self.para(x)
                elif kind == "warn":
                    self.warn(x)
                elif kind == "kpi":
                    self.table(["figure", "value (95% CI)"], [[a, b] for a, b in x])
                elif kind == "table":
                    self.table(*x)
                elif kind == "fig":
                    self.figure(*x)
            self._finish_page()


_CI = re.compile(r"^(\S+) (\[[^\]]*\])$")


def _cell_pieces(c: str) -> list[str]:
    m = _CI.match(c)
    return [m.group(1), m.group(2)] if m else (c.split() or [""])


def _wrap_cell(c: str, width: int) -> list[str]:
    """Wrap a table cell; a ``value [lo, hi]`` cell breaks before its interval."""
    if len(c) <= width:
        return [c]
    m = _CI.match(c)
    if m and len(m.group(2)) <= width:
        return [m.group(1), m.group(2)]
    return textwrap.wrap(c, width) or [""]


_NUM = re.compile(r"^-?\d+(\.\d+)?%?( \[[-\d., ]+\])?$")


def _numeric_columns(rows: list[list[Any]], ncol: int) -> list[bool]:
    """Columns whose non-empty cells are mostly numeric (right-aligned)."""
    out = []
    for i in range(ncol):
        filled = [r[i] for r in rows if i < len(r) and str(r[i]).strip() not in ("", "n/a")]
        out.append(bool(filled) and sum(_numeric(c) for c in filled) > len(filled) / 2)
    return out


def _numeric(c: Any) -> bool:
    """True for a number, a percentage or a ``value [lo, hi]`` cell (right-aligned in tables)."""
    return bool(_NUM.match(str(c).strip()))


def write_reports(
    cfg: Config,
    plan,
    metrics: dict[str, Any],
    preds: dict[str, Any],
    calibrated: dict[str, np.ndarray],
    out_dir: Path,
    explanations: list[tuple[bytes, str]] | None = None,
) -> None:
    """Write ``report.html``, ``report.pdf`` and ``model_card.md`` into ``out_dir``.

    Args:
        cfg: The run config.
        plan: The run's :class:`pipeline.workspace.StagePlan` (ingest and finetune folders are read).
        metrics: The metrics dict (metrics.json).
        preds: Split name -> ``SplitPredictions`` (for the figures).
        calibrated: Split name -> calibrated probabilities, (N, K).
        out_dir: Output folder.
        explanations: Optional (PNG bytes, caption) pairs of Grad-CAM figures.
    """
    doc = build_document(cfg, plan, metrics, preds, calibrated, explanations)
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = (
        f"medtl run '{cfg.name}', generated {now}; data snapshot {plan.snapshot}; "
        f"stages ingest {Path(plan.ingest).name}, finetune {Path(plan.finetune).name}, evaluate {Path(plan.evaluate).name}"
    )
    write_text(out_dir / "report.html", doc.html(cfg.report.title, subtitle))
    doc.pdf(out_dir / "report.pdf", cfg.report.title, subtitle)
    write_text(out_dir / "model_card.md", model_card(cfg, plan, metrics, doc))


def _load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def build_document(
    cfg: Config,
    plan,
    metrics: dict[str, Any],
    preds: dict[str, Any],
    calibrated: dict[str, np.ndarray],
    explanations: list[tuple[bytes, str]] | None = None,
) -> Doc:
    """Assemble every section of the report."""
    doc = Doc()
    names = cfg.task.class_names
    pos = cfg.task.positive_index
    ingest = _load_json(Path(plan.ingest) / "ingest_report.json")
    train = _load_json(Path(plan.finetune) / "train_summary.json")
    test = metrics.get("evaluation", {}).get("test", {})
    unc, cal = test.get("uncalibrated", {}), test.get("calibrated", {})
    d_unc, d_cal = unc.get("discrimination", {}), cal.get("discrimination", {})
    c_unc, c_cal = unc.get("calibration", {}), cal.get("calibration", {})

    # Summary ---------------------------------------------------------------------------------------
    doc.h("Summary")
    primary = test.get("primary", "uncalibrated")
    d_pri = d_cal if primary == "calibrated" and d_cal else d_unc
    kp = [("Test cases", str(d_unc.get("n", "?")))]
    for label, block, key in (
        ("Test AUROC", d_pri, "auroc"),
        ("Test macro AUROC", d_pri, "macro_auroc"),
        ("Balanced accuracy", d_pri, "balanced_accuracy"),
        ("ECE before calibration", c_unc, "ece"),
        ("ECE after calibration", c_cal, "ece"),
        ("Brier after calibration", c_cal, "brier"),
    ):
        if key in block:
            kp.append((label, fmt(block[key])))
    doc.kpis(kp)
    doc.p(
        f"Task: {cfg.task.kind} classification of {', '.join(names)}"
        + (
            f"; positive class: {names[pos]} (sensitivity = share of {names[pos]} cases found)"
            if pos is not None
            else ""
        )
        + ". All intervals are 95% confidence intervals."
    )
    for w in metrics.get("warnings", []):
        doc.warn(w)

    # Data ------------------------------------------------------------------------------------------
    doc.h("Data and splits")
    if ingest:
        doc.p(
            f"{ingest.get('inputs', '?')} inputs read, {ingest.get('cases', '?')} cases from "
            f"{ingest.get('patients', '?')} patients ingested. Split rule: {ingest.get('split_rule', '?')}. "
            "No patient appears in two splits."
        )
        rows = []
        for s, d in ingest.get("splits", {}).items():
            rows.append([s, d["cases"], d["patients"]] + [d["per_class"].get(n, 0) for n in names])
        doc.table(["split", "cases", "patients"] + [f"class {n}" for n in names], rows)
        holdout = metrics.get("promotion_holdout") or {}
        if holdout.get("note"):
            doc.p(f"Locked promotion holdout: {holdout['note']}.")
        probs = ingest.get("problems_by_code", {})
        if probs:
            doc.p(
                "Inputs and label rows left out, by reason (details per file in the workspace's private folder):"
            )
            examples = {}
            for pr in ingest.get("problems", []):
                examples.setdefault(pr["code"], pr["reason"])
            doc.table(
                ["reason code", "count", "example"],
                [[c, n, examples.get(c, "")[:160]] for c, n in sorted(probs.items())],
            )
        else:
            doc.p("Every input file was read and every label row matched a case.")
        review = ingest.get("pixel_review", [])
        if review:
            doc.warn(
                f"{len(review)} case(s) are ultrasound/secondary-capture images or declare burned-in annotation: "
                "their pixels may show text (names, dates) and should be reviewed before the images are shared."
            )
        doc.p(f"De-identification: {ingest.get('deidentification', '')}")

    # Model -----------------------------------------------------------------------------------------
    doc.h("Model and training")
    if train:
        w = train.get("weights") or {}
        doc.table(
            ["item", "value"],
            [
                ["backbone", train.get("backbone")],
                [
                    "pretrained weights",
                    f"{w.get('description', 'none (from scratch)')}" if w else "none (from scratch)",
                ],
                ["weights sha256", w.get("sha256", "n/a")],
                ["strategy", train.get("strategy")],
                ["model scored", (ensemble_words(cfg) or "one network") + TTA_WORDS[cfg.train.tta]],
                ["input", f"{cfg.preprocess.spatial_dims}D, {cfg.preprocess.image_size} px, 1 channel"],
                [
                    "training cases (per class)",
                    f"{train.get('train_cases')} {train.get('train_class_counts')}",
                ],
                ["label fraction", train.get("label_fraction")],
                [
                    "epochs run / best epoch",
                    f"{train.get('epochs_run')} / {train.get('best_epoch')} ({train.get('stopped_by')})",
                ],
                ["best validation AUROC", fmt(train.get("best_val_auroc"))],
                ["device", train.get("device")],
            ],
        )
    hist_path = Path(plan.finetune) / "history.csv"
    if hist_path.exists():
        with open(hist_path) as fh:
            history = list(csv.DictReader(fh))
        if history:
            doc.fig(
                "history", plots.to_png(plots.history_figure(history)), "Loss and validation AUROC per epoch."
            )
    preview = Path(plan.augment) / "preview.png"
    if preview.exists():
        doc.fig("augmentation", preview.read_bytes(), "Training augmentation preview (MONAI transforms).")

    # Discrimination and calibration --------------------------------------------------------------------
    calinfo = metrics.get("calibration", {})
    method = calinfo.get("applied", cfg.evaluate.calibration)
    primary = test.get("primary", "uncalibrated")
    prim = cal if primary == "calibrated" and cal else unc
    level = f"{100 * metrics.get('options', {}).get('ci_level', 0.95):.0f}%"
    doc.h("Discrimination and calibration on the test split")
    doc.p(
        f"Every figure is given before and after post-hoc calibration ({method}), with {level} CIs by "
        f"{'patient-cluster' if test.get('ci_resampling') == 'patient_cluster' else 'case'} resampling "
        "(AUROC: DeLong). Rules at a fixed threshold use 'positive if p >= 0.5' (binary) or the arg-max."
    )
    for title, bu, bc in (("Discrimination", d_unc, d_cal), ("Calibration", c_unc, c_cal)):
        rows = []
        flat_u, flat_c = dict(metric_rows(bu)), dict(metric_rows(bc))
        for name in dict.fromkeys(list(flat_u) + list(flat_c)):
            rows.append([nice(name), fmt(flat_u.get(name)), fmt(flat_c.get(name)) if bc else "n/a"])
        if rows:
            doc.p(f"{title}, test split ({d_unc.get('n', '?')} cases):")
            doc.table(["metric", "uncalibrated", f"calibrated ({method})"], rows)
    cm = (prim.get("discrimination") or {}).get("confusion_matrix")
    if isinstance(cm, dict) and cm.get("rows_true_cols_pred"):
        labels = cm.get("labels", names)
        doc.p(
            f"Confusion matrix, test split ({prim.get('discrimination', {}).get('prediction_rule', '')}); "
            "rows = true class, columns = predicted class:"
        )
        doc.table(
            ["true \\ predicted"] + [str(x) for x in labels],
            [[f"{lab}"] + list(r) for lab, r in zip(labels, cm["rows_true_cols_pred"], strict=False)],
        )
    if calinfo:
        params = ", ".join(
            f"{k} = {fmt(v)}" for k, v in (calinfo.get("parameters") or {}).items() if not isinstance(v, dict)
        )
        doc.p(
            f"Calibration: {method} fitted on the calibration split only ({calinfo.get('n_cases', '?')} cases)"
            + (f"; {params}" if params else "")
            + (f"; {calinfo['reason']}" if calinfo.get("reason") else "")
            + ". "
            "Ideal values: ECE and MCE 0, calibration intercept 0, slope 1 (slope < 1: over-confident)."
        )
        for w in calinfo.get("warnings", []):
            doc.warn(f"Calibration: {w}")
    if "test" in preds:
        sp = preds["test"]
        raw = torch.softmax(torch.from_numpy(sp.logits), 1).numpy()
        calp = calibrated.get("test", raw)
        auc_txt = {}
        if pos is not None and "auroc" in d_unc:
            auc_txt[names[pos]] = fmt(d_unc["auroc"])
        doc.fig(
            "roc",
            plots.to_png(plots.roc_figure(sp.y, calp, names, pos, auc_txt)),
            "ROC curve of the test split.",
        )
        rel_u = (c_unc.get("reliability") or {}).get("equal_width")
        rel_c = (c_cal.get("reliability") or {}).get("equal_width")
        if rel_u and rel_c:
            ref = c_unc.get("reference", "")
            xlabel = (
                "predicted probability of the positive class"
                if ref == "positive_class"
                else "confidence (top class)"
            )
            doc.fig(
                "reliability",
                plots.to_png(plots.reliability_figure(rel_u, rel_c, xlabel)),
                f"Reliability diagrams, test split ({c_unc.get('n_bins', cfg.evaluate.ece_bins)} equal-width bins; "
                "numbers are bin counts; bars are 95% Wilson intervals). Points on the diagonal are well calibrated.",
            )
        thr = {}
        for op_name, op in (prim.get("operating_points") or {}).items():
            if isinstance(op, dict) and isinstance(op.get("threshold"), (int, float)):
                thr[op_name] = float(op["threshold"])
        doc.fig(
            "histogram",
            plots.to_png(plots.histogram_figure(sp.y, calp, names, pos, thr)),
            "Calibrated probabilities per true class, test split; vertical lines are the operating points "
            "chosen on validation.",
        )

    _operating_points_section(doc, metrics, prim, names, pos)
    _conformal_section(doc, metrics)
    _subgroup_section(doc, metrics)
    _patient_section(doc, metrics)
    if explanations:
        doc.h("Explanations (Grad-CAM)")
        if ingest.get("pixel_review"):
            doc.warn(
                "Some inputs were flagged at ingestion for possible burned-in text (see Data and splits): the "
                "overlays show the preprocessed pixels, so review them before sharing this report outside the team."
            )
        for png, caption in explanations:
            doc.fig("gradcam", png, caption)
    _study_section(doc, metrics)
    _comparison_section(doc, metrics)

    # Checklist and limitations ---------------------------------------------------------------------
    doc.h("Reporting checklist (TRIPOD+AI / CLAIM items on data, splits, metrics and calibration)")
    doc.table(["item", "where"], checklist(cfg, ingest, metrics))
    doc.h("Limitations")
    for text in limitations(cfg, ingest, metrics):
        doc.p(text)
    return doc


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


def _operating_points_section(
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
    if ops:
        doc.p(
            f"Each threshold on the calibrated probability of {pos_name} was chosen on the validation split "
            f"({n_val} cases, {n_val_pos} {pos_name}) and applied unchanged to the test split ({n_test_pos} {pos_name}). "
            "Validation and test rows are shown side by side: the test row is the estimate to rely on."
        )
        if isinstance(n_val_pos, int) and n_val_pos > 0:
            step = 1.0 / n_val_pos
            if n_val_pos < 100:
                doc.warn(
                    f"The validation split has only {n_val_pos} {pos_name} cases: one case moves validation "
                    f"sensitivity by {step:.1%}, so a threshold chosen there transfers poorly to new data and a "
                    "sensitivity target met on validation is often missed on test. Prefer the test row and its CI."
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
            "Decision curve, test split: net benefit of acting on the model (calibrated probabilities) against "
            "treating everyone and no one, over threshold probabilities (Vickers & Elkin 2006). The model is "
            "useful where its curve lies above both.",
        )


def _conformal_section(doc: Doc, metrics: dict[str, Any]) -> None:
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
        f"({conf.get('fitted_on')}), aiming at coverage >= {fmt(conf.get('target_coverage'))} (alpha = {alpha}). "
        "A set lists every class the model cannot rule out; a set with more than one class flags a case to review. "
        "Coverage = share of test cases whose true class is in their set."
    )
    if (conf.get("n_calibration") or 0) < (conf.get("min_calibration_cases") or 0):
        doc.warn(
            f"Only {conf.get('n_calibration')} calibration cases, fewer than 1/alpha - 1 = "
            f"{conf.get('min_calibration_cases')}: every set contains all classes and the coverage is trivial."
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
            per_class.append([name, cname, c.get("n"), *_coverage_cells(c, conf.get("target_coverage"))])
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
            "Per true class, test split (the guarantee is marginal: a class can be under-covered, see the note):"
        )
        doc.table(["method", "true class", "cases", "coverage (95% CI)", "mean set size", "note"], per_class)


def _coverage_cells(c: dict[str, Any], target: float | None) -> list[str]:
    """Coverage with its Wilson interval, mean set size, and a note when the interval lies below the target."""
    from pipeline.evaluate.metrics import wilson_ci

    cov, n = c.get("coverage"), c.get("n") or 0
    if cov is None or not n:
        return [fmt(cov), fmt(c.get("mean_set_size")), ""]
    lo, hi = wilson_ci(int(round(cov * n)), int(n))
    note = ""
    if target is not None and hi < target:
        note = f"under-covered: CI below {target:.2f}"
    elif target is not None and cov < target:
        note = "below target, within chance"
    return [fmt({"value": cov, "ci": [lo, hi]}), fmt(c.get("mean_set_size")), note]


def _group_row(col: str, g: str, d: dict[str, Any]) -> list[Any]:
    size = d.get("size") or {}
    m = d.get("metrics") or {}
    disc, calm = m.get("discrimination") or {}, m.get("calibration") or {}
    auc = disc.get("auroc", disc.get("macro_auroc"))
    note = (
        "too small: CIs too wide to conclude" if d.get("warning") == "too_small" else (d.get("warning") or "")
    )
    if d.get("error"):
        note = (note + "; " if note else "") + str(d["error"])
    return [
        col,
        g,
        size.get("cases", ""),
        size.get("patients", ""),
        fmt(auc),
        fmt(disc.get("sensitivity", disc.get("accuracy"))),
        fmt(disc.get("specificity", disc.get("balanced_accuracy"))),
        fmt(calm.get("ece")),
        fmt(calm.get("brier")),
        note,
    ]


def _subgroup_section(doc: Doc, metrics: dict[str, Any]) -> None:
    subs = metrics.get("subgroups")
    if not subs:
        return
    doc.h("Subgroups (test split)")
    binary = metrics.get("task", {}).get("kind") == "binary"
    min_n = metrics.get("options", {}).get("min_subgroup")
    doc.p(
        "The same metrics per value of each subgroup column recorded at ingestion (primary probabilities, 95% CIs). "
        f"Groups with fewer than {min_n} cases are marked 'too small': their intervals are too wide to show a difference."
    )
    rows = []
    for col, groups in subs.items():
        if isinstance(groups, dict):
            rows += [_group_row(col, g, d) for g, d in groups.items() if isinstance(d, dict)]
    header = [
        "column",
        "group",
        "cases",
        "patients",
        "AUROC" if binary else "macro AUROC",
        "sensitivity" if binary else "accuracy",
        "specificity" if binary else "balanced acc.",
        "ECE",
        "Brier",
        "note",
    ]
    if rows:
        doc.table(header, rows)
    for col, groups in subs.items():
        if isinstance(groups, dict) and len(groups) == 1:
            doc.p(
                f"Column '{col}' has a single value in the test split: no comparison between groups is possible."
            )


def _patient_section(doc: Doc, metrics: dict[str, Any]) -> None:
    pl = metrics.get("patient_level")
    if not pl:
        return
    doc.h("Patient-level metrics (test split)")
    doc.p(
        f"{pl.get('n_patients')} patients; a patient's probabilities are the "
        f"{str(pl.get('aggregation')).replace('_', ' ')} over their cases "
        f"({pl.get('probabilities')} probabilities); patient label rule: {str(pl.get('label_rule')).replace('_', ' ')}; "
        f"{pl.get('n_patients_with_mixed_labels')} patient(s) have cases with different labels."
    )
    rows = [
        [nice(k), fmt(v)]
        for blk in ("discrimination", "calibration")
        for k, v in metric_rows((pl.get("metrics") or {}).get(blk) or {})
    ]
    if rows:
        doc.table(["metric (patient level)", "value (95% CI)"], rows)


def _study_section(doc: Doc, metrics: dict[str, Any]) -> None:
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


def _comparison_section(doc: Doc, metrics: dict[str, Any]) -> None:
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


def checklist(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[list[str]]:
    return [
        [
            "Data source and eligibility (CLAIM 7-8, TRIPOD+AI 5)",
            "Data and splits: inputs read, cases ingested, reasons for exclusion",
        ],
        [
            "De-identification method (CLAIM 12)",
            "Data and splits: keyed HMAC pseudonyms; private mapping kept apart",
        ],
        [
            "Sample size and class balance (TRIPOD+AI 9, CLAIM 19)",
            "Data and splits table (cases, patients, per class, per split)",
        ],
        [
            "Data partitioning, patient level (CLAIM 21, TRIPOD+AI 10)",
            f"Split rule: {ingest.get('split_rule', 'n/a')}",
        ],
        [
            "Reference standard / labels (CLAIM 14-16)",
            f"Labels from {Path(cfg.data.labels_csv).name}, column '{cfg.data.label_column}'",
        ],
        ["Model, initialisation and training (CLAIM 22-26)", "Model and training table, training curves"],
        ["Discrimination with CIs (TRIPOD+AI 23, CLAIM 28-29)", "Discrimination table (95% CIs)"],
        [
            "Calibration (TRIPOD+AI 12e/23)",
            "Calibration method fitted on its own split; reliability diagrams, ECE, Brier, slope/intercept",
        ],
        [
            "Operating points and clinical utility (TRIPOD+AI 12)",
            "Operating points chosen on validation; decision curve",
        ],
        [
            "Subgroup / fairness analysis (TRIPOD+AI 14, CLAIM 34)",
            "Subgroups section" if metrics.get("subgroups") else "no subgroup columns in this data",
        ],
        [
            "Failure analysis (CLAIM 37)",
            "Probability histogram; operating-point confusion matrices"
            + ("; Grad-CAM of correct and wrong cases" if cfg.evaluate.explain_cases else ""),
        ],
        [
            "Uncertainty of individual predictions",
            "Conformal prediction sets (coverage and set size per class)"
            if (metrics.get("conformal") or {}).get("methods")
            else "no conformal sets (no calibration split)",
        ],
        [
            "Unit of analysis (CLAIM 32)",
            "Patient-level metrics section"
            if metrics.get("patient_level")
            else "one case per patient in the test split: case level = patient level",
        ],
        [
            "Comparison with previous / baseline models (TRIPOD+AI 23b)",
            "Comparison section (paired DeLong, paired bootstrap)"
            if metrics.get("comparison")
            else "not requested",
        ],
    ]


def limitations(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    n_test = ingest.get("splits", {}).get("test", {}).get("cases")
    out = [
        f"Internal validation only: the test split ({n_test} cases) comes from the same source as the training data; "
        "performance on other scanners, sites or populations is unknown until measured.",
        "Intervals are wide with a few hundred test cases; differences inside them are not evidence of a difference.",
        "Calibration holds for the prevalence of the calibration split; a different prevalence at deployment shifts "
        "predicted probabilities and predictive values.",
    ]
    if cfg.preprocess.image_size <= 64:
        out.append(f"Inputs are resized to {cfg.preprocess.image_size} px, which discards fine detail.")
    return out


def model_card(cfg: Config, plan, metrics: dict[str, Any], doc: Doc) -> str:
    """Markdown model card: intended use, data provenance, splits, metrics, calibration, limitations."""
    head = [
        f"# Model card: {cfg.name}",
        "",
        f"- **Intended use:** {cfg.report.intended_use}",
        f"- **Task:** {cfg.task.kind} classification; classes: {', '.join(cfg.task.class_names)}"
        + (
            f"; positive class: {cfg.task.class_names[cfg.task.positive_index]}"
            if cfg.task.positive_index is not None
            else ""
        ),
        f"- **Model:** {cfg.model.backbone} ({'pretrained' if cfg.model.pretrained else 'from scratch'}), "
        f"strategy {cfg.train.strategy}, input {cfg.preprocess.spatial_dims}D {cfg.preprocess.image_size} px"
        + (f", {ens}" if (ens := ensemble_words(cfg)) else "")
        + TTA_WORDS[cfg.train.tta],
        f"- **Data provenance:** labels file `{Path(cfg.data.labels_csv).name}`; data snapshot `{plan.snapshot}`; "
        "identifiers pseudonymised at ingestion",
        f"- **Post-hoc calibration:** {cfg.evaluate.calibration}, fitted on the calibration split only",
        "- **Not for:** use outside the population and acquisition described here, or as the sole basis of a clinical decision.",
        "",
    ]
    return "\n".join(head) + doc.markdown()
