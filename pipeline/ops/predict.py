"""Scoring new scans with a registered model: calibrated probabilities, conformal sets, OOD flags.

Every registered model gets a small *bundle* in ``<workspace>/ops/models/<id>/``:

* ``calibration.npz``: the model's logits ``(N, K)`` and labels ``(N,)`` on the calibration split it was
  decided on (no identifiers), kept for audit; the calibrator and the conformal threshold used for scoring
  are the ones its Evaluate stage fitted and saved (``evaluate/<digest>/calibrator.json``, loaded with the
  verified model by :class:`pipeline.trained.artefact.TrainedModel`), never refitted;
* ``reference.json``: what the training data looked like (kinds, modalities, manufacturers, spacing range,
  intensity percentile range, number of slices) for out-of-distribution flags, and its label prevalence
  (per class index; per finding for a multilabel model).

:func:`predict_folder` ingests a folder the way the Ingest stage does (``scan_sources`` / ``load_item``),
preprocesses each case with the model's recorded spec, and writes ``predictions.csv`` and
``predictions.json`` keyed by pseudonym (case and patient), plus the private pseudonym -> source file map
under ``<workspace>/private/predict/``. Axis order: volumes ``(X, Y, Z[, C/T])``; network inputs
``(C, H, W)`` / ``(C, D, H, W)``; probabilities ``(N, K)``.

A model trained on several images per case (``data.channels``) scores cases grouped by the same rule: with
``series_description`` channels, the series of the input folder sharing the config's ``data.id_type`` value
(StudyInstanceUID, PatientID, ...) form a case, each channel picks its series and the channels are combined
on the first one's grid as Ingest does (per-case codes ``missing_channel``, ``ambiguous_channel``,
``channel_grid_mismatch``). Channels chosen by labels-CSV path columns (or cases keyed by ``path``) need a
CSV that a folder of scans does not have: such a model is refused (code ``multichannel_predict_unsupported``).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import IngestError, MedtlError
from pipeline.io import write_bytes, write_json, write_text

log = logging.getLogger(__name__)

#: Relative tolerance around the training range before spacing / intensity is flagged.
RANGE_TOLERANCE = 0.1
REFERENCE_MAX_CASES = 500


def bundle_dir(workspace: Path, model_id: int) -> Path:
    return Path(workspace) / "ops" / "models" / str(int(model_id))


def _parse_spacing(text: str) -> list[float]:
    return [float(v) for v in text.split("x")] if text else []


def intensity_percentiles(array: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentiles of the voxel values (the input statistic tracked for OOD and drift)."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99])
    return float(lo), float(hi)


def reference_profile(
    manifest_rows: list[dict[str, str]], workspace: Path, findings: list[str] | None = None
) -> dict[str, Any]:
    """Summarise the training cases: kinds, modalities, manufacturers, spacing and intensity ranges, and the
    label prevalence: the share of each class index, or for a multilabel task (``findings``: the finding
    names in ``task.classes`` order) the share of cases positive for each finding (the manifest's
    ``label_index`` of a multilabel case is only its split stratum)."""
    train = sorted((r for r in manifest_rows if r["split"] == "train"), key=lambda r: r["case_id"])
    sp = [s for s in (_parse_spacing(r["spacing"]) for r in train) if s]
    ndim = min((len(s) for s in sp), default=0)
    spacing = np.array([s[:ndim] for s in sp]) if ndim else np.zeros((0, 0))
    from pipeline.ingest.volume_cache import load_volume

    lows, highs, slices = [], [], []
    for r in train[:REFERENCE_MAX_CASES]:
        try:  # verified; rebuilt from its source when unusable
            arr, _ = load_volume(workspace, r["volume"])
        except IngestError as err:  # cache_lost: the profile is drawn from the other cases
            log.warning("reference profile: case %s left out (%s)", r["case_id"], err.code)
            continue
        lo, hi = intensity_percentiles(arr)
        lows.append(lo)
        highs.append(hi)
        slices.append(int(arr.shape[2]) if arr.ndim >= 3 else 1)
    return {
        "n_train_cases": len(train),
        "kinds": sorted({r["kind"] for r in train}),
        "modalities": sorted({r["modality"] for r in train if r["modality"]}),
        "manufacturers": sorted({r["manufacturer"] for r in train if r["manufacturer"]}),
        "spacing_min": spacing.min(axis=0).tolist() if len(spacing) else None,
        "spacing_max": spacing.max(axis=0).tolist() if len(spacing) else None,
        "intensity_p1_min": float(min(lows)) if lows else None,
        "intensity_p99_max": float(max(highs)) if highs else None,
        "intensity_p1_median": float(np.median(lows)) if lows else None,
        "intensity_p99_median": float(np.median(highs)) if highs else None,
        "slices_min": min(slices) if slices else None,
        "slices_max": max(slices) if slices else None,
        "label_prevalence": (
            _finding_prevalence([r["label"] for r in train], findings)
            if findings
            else _prevalence([r["label_index"] for r in train])
        ),
    }


def _prevalence(labels: list[Any]) -> dict[str, float]:
    if not labels:
        return {}
    vals, counts = np.unique(np.asarray(labels).astype(str), return_counts=True)
    return {str(v): float(c / counts.sum()) for v, c in zip(vals, counts, strict=True)}


def _finding_prevalence(labels: list[str], findings: list[str]) -> dict[str, float]:
    """Finding name -> share of the cases positive for it, from multilabel labels ``"0;1"``."""
    from pipeline.ingest.labels import parse_multilabel

    if not labels:
        return {}
    v = np.array([parse_multilabel(x, len(findings)) for x in labels], dtype=np.float64)
    return {n: float(v[:, j].mean()) for j, n in enumerate(findings)}


def write_bundle(
    workspace: Path,
    model_id: int,
    cal_logits: np.ndarray | None,
    cal_y: np.ndarray | None,
    calibrator: dict[str, Any],
    reference: dict[str, Any],
) -> Path:
    """Write a model's bundle (see module doc); returns its folder."""
    out = bundle_dir(workspace, model_id)
    buf = io.BytesIO()
    z = np.zeros((0, 0)) if cal_logits is None else np.asarray(cal_logits, np.float64)
    yy = np.zeros((0,), np.int64) if cal_y is None else np.asarray(cal_y, np.int64)
    np.savez(buf, logits=z, y=yy)
    write_bytes(out / "calibration.npz", buf.getvalue())
    write_json(out / "calibrator.json", calibrator)
    write_json(out / "reference.json", reference)
    return out


