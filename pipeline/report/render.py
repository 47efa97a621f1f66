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
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.io import atomic_path, write_text
from pipeline.report import plots

CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1050px;color:#222;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #345;padding-bottom:.2em}h2{font-size:1.25em;margin-top:1.6em;color:#234}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#eef2f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em;margin:.4em 0}
.note{color:#555;font-size:.88em}img{max-width:100%;margin:.5em 0}.kpi{display:inline-block;margin:0 1.2em .6em 0;
padding:.5em .9em;border:1px solid #ccd;border-radius:6px;background:#f7f9fc}.kpi b{font-size:1.3em;display:block}
"""


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
                out.append("<div>" + "".join(f"<span class='kpi'>{esc(a)}<b>{esc(b)}</b></span>" for a, b in x) + "</div>")
            elif kind == "table":
                header, rows = x
                out.append("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>")
                for r in rows:
                    cells = "".join(
                        f"<td class='num'>{esc(c)}</td>" if _numeric(c) else f"<td>{esc(c)}</td>" for c in r
                    )
                    out.append(f"<tr>{cells}</tr>")
                out.append("</table>")
            elif kind == "fig":
                name, png, caption = x
                b64 = base64.b64encode(png).decode("ascii")
                out.append(f"<figure><img alt='{esc(name)}' id='fig-{esc(name)}' src='data:image/png;base64,{b64}'>")
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
        return "\n".join(out)

    def pdf(self, path: Path, title: str, subtitle: str) -> None:
        """Text pages (wrapped) and figure pages, A4 portrait, via matplotlib's PdfPages."""
        import matplotlib.image as mpimg
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_pdf import PdfPages

        lines: list[tuple[str, str]] = [("title", title), ("note", subtitle), ("gap", "")]
        pages: list[Any] = []

        def flush_text() -> None:
            if lines:
                pages.append(("text", list(lines)))
                lines.clear()

        for kind, x in self.blocks:
            if kind == "h":
                lines += [("gap", ""), ("h", x)]
            elif kind in ("p", "warn"):
                prefix = "WARNING: " if kind == "warn" else ""
                lines += [("p", s) for s in textwrap.wrap(prefix + x, 100)]
            elif kind == "kpi":
                lines += [("p", f"{a}: {b}") for a, b in x]
            elif kind == "table":
                header, rows = x
                widths = [min(40, max(len(str(c)) for c in [h] + [r[i] for r in rows])) for i, h in enumerate(header)]
                row_fmt = "  ".join(f"{{:<{w}}}" for w in widths)
                lines.append(("mono", row_fmt.format(*[str(h)[:40] for h in header])))
                lines += [("mono", row_fmt.format(*[str(c)[:40] for c in r])) for r in rows]
            elif kind == "fig":
                flush_text()
                pages.append(("fig", x))
        flush_text()
        with atomic_path(path) as tmp, PdfPages(tmp) as pdf:
            for kind, payload in pages:
                if kind == "text":
                    for start in range(0, len(payload), 60):
                        fig = plt.figure(figsize=(8.27, 11.69))
                        y = 0.96
                        for style, text in payload[start : start + 60]:
                            size = {"title": 15, "h": 12, "note": 8}.get(style, 8)
                            family = "monospace" if style == "mono" else "sans-serif"
                            weight = "bold" if style in ("title", "h") else "normal"
                            fig.text(0.06, y, text, fontsize=size, family=family, weight=weight, va="top")
                            y -= 0.0155 if style not in ("title", "h") else 0.024
                        pdf.savefig(fig)
                        plt.close(fig)
                else:
                    name, png, caption = payload
                    import io

                    img = mpimg.imread(io.BytesIO(png), format="png")
                    fig = plt.figure(figsize=(8.27, 11.69))
                    ax = fig.add_axes([0.06, 0.3, 0.88, 0.6])
                    ax.imshow(img)
                    ax.axis("off")
                    fig.text(0.06, 0.26, "\n".join(textwrap.wrap(caption or name, 100)), fontsize=9, va="top")
                    pdf.savefig(fig)
                    plt.close(fig)


def _numeric(c: Any) -> bool:
    s = str(c)
    return bool(s) and (s[0].isdigit() or (s[0] == "-" and s[1:2].isdigit()))


def write_reports(cfg: Config, plan, metrics: dict[str, Any], preds: dict[str, Any],
                  calibrated: dict[str, np.ndarray], out_dir: Path) -> None:
    """Write ``report.html``, ``report.pdf`` and ``model_card.md`` into ``out_dir``."""
    doc = build_document(cfg, plan, metrics, preds, calibrated)
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


def build_document(cfg: Config, plan, metrics: dict[str, Any], preds: dict[str, Any],
                   calibrated: dict[str, np.ndarray]) -> Doc:
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
    kp = []
    for label, block, key in (
        ("Test AUROC", d_unc, "auroc"), ("ECE before calibration", c_unc, "ece"),
        ("ECE after calibration", c_cal, "ece"), ("Brier after calibration", c_cal, "brier"),
    ):
        if key in block:
            kp.append((label, fmt(block[key])))
    doc.kpis(kp)
    doc.p(
        f"Task: {cfg.task.kind} classification of {', '.join(names)}"
        + (f"; positive class: {names[pos]} (sensitivity = share of {names[pos]} cases found)" if pos is not None else "")
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
        probs = ingest.get("problems_by_code", {})
        if probs:
            doc.p("Inputs and label rows left out, by reason (details per file in the workspace's private folder):")
            examples = {}
            for pr in ingest.get("problems", []):
                examples.setdefault(pr["code"], pr["reason"])
            doc.table(["reason code", "count", "example"], [[c, n, examples.get(c, "")[:160]] for c, n in sorted(probs.items())])
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
                ["pretrained weights", f"{w.get('description', 'none (from scratch)')}" if w else "none (from scratch)"],
                ["weights sha256", w.get("sha256", "n/a")],
                ["strategy", train.get("strategy")],
                ["input", f"{cfg.preprocess.spatial_dims}D, {cfg.preprocess.image_size} px, 1 channel"],
                ["training cases (per class)", f"{train.get('train_cases')} {train.get('train_class_counts')}"],
                ["label fraction", train.get("label_fraction")],
                ["epochs run / best epoch", f"{train.get('epochs_run')} / {train.get('best_epoch')} ({train.get('stopped_by')})"],
                ["best validation AUROC", fmt(train.get("best_val_auroc"))],
                ["device", train.get("device")],
            ],
        )
    hist_path = Path(plan.finetune) / "history.csv"
    if hist_path.exists():
        with open(hist_path) as fh:
            history = list(csv.DictReader(fh))
        if history:
            doc.fig("history", plots.to_png(plots.history_figure(history)), "Loss and validation AUROC per epoch.")
    preview = Path(plan.augment) / "preview.png"
    if preview.exists():
        doc.fig("augmentation", preview.read_bytes(), "Training augmentation preview (MONAI transforms).")

    # Discrimination and calibration --------------------------------------------------------------------
    doc.h("Discrimination and calibration on the test split")
    calinfo = metrics.get("calibration", {})
    method = calinfo.get("applied", cfg.evaluate.calibration)
    for title, bu, bc in (("Discrimination", d_unc, d_cal), ("Calibration", c_unc, c_cal)):
        rows = []
        flat_u, flat_c = dict(metric_rows(bu)), dict(metric_rows(bc))
        for name in dict.fromkeys(list(flat_u) + list(flat_c)):
            rows.append([name, fmt(flat_u.get(name)), fmt(flat_c.get(name))])
        if rows:
            doc.p(f"{title} (test split, 95% CIs by {test.get('ci_resampling', 'bootstrap')} resampling):")
            doc.table(["metric", "uncalibrated", f"calibrated ({method})"], rows)
    if calinfo:
        params = ", ".join(f"{k} = {fmt(v)}" for k, v in (calinfo.get("parameters") or {}).items())
        doc.p(
            f"Calibration: {method} fitted on the calibration split only ({calinfo.get('n_cases', '?')} cases)"
            + (f"; {params}" if params else "") + "."
        )
        for w in calinfo.get("warnings", []):
            doc.warn(w)
    if "test" in preds:
        sp = preds["test"]
        raw = torch.softmax(torch.from_numpy(sp.logits), 1).numpy()
        calp = calibrated.get("test", raw)
        auc_txt = {}
        if pos is not None and "auroc" in d_unc:
            auc_txt[names[pos]] = fmt(d_unc["auroc"])
        doc.fig("roc", plots.to_png(plots.roc_figure(sp.y, calp, names, pos, auc_txt)), "ROC curve of the test split.")
        rel_u = (c_unc.get("reliability") or {}).get("equal_width")
        rel_c = (c_cal.get("reliability") or {}).get("equal_width")
        if rel_u and rel_c:
            ref = c_unc.get("reference", "")
            xlabel = "predicted probability of the positive class" if ref == "positive_class" else "confidence (top class)"
            doc.fig(
                "reliability",
                plots.to_png(plots.reliability_figure(rel_u, rel_c, xlabel)),
                f"Reliability diagrams ({c_unc.get('n_bins', cfg.evaluate.ece_bins)} equal-width bins; numbers are bin "
                "counts; bars are 95% Wilson intervals).",
            )
        thr = {}
        for op_name, op in (cal.get("operating_points") or {}).items():
            if isinstance(op, dict) and isinstance(op.get("threshold"), (int, float)):
                thr[op_name] = float(op["threshold"])
        doc.fig("histogram", plots.to_png(plots.histogram_figure(sp.y, calp, names, pos, thr)),
                "Calibrated probabilities per true class; dashed lines are the operating points chosen on validation.")

    # Operating points --------------------------------------------------------------------------------
    ops = cal.get("operating_points")
    if ops:
        doc.h("Operating points (chosen on validation, reported on test)")
        keys = ["threshold", "sensitivity", "specificity", "ppv", "npv"]
        rows = []
        for op_name, op in ops.items():
            if not isinstance(op, dict):
                continue
            test_op = op.get("test", op)
            cm = test_op.get("confusion_matrix", op.get("confusion_matrix"))
            rows.append([op_name] + [fmt(test_op.get(k, op.get(k))) for k in keys] + [fmt(cm) if cm is not None else ""])
        doc.table(["operating point"] + keys + ["confusion matrix [[TN, FP], [FN, TP]]"], rows)
    dc = cal.get("decision_curve")
    if isinstance(dc, dict) and "thresholds" in dc:
        doc.fig("decision_curve", plots.to_png(plots.decision_curve_figure(dc)), "Net benefit across threshold probabilities.")

    # Conformal ---------------------------------------------------------------------------------------
    conf = metrics.get("conformal")
    if conf:
        doc.h("Conformal prediction sets")
        rows = []
        for method, d in conf.items():
            if isinstance(d, dict):
                rows.append([method, fmt(d.get("target_coverage", d.get("coverage_target"))), fmt(d.get("coverage")), fmt(d.get("mean_set_size"))])
        if rows:
            doc.table(["method", "target coverage", "test coverage", "mean set size"], rows)

    # Subgroups -----------------------------------------------------------------------------------------
    subs = metrics.get("subgroups")
    if subs:
        doc.h("Subgroups (test split)")
        rows = []
        for col, groups in subs.items():
            if not isinstance(groups, dict):
                continue
            for g, d in groups.items():
                if not isinstance(d, dict):
                    continue
                rows.append([col, g, d.get("n", d.get("cases", "")), fmt(d.get("auroc")), fmt(d.get("ece")), "; ".join(d.get("warnings", []))])
        if rows:
            doc.table(["column", "group", "cases", "AUROC", "ECE", "note"], rows)

    # Checklist and limitations ---------------------------------------------------------------------
    doc.h("Reporting checklist (TRIPOD+AI / CLAIM items on data, splits, metrics and calibration)")
    doc.table(["item", "where"], checklist(cfg, ingest, metrics))
    doc.h("Limitations")
    for text in limitations(cfg, ingest, metrics):
        doc.p(text)
    return doc


