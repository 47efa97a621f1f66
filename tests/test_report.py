"""The exported report: every section a clinical committee needs, from a synthetic evaluated run.

``build_report`` assembles a run without training (synthetic logits with a known signal, real
``evaluate_run`` metrics, a real comparison and study summary, a Grad-CAM figure) and writes the report;
``tests/test_report_chromium.py`` renders the same output in headless Chromium.
"""

from __future__ import annotations

import csv
import html as html_mod
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.evaluate.compare import PreviousScores, compare_models
from pipeline.evaluate.gradcam import Explanation, select_cases
from pipeline.evaluate.metrics import wilson_ci
from pipeline.evaluate.reporting import reporting_items
from pipeline.evaluate.stage import add_val_operating_points
from pipeline.evaluate.study import summarise_study
from pipeline.evaluate.summary import EvalOptions, SplitPredictions, TaskInfo, evaluate_run
from pipeline.report import render
from pipeline.report.document import Doc
from pipeline.report.plots import to_png
from pipeline.report.sections.conformal import conformal_section
from pipeline.report.sections.study import comparison_section, study_section
from pipeline.workspace import StagePlan

BINARY = {"0": "malignant", "1": "benign"}
MULTI = {"0": "normal", "1": "mild", "2": "severe"}


def _split(
    rng: np.random.Generator, n: int, k: int, strength: float, name: str, two_per_patient: bool
) -> SplitPredictions:
    y = rng.integers(0, k, n)
    z = rng.normal(size=(n, k))
    z[np.arange(n), y] += strength
    z *= 4.0  # over-confident, so calibration clearly helps (and passes a cross-validated guard)
    per = 2 if two_per_patient else 1
    patient = np.array([f"P{name[0]}{i // per:04d}" for i in range(n)])
    case = np.array([f"C{name[0]}{i:05d}" for i in range(n)])
    sex = np.where(rng.random(n) < 0.9, "F", "M")  # 'M' is a too-small subgroup
    site = np.where(np.arange(n) % 2 == 0, "site-a", "site-b")
    return SplitPredictions(logits=z, y=y, patient=patient, case=case, groups={"sex": sex, "site": site})