class ModelScorer:
    """A registered model ready to score: the verified trained model with the calibrator and conformal
    threshold its Evaluate stage fitted (nothing is refitted here), its preprocessing spec and the
    training data's reference profile.

    Args:
        workspace: The workspace.
        model: The registry row of the model.
        cfg: The config (device).
    """

    def __init__(self, workspace: Path, model: dict[str, Any], cfg: Config) -> None:
        from pipeline.trained.artefact import TrainedModel

        self.workspace = Path(workspace)
        self.model = model
        bdir = bundle_dir(self.workspace, model["id"])
        if not (bdir / "reference.json").is_file():
            raise MedtlError(
                f"model {model['id']}: bundle {bdir} is missing; it is written when the model is registered",
                code="bundle_missing",
            )
        trained = TrainedModel.load(
            self.workspace / "finetune" / model["finetune"],
            self.workspace / "evaluate" / model["evaluate"],
            expected=model.get("files") or None,
        )
        spec = trained.preprocessing or json.loads(
            (self.workspace / "augment" / model["augment"] / "transform_spec.json").read_text()
        )["deterministic"]
        self._setup(trained, cfg, spec, json.loads((bdir / "reference.json").read_text()))

    @classmethod
    def from_folders(
        cls, workspace: Path, finetune_dir: Path, evaluate_dir: Path, reference: dict[str, Any], cfg: Config
    ) -> ModelScorer:
        """A model not registered yet: this run's FineTune folder and the Evaluate folder being written
        (its ``calibrator.json``), with the training data's reference profile (:func:`reference_profile`)."""
        from pipeline.trained.artefact import TrainedModel

        self = cls.__new__(cls)
        self.workspace = Path(workspace)
        self.model = {"id": None}
        trained = TrainedModel.load(Path(finetune_dir), Path(evaluate_dir))
        if trained.preprocessing is None:
            raise MedtlError(f"{Path(finetune_dir).name}: no preprocessing spec recorded", code="model_schema")
        self._setup(trained, cfg, trained.preprocessing, reference)
        return self

    def _setup(self, trained: Any, cfg: Config, spec: dict[str, Any], reference: dict[str, Any]) -> None:
        from pipeline.trained.scorer import Scorer

        self.scorer = Scorer(trained, cfg.train.device)
        self.device = self.scorer.device
        self.info = trained.info
        self.spec = spec
        self.reference = reference
        doc = trained.calibrator_info or {}
        self.calibrator = trained.calibrator
        self.calibrator_info = {"method": doc.get("method", "none"), "fitted_on": doc.get("fitted_on")}
        conf = doc.get("conformal")
        self.alpha = conf["alpha"] if conf else cfg.evaluate.conformal_alpha
        self.conformal = _lac_from_saved(conf, len(trained.class_names)) if conf else None

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Raw and calibrated probabilities ``(N, K)`` and LAC conformal sets ``(N, K)`` for inputs ``x``."""
        s = self.scorer.score(x)
        sets = (
            self.conformal.predict_sets(s.raw) if self.conformal is not None else np.ones_like(s.raw, dtype=bool)
        )
        return {"logits": s.logits, "raw": s.raw, "calibrated": s.calibrated, "sets": sets}


def _lac_from_saved(conf: dict[str, Any], n_classes: int):
    """The LAC conformal predictor with the thresholds Evaluate fitted (``calibrator.json``).

    Class-conditional (Mondrian) sets when every class had enough calibration cases for a finite
    threshold: each class is then covered at ``1 - alpha``; else the marginal set.
    """
    from pipeline.evaluate.conformal import SplitConformal

    per_class = conf.get("class_qhat")
    mondrian = bool(per_class) and len(per_class) == n_classes and all(q is not None for q in per_class)
    cp = SplitConformal(conf["alpha"], "lac", class_conditional=mondrian)
    q = conf.get("qhat")
    cp.qhat_ = float("inf") if q is None else float(q)
    if mondrian:
        cp.class_qhat_ = np.array(per_class, dtype=np.float64)
        cp.qhat_ = float(cp.class_qhat_.max())
    cp.n_calibration_ = int(conf.get("n_calibration", 0))
    cp.n_classes_ = n_classes
    return cp


def ood_flags(meta: dict[str, Any], kind: str, array: np.ndarray, ref: dict[str, Any]) -> list[str]:
    """Reasons why an input is unlike the training data (empty when it looks familiar).

    The reasons name what differs, never the new case's tag values (shared outputs carry no value copied
    from an input). Modality and manufacturer are compared with the training values the manifest kept:
    when training pooled rare values as "other", an unseen value may be one of them and is not flagged.
    """
    flags = []
    if ref.get("kinds") and kind not in ref["kinds"]:
        flags.append(f"file kind not seen in training ({', '.join(ref['kinds'])})")
    for field, label in (("modality", "modalities"), ("manufacturer", "manufacturers")):
        seen = ref.get(label) or []
        value = meta.get(field) or ""
        if seen and value not in seen and "other" not in seen:
            flags.append(f"{field} not seen in training")
    spacing = meta.get("spacing") or []
    if ref.get("spacing_min") and spacing:
        for axis, (s, lo, hi) in enumerate(
            zip(spacing, ref["spacing_min"], ref["spacing_max"], strict=False)
        ):
            if s < lo * (1 - RANGE_TOLERANCE) or s > hi * (1 + RANGE_TOLERANCE):
                flags.append(f"spacing {s:.4g} mm on axis {axis} outside training range [{lo:.4g}, {hi:.4g}]")
    if ref.get("intensity_p1_min") is not None:
        lo, hi = intensity_percentiles(array)
        rlo, rhi = ref["intensity_p1_min"], ref["intensity_p99_max"]
        tol = RANGE_TOLERANCE * max(rhi - rlo, 1e-6)
        if lo < rlo - tol or hi > rhi + tol:
            flags.append(
                f"intensity percentiles [{lo:.4g}, {hi:.4g}] outside training range [{rlo:.4g}, {rhi:.4g}]"
            )
    return flags


def require_folder(input_dir: Path) -> Path:
    """``input_dir`` as a Path, refused (before any model is loaded or file scanned) when it is not a folder."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise MedtlError(f"predict --input: folder {input_dir} does not exist; expected a folder of scans")
    return input_dir