def checklist(cfg: Config, ingest: dict[str, Any], metrics: dict[str, Any]) -> list[list[str]]:
    return [
        ["Data source and eligibility (CLAIM 7-8, TRIPOD+AI 5)", "Data and splits: inputs read, cases ingested, reasons for exclusion"],
        ["De-identification method (CLAIM 12)", "Data and splits: keyed HMAC pseudonyms; private mapping kept apart"],
        ["Sample size and class balance (TRIPOD+AI 9, CLAIM 19)", "Data and splits table (cases, patients, per class, per split)"],
        ["Data partitioning, patient level (CLAIM 21, TRIPOD+AI 10)", f"Split rule: {ingest.get('split_rule', 'n/a')}"],
        ["Reference standard / labels (CLAIM 14-16)", f"Labels from {Path(cfg.data.labels_csv).name}, column '{cfg.data.label_column}'"],
        ["Model, initialisation and training (CLAIM 22-26)", "Model and training table, training curves"],
        ["Discrimination with CIs (TRIPOD+AI 23, CLAIM 28-29)", "Discrimination table (95% CIs)"],
        ["Calibration (TRIPOD+AI 12e/23)", "Calibration method fitted on its own split; reliability diagrams, ECE, Brier, slope/intercept"],
        ["Operating points and clinical utility (TRIPOD+AI 12)", "Operating points chosen on validation; decision curve"],
        ["Subgroup / fairness analysis (TRIPOD+AI 14, CLAIM 34)", "Subgroups section" if metrics.get("subgroups") else "no subgroup columns in this data"],
        ["Failure analysis (CLAIM 37)", "Probability histogram; operating-point confusion matrices"],
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
        + (f"; positive class: {cfg.task.class_names[cfg.task.positive_index]}" if cfg.task.positive_index is not None else ""),
        f"- **Model:** {cfg.model.backbone} ({'pretrained' if cfg.model.pretrained else 'from scratch'}), "
        f"strategy {cfg.train.strategy}, input {cfg.preprocess.spatial_dims}D {cfg.preprocess.image_size} px",
        f"- **Data provenance:** labels file `{Path(cfg.data.labels_csv).name}`; data snapshot `{plan.snapshot}`; "
        "identifiers pseudonymised at ingestion",
        f"- **Post-hoc calibration:** {cfg.evaluate.calibration}, fitted on the calibration split only",
        f"- **Not for:** use outside the population and acquisition described here, or as the sole basis of a clinical decision.",
        "",
    ]
    return "\n".join(head) + doc.markdown()