def _write_plan(root: Path, names: list[str]) -> StagePlan:
    plan = StagePlan(
        workspace=root,
        snapshot="0123456789ab",
        ingest=root / "ingest" / "i1",
        augment=root / "augment" / "a1",
        finetune=root / "finetune" / "f1",
        evaluate=root / "evaluate" / "e1",
    )
    for d in (plan.ingest, plan.augment, plan.finetune, plan.evaluate):
        d.mkdir(parents=True)
    splits = {
        s: {"cases": n, "patients": n, "per_class": {c: n // len(names) for c in names}}
        for s, n in (("train", 600), ("val", 160), ("calibration", 120), ("test", 300))
    }
    (plan.ingest / "ingest_report.json").write_text(
        json.dumps(
            {
                "inputs": 1190,
                "cases": 1180,
                "patients": 1180,
                "split_rule": "patient-level keyed hash",
                "splits": splits,
                "problems_by_code": {"unreadable": 7, "no_label": 3},
                "problems": [
                    {"code": "unreadable", "reason": "file is not DICOM, NIfTI or a 2D image"},
                    {"code": "no_label", "reason": "no row in labels.csv"},
                ],
                "pixel_review": [],
                "deidentification": "keyed HMAC-SHA256 pseudonyms",
            }
        )
    )
    (plan.finetune / "train_summary.json").write_text(
        json.dumps(
            {
                "backbone": "efficientnet_lite0",
                "strategy": "finetune",
                "train_cases": 600,
                "train_class_counts": [300, 300],
                "label_fraction": 1.0,
                "epochs_run": 3,
                "best_epoch": 2,
                "stopped_by": "max_epochs",
                "best_val_auroc": 0.9,
                "device": "cpu",
                "weights": {"description": "ImageNet weights", "sha256": "ab" * 32},
            }
        )
    )
    with open(plan.finetune / "history.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["epoch", "train_loss", "val_loss", "val_auroc", "best"])
        for e in range(1, 4):
            w.writerow([e, 0.7 / e, 0.6 / e**0.5, 0.7 + 0.05 * e, e == 2])
    return plan


def _write_index(augment: Path, rng: np.random.Generator, k: int) -> None:
    """An Augment ``index.csv`` with 600 training cases (the train split's characteristics)."""
    with open(augment / "index.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "case_id",
                "patient_id",
                "split",
                "label_index",
                "sex",
                "age_band",
                "manufacturer",
                "modality",
                "group_site",
            ]
        )
        for i in range(600):
            sex = "" if i < 4 else ("F" if rng.random() < 0.9 else "M")
            w.writerow(
                [f"CT{i:05d}", f"PT{i:04d}", "train", i % k, sex, "", "", "", "site-a" if i % 2 else "site-b"]
            )


def _study(cfg: Config, test: SplitPredictions, pos: int, rng: np.random.Generator) -> dict:
    """Study with known ordering: finetune is selected on validation at both fractions; at 10% scratch
    beats it on test (negative transfer), at 100% it beats scratch."""
    strength = {  # (validation AUROC, test signal strength)
        ("linear_probe", 0.1): (0.70, None),
        ("finetune", 0.1): (0.80, 0.3),
        ("scratch", 0.1): (0.75, 2.5),
        ("linear_probe", 1.0): (0.85, None),
        ("finetune", 1.0): (0.90, 2.5),
        ("scratch", 1.0): (0.80, 0.5),
    }
    runs, tested = [], {}
    for (strategy, frac), (val, s) in strength.items():
        runs.append(
            {
                "strategy": strategy,
                "label_fraction": frac,
                "pretrained": strategy != "scratch",
                "train_cases": int(600 * frac),
                "val_auroc": {"value": val, "ci": [val - 0.05, val + 0.05]},
                "reused_main_model": (strategy, frac) == ("finetune", 1.0),
            }
        )
        if s is not None:
            score = s * (test.y == pos) + rng.normal(size=len(test.y))
            logits = np.zeros((len(test.y), 2))
            logits[:, pos] = score
            tested[(strategy, frac)] = SplitPredictions(
                logits=logits, y=test.y, patient=test.patient, case=test.case, groups={}
            )
    return summarise_study(runs, cfg, tested)


def build_report(
    tmp: Path,
    classes: dict[str, str] = BINARY,
    two_per_patient: bool = True,
    seed: int = 0,
    calibration: str = "temperature",
) -> Path:
    """Write report.html / report.pdf / model_card.md of a synthetic run into ``tmp/evaluate/e1``."""
    rng = np.random.default_rng(seed)
    names = list(classes.values())
    k = len(names)
    kind = "binary" if k == 2 else "ordinal"
    cfg = Config.model_validate(
        {
            "name": "synthetic-report",
            "task": {"kind": kind, "classes": classes, "positive_class": "malignant" if k == 2 else None},
            "data": {"source": str(tmp), "labels_csv": str(tmp / "labels.csv")},
            "evaluate": {
                "n_bootstrap": 200,
                "study_label_fractions": [0.1, 1.0],
                "study_strategies": ["linear_probe", "finetune", "scratch"],
            },
            "report": {"title": "Synthetic committee report"},
        }
    )
    plan = _write_plan(tmp, names)
    preds = {
        s: _split(rng, n, k, 1.6, s, two_per_patient and s == "test")
        for s, n in (("val", 160), ("calibration", 120), ("test", 300))
    }
    task = TaskInfo(kind=kind, class_names=names, positive_index=cfg.task.positive_index)
    opts = EvalOptions(calibration=calibration, n_bootstrap=200, min_subgroup=cfg.evaluate.min_subgroup)
    result = evaluate_run(preds, task, opts, seed=0)
    metrics = dict(result.metrics)
    add_val_operating_points(metrics, preds, result.calibrated, task, 0.95)
    test = preds["test"]
    prev = PreviousScores(
        "evaluate",
        "older-run",
        test.case[::-1].copy(),
        test.y[::-1].copy(),
        np.full((len(test.y), k), 1.0 / k) + 0.05 * rng.random((len(test.y), k)),
    )
    raw = np.exp(test.logits) / np.exp(test.logits).sum(1, keepdims=True)
    metrics["comparison"] = compare_models(
        test.y,
        test.case,
        test.patient,
        raw,
        prev,
        names,
        cfg.task.positive_index if kind == "binary" else None,
        n_bootstrap=200,
    )
    if kind == "binary":
        metrics["study"] = _study(cfg, test, cfg.task.positive_index, rng)
    _write_index(plan.augment, rng, k)
    metrics["reporting"] = reporting_items(cfg, preds, result.calibrated, metrics, plan.augment)
    cases = select_cases(test.y, result.calibrated["test"], list(test.case), names, 2)
    imgs = rng.random((len(cases), 1, 24, 24))
    cams = rng.random((len(cases), 24, 24))
    expl = [Explanation(imgs, cams, cases, "Grad-CAM of synthetic cases.")]
    (plan.evaluate / "metrics.json").write_text(json.dumps(metrics))
    render.write_reports(cfg, plan, metrics, preds, result.calibrated, plan.evaluate, explanations=expl)
    return plan.evaluate


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory) -> Path:
    return build_report(tmp_path_factory.mktemp("rep"))


def _text(html: str) -> str:
    return html_mod.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html.split("<body>", 1)[1])))


