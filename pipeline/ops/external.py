"""External validation: a registered model measured on a second labelled source (another site, scanner or
period), beside its internal test set (TRIPOD+AI item 12/23 "external validation"; CLAIM 2024 items 30 and
33, robustness and testing on external data).

``medtl validate CONFIG --input DIR --labels CSV [--model ID] [--output DIR]``

1. The labels CSV is read with Ingest's own reader and the config's columns (``data.id_column``,
   ``id_type``, ``label_column``, ``patient_column``); rows are matched to the scanned cases exactly as
   Ingest matches them (:func:`pipeline.ingest.stage._case_refs`).
2. Every readable case is scored by :func:`pipeline.ops.predict.predict_folder` (the model's own saved
   calibrator; nothing is refitted on the external data, which would be peeking at it), with the same
   per-case rejections and out-of-distribution flags as ``medtl predict``.
3. Discrimination and calibration with the report's intervals (the same blocks Evaluate uses, patient
   clusters when patients have several cases), and, for binary tasks, the difference between the external
   and the internal test AUROC with a CI from the two independent samples' (Obuchowski) variances.

Outputs (``WORKSPACE/validate/<time>/`` by default): ``external_validation.json`` and ``.html`` (counts,
codes and metrics only) and ``scored/predictions.csv`` (pseudonyms). Which file was which case stays in
the workspace's private folder, as for ``medtl predict``.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import norm

from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import write_json, write_text

SCHEMA_VERSION = 1
log = logging.getLogger(__name__)


def _internal_test(workspace: Path, model: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """The model's own test split from its Evaluate stage: labels, calibrated probabilities, patients."""
    return _test_split(workspace / "evaluate" / str(model.get("evaluate")) / "predictions.csv", names)


def _test_split(f: Path, names: list[str]) -> dict[str, Any] | None:
    """The test rows of an Evaluate ``predictions.csv``: labels, calibrated probabilities, patients."""
    if not f.is_file():
        return None
    with open(f, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("split") == "test" and r.get("label_index", "") != ""]
    if not rows:
        return None
    cols = [f"p_cal_{n}" if f"p_cal_{n}" in rows[0] else f"p_raw_{n}" for n in names]
    return {
        "y": np.array([int(r["label_index"]) for r in rows]),
        "probs": np.array([[float(r[c]) for c in cols] for r in rows]),
        "patient": np.array([r.get("patient_id") or r["case_id"] for r in rows]),
    }


def _auroc_difference(
    ext: dict[str, Any], internal: dict[str, Any], pos: int, level: float
) -> dict[str, Any]:
    """External minus internal test AUROC; the samples are independent, so the variances add."""
    from pipeline.evaluate.delong import obuchowski_variance

    a_e, v_e = obuchowski_variance(ext["y"] == pos, ext["probs"][:, pos], ext["patient"])
    a_i, v_i = obuchowski_variance(internal["y"] == pos, internal["probs"][:, pos], internal["patient"])
    d, se = a_e - a_i, float(np.sqrt(v_e + v_i))
    z = float(norm.ppf(0.5 + level / 2.0))
    lo, hi = d - z * se, d + z * se
    verdict = (
        "lower externally" if hi < 0 else "higher externally" if lo > 0 else "no evidence of a difference"
    )
    return {
        "external": a_e,
        "internal": a_i,
        "value": d,
        "ci": [lo, hi],
        "ci_method": "independent_samples_obuchowski",
        "verdict": verdict,
    }