def scan_cases(
    cfg: Config, input_dir: Path, key: bytes, channels: bool
) -> tuple[list[tuple[str, list[Any]]], list[dict[str, Any]]]:
    """The cases of a folder of scans (one per series/file, or per case of ``data.channels`` when
    ``channels``) and the problems met finding them (files refused at scan, cases without their channels),
    by pseudonym and code."""
    from pipeline.ingest.channels import case_units
    from pipeline.ingest.deid import pseudonym
    from pipeline.ingest.sources import scan_sources

    items, rejected = scan_sources(Path(input_dir), kinds=tuple(cfg.data.kinds))
    problems = [{"file": pseudonym(r.path, key, prefix="F"), "code": r.code} for r in rejected]
    units = case_units(cfg.data, items, key, problems) if channels else [(i.key, [i]) for i in items]
    return units, problems


def predict_folder(
    cfg: Config,
    model: dict[str, Any],
    input_dir: Path,
    out_dir: Path,
    scorer: ModelScorer | None = None,
    cases: tuple[list[tuple[str, list[Any]]], list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Score every readable case under ``input_dir`` with ``model``; write CSV and JSON into ``out_dir``.

    ``scorer``: an already loaded model (default: the registered ``model``'s, :class:`ModelScorer`).
    ``cases``: the folder's :func:`scan_cases`, when the caller has scanned it already.

    Returns:
        The summary (also the ``summary`` block of ``predictions.json``), including drift figures.
    """
    from pipeline.augment.preprocess import preprocess
    from pipeline.ingest.channels import load_case
    from pipeline.ingest.decode_jobs import check_values, unexpected_failure
    from pipeline.ingest.deid import ensure_private_dir, load_or_create_key, pseudonym
    from pipeline.ingest.sources import LoadOptions
    from pipeline.trained.artefact import preprocess_spec

    ws = Path(cfg.runtime.workspace)
    input_dir = require_folder(input_dir)
    private = ensure_private_dir(ws / "private")
    key = load_or_create_key(private, cfg.deid.key_env)
    scorer = scorer or ModelScorer(ws, model, cfg)
    spec = preprocess_spec(scorer.spec)
    _check_channels(cfg, spec)
    units, found = cases if cases is not None else scan_cases(cfg, input_dir, key, bool(spec.channel_names))
    options = LoadOptions(tilt=cfg.ingest.tilt, uneven_spacing=cfg.ingest.uneven_spacing)
    cases, xs, private_map, problems = [], [], [], list(found)
    for unit_key, members in units:
        item = members[0]
        case_id = pseudonym(unit_key, key, prefix="C")
        patient = pseudonym((item.ids or {}).get("PatientID") or unit_key, key, prefix="P")
        private_map.append({"case_id": case_id, "files": ";".join(f for m in members for f in m.files)})
        try:
            vol = load_case(cfg.data, members, options, case_id)
            # the ingest check on the stored values (before windowing): non_finite, constant, empty are
            # per-case rejections, the others are scored
            check_values(vol.array, f"case {case_id}")
            x = preprocess(vol.array, vol.meta.get("axis4"), spec, vol.affine)
        except IngestError as err:
            problems.append({"case_id": case_id, "code": err.code})
            continue
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - a reader failure on one scan: reported, the rest scored
            problems.append({"case_id": case_id, "code": unexpected_failure(item, err).code})
            continue
        lo, hi = intensity_percentiles(vol.array)
        cases.append(
            {
                "case_id": case_id,
                "patient_id": patient,
                "kind": item.kind,
                "modality": vol.meta.get("modality") or "",
                "manufacturer": vol.meta.get("manufacturer") or "",
                "intensity_p1": lo,
                "intensity_p99": hi,
                "ood": ood_flags(vol.meta, item.kind, vol.array, scorer.reference),
            }
        )
        xs.append(x)
    names = scorer.info["class_names"]
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    _write_private_map(private / "predict" / f"{stamp}.csv", private_map)
    if xs:
        res = scorer.score(np.stack(xs).astype(np.float32))
        for i, c in enumerate(cases):
            c["probabilities"] = {n: float(res["calibrated"][i, k]) for k, n in enumerate(names)}
            c["probabilities_uncalibrated"] = {n: float(res["raw"][i, k]) for k, n in enumerate(names)}
            if scorer.info.get("task") == "multilabel":  # findings co-occur: no single class or set
                c["predicted_class"], c["conformal_set"] = "", []
                continue
            c["predicted_class"] = names[int(np.argmax(res["calibrated"][i]))]
            c["conformal_set"] = [n for k, n in enumerate(names) if res["sets"][i, k]]
    summary = drift_figures(cases, names, scorer)
    summary.update(
        model_id=model["id"],
        scored=len(cases),
        problems=problems,
        conformal_alpha=scorer.alpha,
        conformal_sets=(
            "none"
            if scorer.conformal is None
            else "class-conditional (Mondrian) LAC"
            if scorer.conformal.class_conditional
            else "marginal LAC"
        ),
        calibrator=scorer.calibrator_info.get("method"),
        created=stamp,
    )
    _write_outputs(Path(out_dir), cases, names, summary)
    return summary


def _check_channels(cfg: Config, spec: Any) -> None:
    """A multi-channel model scores only cases the config's ``data.channels`` can group (module doc)."""
    names = list(spec.channel_names)
    if not names:
        return
    configured = [c.name for c in cfg.data.channels]
    if configured != names:
        raise MedtlError(
            f"predict: the model takes the named channels {names} (data.channels at training), but this "
            f"config's data.channels names {configured}; expected the same channels in the same order",
            code="channel_config_mismatch",
        )
    if cfg.data.channels[0].column is not None or cfg.data.id_type == "path":
        raise MedtlError(
            f"predict: the model takes the channels {names}, chosen by labels-CSV path columns (or cases "
            "keyed by path), which a folder of scans does not carry; score such cases by adding them as "
            "unlabelled rows of the labels CSV and running `medtl run`, or train with series_description "
            "channels (DICOM)",
            code="multichannel_predict_unsupported",
        )


def drift_figures(cases: list[dict[str, Any]], names: list[str], scorer: ModelScorer) -> dict[str, Any]:
    """Aggregates tracked across nights: predicted prevalence, input statistics, OOD rate."""
    out: dict[str, Any] = {"n": len(cases)}
    if not cases:
        return out
    probs = np.array([[c["probabilities"][n] for n in names] for c in cases])
    out["mean_probability"] = {n: float(probs[:, k].mean()) for k, n in enumerate(names)}
    if scorer.info.get("task") == "multilabel":  # each finding predicted present at probability >= 0.5
        out["predicted_prevalence"] = {n: float(np.mean(probs[:, k] >= 0.5)) for k, n in enumerate(names)}
    else:
        pred = probs.argmax(axis=1)
        out["predicted_prevalence"] = {n: float(np.mean(pred == k)) for k, n in enumerate(names)}
    out["intensity_p1_median"] = float(np.median([c["intensity_p1"] for c in cases]))
    out["intensity_p99_median"] = float(np.median([c["intensity_p99"] for c in cases]))
    out["ood_rate"] = float(np.mean([bool(c["ood"]) for c in cases]))
    out["reference_intensity_p99_median"] = scorer.reference.get("intensity_p99_median")
    return out


def _write_private_map(path: Path, rows: list[dict[str, str]]) -> None:
    from pipeline.ingest.deid import ensure_private_dir

    ensure_private_dir(path.parent)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["case_id", "files"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(path, buf.getvalue(), mode=0o600)


def _write_outputs(
    out_dir: Path, cases: list[dict[str, Any]], names: list[str], summary: dict[str, Any]
) -> None:
    buf = io.StringIO()
    cols = (
        ["case_id", "patient_id", "predicted_class"]
        + [f"p_{n}" for n in names]
        + ["conformal_set", "ood_flags"]
    )
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for c in cases:
        w.writerow(
            [c["case_id"], c["patient_id"], c.get("predicted_class", "")]
            + [f"{c['probabilities'][n]:.6f}" for n in names]
            + ["|".join(c.get("conformal_set", [])), "; ".join(c["ood"])]
        )
    write_text(out_dir / "predictions.csv", buf.getvalue())
    write_json(
        out_dir / "predictions.json",
        {
            "schema_version": 1,
            "summary": summary,
            "cases": {c.pop("case_id"): c for c in [dict(c) for c in cases]},
        },
    )