def test_every_section_is_present(binary_report: Path) -> None:
    html = (binary_report / "report.html").read_text()
    for heading in (
        "Summary",
        "Data and splits",
        "Model and training",
        "Discrimination and calibration on the test split",
        "Operating points (chosen on validation, reported on test)",
        "Conformal prediction sets",
        "Participant flow and sample size",
        "Participant characteristics per split",
        "Reference standard and class imbalance",
        "Subgroups (test split)",
        "Subgroup fairness and calibration differences (test split)",
        "Heterogeneity across sites (test split)",
        "Patient-level metrics (test split)",
        "Error analysis (test split)",
        "Explanations (Grad-CAM)",
        "Scarce labels: label efficiency and strategies",
        "Comparison with the previous model",
        "Reporting checklist",
        "Limitations",
    ):
        assert f"<h2>{heading}" in html, heading
    for fig in (
        "history",
        "roc",
        "reliability",
        "histogram",
        "decision_curve",
        "gradcam",
        "label_efficiency",
        "flow",
    ):
        assert f"id='fig-{fig}'" in html, fig
    text = _text(html)
    assert "unreadable" in text and "no_label" in text  # ingestion problems table
    assert "pretrained worse (negative transfer)" in text and "pretrained better" in text
    assert "Negative transfer: at 10% of the labels" in text
    assert "too small" in text  # the 'M' subgroup
    assert "calibrated (temperature)" in text


def test_operating_points_show_val_and_test_with_cis(binary_report: Path) -> None:
    metrics = json.loads((binary_report / "metrics.json").read_text())
    ops = metrics["evaluation"]["test"]["calibrated"]["operating_points"]
    html = (binary_report / "report.html").read_text()
    for rule, op in ops.items():
        val = op["val"]
        assert val["threshold"] == op["threshold"]
        assert val["sensitivity"]["value"] == pytest.approx(op["val_sensitivity"])
        assert val["sensitivity"]["ci"][0] <= val["sensitivity"]["value"] <= val["sensitivity"]["ci"][1]
        for split in ("val", "test"):
            s = op[split]["sensitivity"]
            assert render.fmt(s) in html, (rule, split)
    rows = re.findall(r"<tr><td>[^<]*</td><td>(val|test)</td>", html)
    assert rows.count("val") == rows.count("test") == len(ops)


