"""One call that evaluates a fine-tuned model's predictions: calibration, metrics with CIs, operating
points, decision curve, conformal sets, subgroups and patient-level metrics.

``evaluate_run`` returns an ``EvalResult`` whose ``metrics`` dict is the content of ``metrics.json``; its
schema (``"schema_version": 1``) is documented key by key in ``docs/metrics_schema.md``.

Splits (all optional except "test"):
    * ``"calibration"``: fits the calibrator and the conformal quantile (absent -> no calibration and no
      conformal sets, recorded with a warning).
    * ``"val"``: chooses the operating-point thresholds; also evaluated.
    * ``"test"``: the held-out split every headline number comes from.

Conformal sets are fitted on the *uncalibrated* softmax probabilities of the calibration split: the
calibrator is fitted on the same cases, and a score function fitted on the conformal calibration data
would break the exchangeability the coverage guarantee rests on. Softmax scores from a model that never
saw the calibration split keep the guarantee exact.

Axis order: logits (N, K) (cases, classes); labels, patients, cases and group columns (N,).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy.special import softmax

from pipeline.evaluate.calibrate import fit_calibrator
from pipeline.evaluate.conformal import SplitConformal, coverage_report, min_calibration_size
from pipeline.evaluate.metrics import calibration_block, discrimination_block, roc_points
from pipeline.evaluate.operating_points import decision_curve, operating_points, parse_rule
from pipeline.stats.bootstrap import Bootstrap
from pipeline.trained.calibration import (
    CALIBRATOR_NAMES,
    calibration_warnings,
    check_logits_labels,
)

__all__ = ["SCHEMA_VERSION", "EvalOptions", "EvalResult", "SplitPredictions", "TaskInfo", "evaluate_run"]

SCHEMA_VERSION = 1
TASK_KINDS = ("binary", "multiclass", "ordinal")
SPLIT_NAMES = ("val", "calibration", "test")
#: (method, randomized, class-conditional) of the conformal sets reported; key ``lac_mondrian`` for the last.
#: Only sets whose coverage keeps its promise (between 1 - alpha and 1 - alpha + 1/(n+1)) are reported:
#: non-randomised APS includes the class that crosses the threshold whole, so it over-covers (0.976-0.998
#: at a nominal 0.90 in ``bench/coverage.py``, binary tasks) and a "90% set" would mislead a reader.
CONFORMAL_METHODS = (("lac", False, False), ("aps", True, False), ("lac", False, True))


@dataclass(frozen=True)
class SplitPredictions:
    """Model outputs and labels of one split.

    Args:
        logits: Uncalibrated logits, shape (N, K) (cases, classes); binary models have K = 2.
        y: Integer labels in [0, K), shape (N,).
        patient: Patient pseudonym per case, shape (N,) (never a raw identifier).
        case: Case id per row, shape (N,).
        groups: Subgroup columns, name -> (N,) array of group values (e.g. "site", "sex").
    """

    logits: np.ndarray
    y: np.ndarray
    patient: np.ndarray
    case: np.ndarray
    groups: dict[str, np.ndarray] = field(default_factory=dict)

    def validate(self, name: str, n_classes: int) -> None:
        """Check shapes and values; raise ValueError naming the split and the field."""
        try:
            check_logits_labels(self.logits, self.y, name=f"{name}.logits", n_classes=n_classes)
        except ValueError as err:
            raise ValueError(f"split {name!r}: {err}") from err
        n = np.shape(self.logits)[0]
        for fname in ("patient", "case"):
            arr = np.asarray(getattr(self, fname))
            if arr.shape != (n,):
                raise ValueError(f"split {name!r}: {fname}: expected shape ({n},), got {arr.shape}")
        for gname, arr in self.groups.items():
            if np.shape(arr) != (n,):
                raise ValueError(
                    f"split {name!r}: groups[{gname!r}]: expected shape ({n},), got {np.shape(arr)}"
                )


@dataclass(frozen=True)
class TaskInfo:
    """What is being predicted.

    Args:
        kind: "binary", "multiclass" or "ordinal".
        class_names: One name per logit column.
        positive_index: Binary tasks: the column of the positive class (may be 0, e.g. BreastMNIST
            malignant = 0). Ignored otherwise.
    """

    kind: str
    class_names: list[str]
    positive_index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task.kind: got {self.kind!r}, expected one of {', '.join(TASK_KINDS)}")
        if len(self.class_names) < 2:
            raise ValueError(f"task.class_names: expected at least 2 names, got {self.class_names!r}")
        if self.kind == "binary":
            if len(self.class_names) != 2:
                raise ValueError(f"task.class_names: a binary task has 2 classes, got {self.class_names!r}")
            if self.positive_index not in (0, 1):
                raise ValueError(
                    f"task.positive_index: expected 0 or 1 for a binary task, got {self.positive_index!r}"
                )


@dataclass(frozen=True)
class EvalOptions:
    """Evaluation settings (the ``evaluate`` config section).

    Args:
        calibration: Calibrator name ("none", "temperature", "vector", "platt", "isotonic", "auto").
        n_bootstrap: Bootstrap resamples per CI.
        ci_level: Confidence level of every interval.
        ece_bins: Bins of ECE and reliability diagrams.
        conformal_alpha: Miscoverage of the conformal sets (None disables them).
        operating_points: Rules ("youden", "sensXX", "specXX"), binary tasks only.
        min_subgroup: Subgroups with fewer cases are flagged "too_small".
    """

    calibration: str = "temperature"
    n_bootstrap: int = 2000
    ci_level: float = 0.95
    ece_bins: int = 15
    conformal_alpha: float | None = 0.1
    operating_points: tuple[str, ...] = ("youden", "sens90", "sens95", "spec90")
    min_subgroup: int = 30

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATOR_NAMES:
            raise ValueError(
                f"options.calibration: got {self.calibration!r}, "
                f"expected one of {', '.join(CALIBRATOR_NAMES)}"
            )
        if int(self.n_bootstrap) < 100:
            raise ValueError(f"options.n_bootstrap: expected >= 100 resamples, got {self.n_bootstrap!r}")
        if not 0.5 <= float(self.ci_level) < 1.0:
            raise ValueError(f"options.ci_level: expected a level in [0.5, 1), got {self.ci_level!r}")
        if int(self.ece_bins) < 2:
            raise ValueError(f"options.ece_bins: expected >= 2, got {self.ece_bins!r}")
        if self.conformal_alpha is not None and not 0.0 < float(self.conformal_alpha) < 1.0:
            raise ValueError(
                f"options.conformal_alpha: expected a value in (0, 1) or None, got {self.conformal_alpha!r}"
            )
        for rule in self.operating_points:
            parse_rule(rule)
        if int(self.min_subgroup) < 1:
            raise ValueError(f"options.min_subgroup: expected >= 1, got {self.min_subgroup!r}")


@dataclass
class EvalResult:
    """Output of ``evaluate_run``.

    Attributes:
        metrics: JSON-able metrics dict (metrics.json content).
        calibrated: Split name -> calibrated probabilities (N, K) (softmax when no calibration applied).
        calibrator: The fitted calibrator, or None when no calibration was applied.
    """

    metrics: dict
    calibrated: dict[str, np.ndarray]
    calibrator: Any


# --------------------------------------------------------------------------------------------- helpers
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _split_size(sp: SplitPredictions, class_names: list[str]) -> dict:
    y = np.asarray(sp.y, dtype=np.int64)
    patients = np.asarray(sp.patient)
    _, per_patient = np.unique(patients, return_counts=True)
    return {
        "cases": int(len(y)),
        "patients": int(len(per_patient)),
        "max_cases_per_patient": int(per_patient.max()) if len(per_patient) else 0,
        "per_class": {name: int(np.sum(y == j)) for j, name in enumerate(class_names)},
    }


def _variant_block(
    probs: np.ndarray, y: np.ndarray, task: TaskInfo, bs: Bootstrap, options: EvalOptions, full: bool = True
) -> dict:
    block = {
        "discrimination": discrimination_block(
            probs, y, task.kind, task.class_names, task.positive_index, bs
        ),
        "calibration": calibration_block(probs, y, task.kind, task.positive_index, bs, options.ece_bins),
    }
    if not full:
        block["calibration"].pop("reliability", None)
        return block
    if task.kind == "binary":
        s, yp = probs[:, task.positive_index], y == task.positive_index
        block["roc_curve"] = roc_points(s, yp) if (yp.any() and not yp.all()) else None
        block["decision_curve"] = decision_curve(s, yp)
    else:
        block["roc_curve"] = {
            name: roc_points(probs[:, j], y == j) if (np.any(y == j) and not np.all(y == j)) else None
            for j, name in enumerate(task.class_names)
        }
    return block


def _patient_level(
    probs: np.ndarray, sp: SplitPredictions, task: TaskInfo
) -> tuple[np.ndarray, np.ndarray, int]:
    """Mean probability per patient; label rule documented in docs/metrics_schema.md."""
    patients, inv = np.unique(np.asarray(sp.patient), return_inverse=True)
    inv = inv.reshape(-1)
    g = len(patients)
    k = probs.shape[1]
    counts = np.bincount(inv, minlength=g).astype(np.float64)
    p = np.zeros((g, k))
    np.add.at(p, inv, probs)
    p /= counts[:, None]
    y = np.asarray(sp.y, dtype=np.int64)
    label_counts = np.zeros((g, k), dtype=np.int64)
    np.add.at(label_counts, (inv, y), 1)
    mixed = int(np.sum((label_counts > 0).sum(axis=1) > 1))
    if task.kind == "binary":
        pos = task.positive_index
        yp = np.where(label_counts[:, pos] > 0, pos, 1 - pos)  # any positive case -> positive patient
    elif task.kind == "ordinal":
        yp = np.array([np.flatnonzero(r)[-1] for r in label_counts])  # the most severe grade
    else:
        yp = label_counts.argmax(axis=1)  # most frequent label (ties: lowest index)
    return p, yp, mixed


# -------------------------------------------------------------------------------------------- main entry
def evaluate_run(
    splits: dict[str, SplitPredictions], task: TaskInfo, options: EvalOptions, seed: int
) -> EvalResult:
    """Calibrate on the calibration split and evaluate val and test with CIs.

    Args:
        splits: Split name ("val", "calibration", "test") -> predictions; "test" is required.
        task: Task kind, class names and positive class.
        options: Evaluation settings.
        seed: Seed of every bootstrap and randomised step (results are reproducible for a given seed).

    Returns:
        ``EvalResult`` with the metrics dict (schema in docs/metrics_schema.md), the calibrated
        probabilities per split and the fitted calibrator.
    """
    unknown = set(splits) - set(SPLIT_NAMES)
    if unknown:
        raise ValueError(f"splits: unknown split names {sorted(unknown)}, expected a subset of {SPLIT_NAMES}")
    if "test" not in splits:
        raise ValueError(f"splits: a 'test' split is required, got {sorted(splits)}")
    k = len(task.class_names)
    for name, sp in splits.items():
        sp.validate(name, k)
    warnings: list[str] = []
    ss = np.random.SeedSequence(int(seed))
    children = dict(zip(("calibration", "val", "test", "patient", "groups"), ss.spawn(5), strict=True))

    # ------------------------------------------------------------------------------------ calibration
    cal_split = splits.get("calibration")
    n_cal = 0 if cal_split is None else int(np.shape(cal_split.logits)[0])
    cal_info: dict[str, Any] = {"requested": options.calibration, "n_cases": n_cal}
    calibrator = None
    if cal_split is None or n_cal == 0:
        cal_info["applied"] = "none"
        cal_info["reason"] = "no calibration split"
    elif options.calibration == "none":
        cal_info["applied"] = "none"
        cal_info["reason"] = "calibration disabled in options"
    else:
        calibrator, fitted = fit_calibrator(
            options.calibration,
            cal_split.logits,
            cal_split.y,
            int(ss.generate_state(1)[0] % (2**31)),
        )
        cal_info.update(fitted)
    # Warn about the method actually applied (for "auto", the one it chose), and why one was declined.
    cal_info["warnings"] = cal_info.get("warnings", []) + calibration_warnings(
        cal_info["applied"], n_cal, k, options.conformal_alpha
    )
    warnings.extend(cal_info["warnings"])

    raw = {name: softmax(np.asarray(sp.logits, dtype=np.float64), axis=1) for name, sp in splits.items()}
    calibrated = {
        name: (calibrator.predict_proba(sp.logits) if calibrator is not None else raw[name])
        for name, sp in splits.items()
    }
    primary = "calibrated" if calibrator is not None else "uncalibrated"

    # ------------------------------------------------------------------------------- per-split metrics
    evaluation: dict[str, Any] = {}
    boots: dict[str, Bootstrap] = {}
    for name in ("test", "val"):
        if name not in splits:
            continue
        sp = splits[name]
        y = np.asarray(sp.y, dtype=np.int64)
        bs = Bootstrap(
            len(y),
            options.n_bootstrap,
            seed=children[name],
            clusters=np.asarray(sp.patient),
            ci_level=options.ci_level,
            strata=y if task.kind == "binary" else None,  # small-sample expansion: the rarer class's patients
        )
        boots[name] = bs
        entry: dict[str, Any] = {
            "primary": primary,
            "ci_resampling": "patient_cluster" if bs.clustered else "case",
            "uncalibrated": _variant_block(raw[name], y, task, bs, options),
            "calibrated": _variant_block(calibrated[name], y, task, bs, options)
            if calibrator is not None
            else None,
        }
        evaluation[name] = entry

    # ---------------------------------------------------------------------------- operating points
    if task.kind == "binary" and options.operating_points:
        pos = task.positive_index
        val = splits.get("val")
        y_test = np.asarray(splits["test"].y) == pos
        if val is None:
            warnings.append("no val split: operating points were not chosen (they are never chosen on test)")
        elif (np.asarray(val.y) == pos).all() or not (np.asarray(val.y) == pos).any():
            warnings.append("val split has one class only: operating points were not chosen")
        else:
            y_val = np.asarray(val.y) == pos
            for variant, probs in (("uncalibrated", raw), ("calibrated", calibrated)):
                block = evaluation["test"][variant]
                if block is None:
                    continue
                block["operating_points"] = operating_points(
                    probs["val"][:, pos],
                    y_val,
                    probs["test"][:, pos],
                    y_test,
                    options.operating_points,
                    boots["test"],
                    options.ci_level,
                )

    # ------------------------------------------------------------------------------------- conformal
    conformal: dict[str, Any] = {"alpha": options.conformal_alpha, "fitted_on": None, "methods": {}}
    if options.conformal_alpha is None:
        conformal["reason"] = "disabled in options"
    elif cal_split is None or n_cal == 0:
        conformal["reason"] = "no calibration split"
    else:
        conformal["fitted_on"] = "calibration split, uncalibrated softmax probabilities"
        conformal["n_calibration"] = n_cal
        conformal["min_calibration_cases"] = min_calibration_size(options.conformal_alpha)
        conformal["target_coverage"] = 1.0 - options.conformal_alpha
        rng_seed = int(ss.generate_state(2)[1] % (2**31))
        for method, randomized, mondrian in CONFORMAL_METHODS:
            key = f"{method}_randomized" if randomized else f"{method}_mondrian" if mondrian else method
            cp = SplitConformal(
                options.conformal_alpha, method, randomized, random_state=rng_seed, class_conditional=mondrian
            )
            cp.fit(raw["calibration"], np.asarray(cal_split.y, dtype=np.int64))
            res: dict[str, Any] = {"qhat": cp.qhat_, "randomized": randomized, "class_conditional": mondrian}
            if mondrian:
                res["class_qhat"] = dict(zip(task.class_names, cp.class_qhat_.tolist(), strict=True))
            for name in ("test", "val"):
                if name in splits:
                    sets = cp.predict_sets(raw[name])
                    res[name] = coverage_report(
                        sets, np.asarray(splits[name].y, dtype=np.int64), task.class_names
                    )
            conformal["methods"][key] = res

    # ----------------------------------------------------------------------------------- subgroups
    test = splits["test"]
    primary_probs = calibrated["test"]
    y_test_all = np.asarray(test.y, dtype=np.int64)
    subgroups: dict[str, Any] = {}
    for gi, (gname, values) in enumerate(sorted(test.groups.items())):
        vals = np.asarray(values).astype(str)
        col: dict[str, Any] = {}
        for vi, v in enumerate(np.unique(vals)):
            m = vals == v
            n = int(m.sum())
            sub_sp = SplitPredictions(
                np.asarray(test.logits)[m],
                y_test_all[m],
                np.asarray(test.patient)[m],
                np.asarray(test.case)[m],
            )
            g_entry: dict[str, Any] = {"size": _split_size(sub_sp, task.class_names), "warning": None}
            if n < options.min_subgroup:
                g_entry["warning"] = "too_small"
            bs = Bootstrap(
                n,
                options.n_bootstrap,
                seed=np.random.SeedSequence([int(seed), 7, gi, vi]),
                clusters=np.asarray(test.patient)[m],
                ci_level=options.ci_level,
                strata=y_test_all[m] if task.kind == "binary" else None,
            )
            try:
                g_entry["metrics"] = _variant_block(
                    primary_probs[m], y_test_all[m], task, bs, options, full=False
                )
            except ValueError as err:  # e.g. a subgroup too small for any estimate
                g_entry["metrics"] = None
                g_entry["error"] = str(err)
            col[v] = g_entry
        subgroups[gname] = col
        small = [v for v, e in col.items() if e["warning"] == "too_small"]
        if small:
            warnings.append(
                f"subgroup column {gname!r}: {len(small)} group(s) below min_subgroup="
                f"{options.min_subgroup} cases: their metrics are unreliable"
            )

    # ------------------------------------------------------------------------------- patient level
    patient_level: dict[str, Any] | None = None
    if _split_size(test, task.class_names)["max_cases_per_patient"] > 1:
        pp, yp, mixed = _patient_level(primary_probs, test, task)
        bs = Bootstrap(len(yp), options.n_bootstrap, seed=children["patient"], ci_level=options.ci_level)
        patient_level = {
            "n_patients": int(len(yp)),
            "aggregation": "mean_probability",
            "label_rule": {"binary": "any_positive", "ordinal": "max_grade", "multiclass": "most_frequent"}[
                task.kind
            ],
            "n_patients_with_mixed_labels": mixed,
            "probabilities": primary,
            "metrics": _variant_block(pp, yp, task, bs, options, full=False),
        }

    metrics = {
        "schema_version": SCHEMA_VERSION,
        "seed": int(seed),
        "task": {
            "kind": task.kind,
            "class_names": list(task.class_names),
            "positive_index": task.positive_index,
            "positive_class": task.class_names[task.positive_index] if task.kind == "binary" else None,
        },
        "options": {**asdict(options), "operating_points": list(options.operating_points)},
        "splits": {name: _split_size(sp, task.class_names) for name, sp in splits.items()},
        "calibration": cal_info,
        "evaluation": evaluation,
        "conformal": conformal,
        "subgroups": subgroups,
        "patient_level": patient_level,
        "warnings": warnings,
    }
    return EvalResult(metrics=_jsonable(metrics), calibrated=calibrated, calibrator=calibrator)