def validate_external(
    cfg: Config,
    model: dict[str, Any],
    input_dir: Path,
    labels_csv: Path,
    out_dir: Path,
    scorer: Any = None,
    internal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score ``input_dir`` with ``model`` and measure it against ``labels_csv`` (see the module doc).

    ``scorer`` and ``internal`` serve Evaluate (``evaluate.external``), whose model is not registered yet:
    the loaded :class:`pipeline.ops.predict.ModelScorer` and the internal test split (``y``, ``probs``,
    ``patient``); by default both come from the registered ``model``.

    Returns:
        The JSON document also written to ``out_dir / "external_validation.json"``.
    """
    from pipeline.evaluate.calibration_metrics import calibration_block
    from pipeline.evaluate.discrimination import discrimination_block
    from pipeline.ingest.deid import ensure_private_dir, load_or_create_key, pseudonym
    from pipeline.ingest.labels import read_labels
    from pipeline.ingest.stage import _case_refs
    from pipeline.ops.predict import predict_folder, require_folder, scan_cases
    from pipeline.stats.bootstrap import Bootstrap

    task = cfg.task
    if task.multilabel:
        raise MedtlError(
            "validate: multilabel models are not supported yet; score the source with `medtl predict` and "
            "compare per finding",
            code="multilabel_validate_unsupported",
        )
    input_dir, labels_csv, out_dir = Path(input_dir), Path(labels_csv), Path(out_dir)
    if not labels_csv.is_file():
        raise MedtlError(f"validate --labels: file {labels_csv} does not exist; expected a labels CSV")
    data = cfg.data.model_copy(update={"source": input_dir, "labels_csv": labels_csv, "split_column": None})
    rows, label_problems = read_labels(data, task)
    ws = Path(cfg.runtime.workspace)
    key = load_or_create_key(ensure_private_dir(ws / "private"), cfg.deid.key_env)
    # the folder is scanned once: the same cases are scored and matched to their label rows
    found = scan_cases(cfg, require_folder(input_dir), key, bool(cfg.data.channels))
    summary = predict_folder(cfg, model, input_dir, out_dir / "scored", scorer=scorer, cases=found)
    scored = json.loads((out_dir / "scored" / "predictions.json").read_text())["cases"]
    units = found[0]
    values = list(task.label_values)
    names = list(task.class_names)
    y, raw, cal, patients, used_refs = [], [], [], [], set()
    counts = {"scored": len(scored), "labelled": 0, "unlabelled": 0, "no_label_row": 0}
    for unit_key, members in units:
        cid = pseudonym(unit_key, key, prefix="C")
        if cid not in scored:
            continue  # a per-case rejection of predict (counted in its problems)
        refs = [r for m in members for r in _case_refs(m, input_dir, data.id_type)]
        row = next((rows[r] for r in refs if r in rows), None)
        if row is None:
            counts["no_label_row"] += 1
            continue
        used_refs.update(r for r in refs if r in rows)
        if not row.label:
            counts["unlabelled"] += 1
            continue
        case = scored[cid]
        y.append(values.index(row.label))
        raw.append([case["probabilities_uncalibrated"][n] for n in names])
        cal.append([case["probabilities"][n] for n in names])
        patients.append(pseudonym(row.patient, key, prefix="P") if row.patient else case["patient_id"])
        counts["labelled"] += 1
    counts["label_rows_without_case"] = sum(1 for r in rows if r not in used_refs)

    level = cfg.evaluate.ci_level
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model_id": model["id"],
        "task": {"kind": task.kind, "classes": names},
        "counts": counts,
        "problems": {
            "labels_csv": [{"row": p.row, "code": p.code} for p in label_problems],
            "scans": summary.get("problems", []),
        },
        "calibrator": summary.get("calibrator"),
        "ood_rate": summary.get("ood_rate"),
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
    }
    yy = np.asarray(y, dtype=np.int64)
    if len(set(y)) < 2:
        doc["error"] = (
            f"{counts['labelled']} labelled case(s) with {len(set(y))} class(es): discrimination needs both "
            "classes (binary) or at least two classes"
        )
    else:
        pos = task.positive_index
        pts = np.asarray(patients)
        bs = Bootstrap(
            len(yy),
            cfg.evaluate.n_bootstrap,
            seed=cfg.train.seed,
            clusters=pts,
            ci_level=level,
            strata=yy if task.kind == "binary" else None,
        )
        doc["ci_resampling"] = "patient_cluster" if bs.clustered else "case"
        doc["prevalence"] = np.bincount(yy, minlength=len(names)).astype(int).tolist()
        for variant, probs in (("uncalibrated", np.asarray(raw)), ("calibrated", np.asarray(cal))):
            doc[variant] = {
                "discrimination": discrimination_block(probs, yy, task.kind, names, pos, bs),
                "calibration": calibration_block(probs, yy, task.kind, pos, bs, cfg.evaluate.ece_bins),
            }
        internal = internal if internal is not None else _internal_test(ws, model, names)
        if task.kind == "binary" and internal is not None and len(set(internal["y"].tolist())) == 2:
            ext = {"y": yy, "probs": np.asarray(cal), "patient": pts}
            doc["auroc_difference"] = _auroc_difference(ext, internal, pos, level)
    write_json(out_dir / "external_validation.json", doc)
    write_text(out_dir / "external_validation.html", _html(doc, level))
    return doc


def evaluate_external_sources(cfg: Config, plan: Any, evaluate_dir: Path) -> list[dict[str, Any]]:
    """``evaluate.external``: each second test source scored with this run's model and the calibrator its
    Evaluate just fitted (``evaluate_dir`` holds ``calibrator.json`` and ``predictions.csv``), nothing
    refitted. Writes ``evaluate_dir/external/<name>/`` (JSON, HTML, pseudonymous predictions); returns the
    entries of ``metrics["external"]`` (name, counts, problem codes counted, metrics, AUROC difference).
    """
    from collections import Counter

    from pipeline.ingest.stage import read_manifest
    from pipeline.ops.predict import ModelScorer, reference_profile

    ws = Path(cfg.runtime.workspace)
    reference = reference_profile(read_manifest(Path(plan.ingest)), ws)
    scorer = ModelScorer.from_folders(ws, Path(plan.finetune), Path(evaluate_dir), reference, cfg)
    internal = _test_split(Path(evaluate_dir) / "predictions.csv", list(cfg.task.class_names))
    out = []
    for src in cfg.evaluate.external:
        try:
            doc = validate_external(
                cfg,
                {"id": None},
                src.source,
                src.labels_csv,
                Path(evaluate_dir) / "external" / src.name,
                scorer=scorer,
                internal=internal,
            )
        except MedtlError as err:  # this source cannot be scored (e.g. CSV-column channels): the run goes on
            log.warning("Evaluate: external source %s not scored (%s)", src.name, err.code)
            out.append({"name": src.name, "counts": {}, "error": f"not scored (code {err.code})"})
            continue
        entry = {
            k: doc[k]
            for k in ("counts", "ci_resampling", "prevalence", "auroc_difference", "error")
            if k in doc
        }
        entry["name"] = src.name
        entry["problem_codes"] = dict(
            Counter(p["code"] for p in doc["problems"]["scans"] + doc["problems"]["labels_csv"])
        )
        entry["ood_rate"] = doc.get("ood_rate")
        if "calibrated" in doc:
            entry["metrics"] = doc["calibrated"]
            entry["metrics_uncalibrated"] = doc["uncalibrated"]
        log.info(
            "Evaluate: external source %s: %d labelled case(s) of %d scored",
            src.name,
            doc["counts"]["labelled"],
            doc["counts"]["scored"],
        )
        out.append(entry)
    return out


def _html(doc: dict[str, Any], level: float) -> str:
    """A one-page report of the external validation, every sentence from ``doc``."""
    from pipeline.report.document import Doc, fmt

    d = Doc()
    c = doc["counts"]
    d.h("External validation")
    who = "This run's model" if doc["model_id"] is None else f"Model {doc['model_id']}"
    d.p(
        f"{who} ({doc['task']['kind']}, classes {', '.join(doc['task']['classes'])}) scored "
        f"{c['scored']} case(s) of the external source with its own calibrator ({doc.get('calibrator')}; "
        f"nothing was refitted on these data). {c['labelled']} had a label, {c['unlabelled']} an empty label, "
        f"{c['no_label_row']} no row in the labels CSV; {c['label_rows_without_case']} label row(s) named no "
        f"scored case; {len(doc['problems']['scans'])} scan(s) could not be scored and "
        f"{len(doc['problems']['labels_csv'])} CSV row(s) were refused (codes in the JSON)."
    )
    if doc.get("error"):
        d.warn(doc["error"])
        return d.html("External validation", f"model {doc['model_id']}")
    d.p(
        f"Intervals are {100 * level:.4g}% confidence intervals, resampling "
        f"{'patients' if doc.get('ci_resampling') == 'patient_cluster' else 'cases'}."
    )
    rows = []
    for variant in ("uncalibrated", "calibrated"):
        disc, calib = doc[variant]["discrimination"], doc[variant]["calibration"]
        auroc = disc.get("auroc") or disc.get("macro_auroc")
        rows.append(
            [
                variant,
                fmt(auroc),
                fmt(disc.get("accuracy")),
                fmt(calib.get("brier")),
                fmt(calib.get("ece")),
                fmt(calib.get("calibration_slope")),
            ]
        )
    d.table(["probabilities", "AUROC", "accuracy", "Brier", "ECE", "calibration slope"], rows)
    diff = doc.get("auroc_difference")
    if diff:
        d.p(
            f"AUROC external {fmt(diff['external'])} vs internal test {fmt(diff['internal'])}: difference "
            f"{fmt(diff)} ({diff['verdict']})."
        )
    return d.html("External validation", f"model {doc['model_id']}")