def test_conformal_and_subgroups_come_from_metrics(binary_report: Path) -> None:
    metrics = json.loads((binary_report / "metrics.json").read_text())
    text = _text((binary_report / "report.html").read_text())
    for method, d in metrics["conformal"]["methods"].items():
        assert (
            f"{method} {render.fmt(d['qhat'])} {render.fmt(d['test']['coverage'])} {render.fmt(d['test']['mean_set_size'])}"
            in text
        )
        for cname, c in d["test"]["per_class"].items():
            lo, hi = wilson_ci(round(c["coverage"] * c["n"]), c["n"])
            cov = render.fmt({"value": c["coverage"], "ci": [lo, hi]})
            assert f"{method} {cname} {c['n']} {cov} {render.fmt(c['mean_set_size'])}" in text
            if hi < metrics["conformal"]["target_coverage"]:
                assert f"{cname} {c['n']} {cov} {render.fmt(c['mean_set_size'])} under-covered" in text
    for col, groups in metrics["subgroups"].items():
        for g, d in groups.items():
            auc = d["metrics"]["discrimination"]["auroc"]
            assert f"{col} {g} {d['size']['cases']} {d['size']['patients']} {render.fmt(auc)}" in text


def test_comparison_and_patient_level(binary_report: Path) -> None:
    metrics = json.loads((binary_report / "metrics.json").read_text())
    text = _text((binary_report / "report.html").read_text())
    c = metrics["comparison"]
    assert c["n_matched"] == metrics["splits"]["test"]["cases"]
    assert render.fmt(c["delong"]["p_value"]) in text and render.fmt(c["paired_bootstrap"]) in text
    assert "higher than the previous model's" in text  # the previous model is noise
    assert c["verdict"] == "better" and c["primary"] == "paired_bootstrap"  # two cases per patient
    assert "primary test: paired (patient-cluster) bootstrap." in text
    for t in metrics["study"]["transfer"]:  # the report shows the verdicts evaluate reached
        assert f"{render.fmt({'value': t['difference'], 'ci': t['difference_ci']})}" in text
    pl = metrics["patient_level"]
    assert pl["n_patients"] == metrics["splits"]["test"]["patients"] < metrics["splits"]["test"]["cases"]
    assert render.fmt(pl["metrics"]["discrimination"]["auroc"]) in text


def test_html_has_no_external_reference(binary_report: Path) -> None:
    html = (binary_report / "report.html").read_text()
    assert not re.search(r"(?i)\b(https?|ftp)://", html)
    assert not re.search(r"(?i)//[a-z0-9.-]+\.[a-z]{2,}/", html)  # protocol-relative URLs
    srcs = re.findall(r"""(?i)\b(?:src|href|xlink:href|poster|data)\s*=\s*["']?([^"'\s>]+)""", html)
    assert srcs, "expected embedded images"
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [
        s[:40] for s in srcs if not s.startswith("data:")
    ]
    assert not re.search(r"(?i)<(script|link|iframe|object|embed)\b", html)
    assert not re.search(r"(?i)@import|url\((?!data:)", html)


def pdf_text(path: Path, layout: bool = False) -> str:
    """The text of a PDF as ``pdftotext`` extracts it (reading order; ``-layout`` keeps table rows on lines).

    Fails (does not skip) when pdftotext is missing: ``.ci/run`` installs poppler-utils.
    """
    exe = shutil.which("pdftotext")
    assert exe, "pdftotext is required for this test: apt-get install poppler-utils (.ci/run does it)"
    args = [exe, "-enc", "UTF-8"] + (["-layout"] if layout else []) + [str(path), "-"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _in_order(text: str, needles: list[str]) -> None:
    pos = 0
    for n in needles:
        i = text.find(n, pos)
        assert i >= 0, f"{n!r} not found after position {pos} (or out of order)"
        pos = i + len(n)


def test_pdf_carries_the_same_content(binary_report: Path) -> None:
    doc = Doc()
    doc.h("Heading")
    doc.p("A long paragraph " * 30)
    doc.warn("Careful: something to say")
    doc.table(["a very long header"] * 14, [[f"0.{i}12 [0.{i}01, 0.{i}99]" for i in range(14)]] * 3)
    doc.fig("x", _png(), "caption of the figure")
    doc.p("Closing words & <angle brackets>")
    doc.pdf(binary_report / "small.pdf", "T", "sub")
    text = _flat(pdf_text(binary_report / "small.pdf"))
    _in_order(
        text,
        ["T", "sub", "Heading", ("A long paragraph " * 30).strip(), "Careful: something to say"]
        + ["caption of the figure", "Closing words & <angle brackets>"],
    )
    words = text.split()
    for i in range(14):  # wrapped cells still carry every piece, once per row
        for piece in (f"0.{i}12", f"[0.{i}01,", f"0.{i}99]"):
            assert words.count(piece) == 3, piece
    rows = [_flat(ln).strip() for ln in pdf_text(binary_report / "small.pdf", layout=True).splitlines()]
    assert sum(ln.startswith("0.012 0.112 0.212") for ln in rows) == 3  # each row is read left to right


def _png() -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [0, 1])
    return to_png(fig)


def test_real_report_pdf_reads_in_order(binary_report: Path) -> None:
    pdf = binary_report / "report.pdf"
    assert pdf.read_bytes().startswith(b"%PDF")
    text = _flat(pdf_text(pdf))
    html_text = _text((binary_report / "report.html").read_text())
    headings = re.findall(r"<h2>([^<]+)</h2>", (binary_report / "report.html").read_text())
    assert len(headings) == 19
    _in_order(text, ["Synthetic committee report"] + [html_mod.unescape(h) for h in headings])
    sentences = [
        "No patient appears in two splits.",
        "Every figure is given before and after post-hoc calibration (temperature)",
        "Split-conformal sets fitted on the 120 calibration cases",
        "Internal validation only: the 300 test cases (",
    ]
    _in_order(text, sentences)
    assert all(s in html_text for s in sentences)
    # a table read row by row: the test split of the data table
    layout = [_flat(ln).strip() for ln in pdf_text(pdf, layout=True).splitlines()]
    assert "test 300 300 150 150" in layout
    assert re.search(r"Page \d+|page \d+", text)
    pages = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True).stdout
    assert int(re.search(r"Pages:\s+(\d+)", pages).group(1)) >= 5


def test_pdf_text_of_the_real_report_covers_the_html(binary_report: Path, tmp_path) -> None:
    doc = Doc()
    metrics = json.loads((binary_report / "metrics.json").read_text())
    # Re-render only the metrics-driven sections into a fresh Doc and compare its HTML and PDF words.
    conformal_section(doc, metrics)
    comparison_section(doc, metrics)
    study_section(doc, metrics)
    doc.pdf(tmp_path / "r.pdf", "t", "s")
    pdf_chars = pdf_text(tmp_path / "r.pdf").replace(" ", "").replace("\n", "")
    tokens = re.findall(r"[A-Za-z_]{4,}|\d\.\d{3}", _text(doc.html("t", "s")))
    assert len(tokens) > 300
    for token in tokens:
        assert token in pdf_chars, token


def test_html_is_autoescaped_and_strict() -> None:
    doc = Doc()
    doc.h("<script>alert(1)</script>")
    doc.table(["a'b"], [["<b>x</b> & y"]])
    doc.fig("n'ame", _png(), "<i>cap</i>")
    html = doc.html("T <x>", "s & t")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<td>&lt;b&gt;x&lt;/b&gt; &amp; y</td>" in html and "<th>a&#39;b</th>" in html
    assert "id='fig-n&#39;ame'" in html and "&lt;i&gt;cap&lt;/i&gt;" in html
    assert "<title>T &lt;x&gt;</title>" in html and "s &amp; t" in html
    import jinja2

    from pipeline.report.html import environment

    with pytest.raises(jinja2.UndefinedError):
        environment().from_string("{{ missing }}").render()
    assert "<b>" in doc.markdown()  # the model card is Markdown: no HTML escaping


def test_coverage_intervals_come_from_evaluate(binary_report: Path) -> None:
    metrics = json.loads((binary_report / "metrics.json").read_text())
    for d in metrics["conformal"]["methods"].values():
        for c in d["test"]["per_class"].values():
            lo, hi = wilson_ci(round(c["coverage"] * c["n"]), c["n"])
            assert c["coverage_ci"] == pytest.approx([lo, hi])
    # the report shows what metrics hold, even an interval it could not have computed itself
    fake = {
        "alpha": 0.1,
        "target_coverage": 0.9,
        "n_calibration": 50,
        "fitted_on": "x",
        "methods": {
            "lac": {
                "qhat": 0.5,
                "test": {
                    "per_class": {
                        "a": {"n": 10, "coverage": 0.8, "coverage_ci": [0.11, 0.22], "mean_set_size": 1.0}
                    }
                },
            }
        },
    }
    doc = Doc()
    conformal_section(doc, {"conformal": fake})
    assert "lac a 10 0.800 [0.110, 0.220] 1.000 under-covered: CI below 0.90" in _text(doc.html("t", "s"))


def test_report_imports_neither_torch_nor_evaluate() -> None:
    code = (
        "import sys, pipeline.report.render, pipeline.report.nightly\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith('pipeline.evaluate')]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    root = Path(__file__).resolve().parents[1] / "pipeline" / "report"
    for f in root.rglob("*.py"):
        src = f.read_text()
        assert not re.search(r"^\s*(import torch|from torch)", src, re.M), f
        assert "pipeline.evaluate" not in src.replace("``pipeline.evaluate", ""), f
    assert max(len(f.read_text().splitlines()) for f in root.rglob("*.py")) <= 600


def test_raw_probabilities_default_to_the_softmax_of_the_logits(tmp_path) -> None:
    from scipy.special import softmax

    from pipeline.report.sections.inputs import ReportInputs

    logits = np.array([[0.0, 1.0], [2.0, -1.0]])
    sp = SplitPredictions(
        logits=logits, y=np.array([1, 0]), patient=np.array(["a", "b"]), case=np.array(["c", "d"]), groups={}
    )
    plan = _write_plan(tmp_path, ["a", "b"])
    cfg = Config.model_validate(
        {
            "name": "x",
            "task": {"kind": "binary", "classes": BINARY, "positive_class": "malignant"},
            "data": {"source": str(tmp_path), "labels_csv": str(tmp_path / "l.csv")},
        }
    )
    run = ReportInputs.gather(cfg, plan, {}, {"test": sp}, {}, raw={"val": np.full((2, 2), 0.5)})
    np.testing.assert_allclose(run.raw_probs("test"), softmax(logits, axis=1))
    np.testing.assert_allclose(run.raw_probs("val"), 0.5)
    assert run.ingest["cases"] == 1180 and run.train["backbone"] == "efficientnet_lite0"


def test_model_card(binary_report: Path) -> None:
    card = (binary_report / "model_card.md").read_text()
    for needle in (
        "Intended use",
        "Data provenance",
        "Post-hoc calibration",
        "## Operating points",
        "| AUROC |",
        "## Limitations",
        "0123456789ab",
    ):
        assert needle in card, needle


def test_multiclass_report_renders_without_binary_only_sections(tmp_path) -> None:
    out = build_report(tmp_path, classes=MULTI, two_per_patient=False, seed=3)
    html = (out / "report.html").read_text()
    assert "<h2>Operating points" not in html and "<h2>Patient-level" not in html
    assert "<h2>Conformal prediction sets" in html and "macro AUROC" in html
    assert "severe: AUROC" in html  # per-class one-vs-rest rows
    assert "<h2>Comparison with the previous model" in html and "normal" in _text(html)
    assert (out / "report.pdf").stat().st_size > 10_000


def test_report_without_a_calibrator(tmp_path) -> None:
    out = build_report(tmp_path, calibration="none", seed=5)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["evaluation"]["test"]["calibrated"] is None
    html = (out / "report.html").read_text()
    text = _text(html)
    assert (
        "id='fig-reliability'" in html and "No calibrator applied: uncalibrated probabilities only." in text
    )
    assert "Probabilities (no calibrator applied) per true class" in text
    assert "ECE after calibration" not in text and "Test AUROC" in text
    assert "No calibrator applied" in _flat(pdf_text(out / "report.pdf"))
