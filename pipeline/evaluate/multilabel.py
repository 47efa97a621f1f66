"""Evaluating a multilabel model (``task.kind: multilabel``): every finding through the binary code path,
plus macro figures over findings.

A finding ``j``'s logit ``s_j`` becomes the binary logits ``[0, s_j]`` (softmax = ``sigmoid(s_j)``) and its
labels the 0/1 column ``y[:, j]``; :func:`pipeline.evaluate.summary.evaluate_run` then does for that finding
exactly what it does for a binary task: the calibrator with its guard (fitted on the calibration split
only), AUROC with DeLong or patient-cluster bootstrap CI, AUPRC, Brier, ECE with its interval, calibration
slope, operating points chosen on val, subgroups and patient-level metrics. Its ``metrics`` go to
``per_finding[name]``. Each finding's evaluation uses its own seed (:func:`finding_seed`), so it equals a
binary evaluation of that column with that seed.

On top: the macro AUROC over findings (the mean of the findings' AUROCs, over findings with positive and
negative cases) with a percentile bootstrap CI from paired resamples (one resample of patients serves every
finding), and the mean Brier score with its CI. Conformal prediction sets are not defined here (a set of
classes assumes one label per case): they are skipped with that reason.

Axis order: logits and probabilities ``(N, F)`` (cases, findings); labels ``(N, F)`` 0/1.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from scipy.special import expit

from pipeline.evaluate.intervals import value_ci
from pipeline.evaluate.summary import (
    SCHEMA_VERSION,
    EvalOptions,
    EvalResult,
    SplitPredictions,
    TaskInfo,
    _jsonable,
    evaluate_run,
)
from pipeline.stats.bootstrap import Bootstrap, auroc_stat, mean_stat
from pipeline.trained.multilabel import MultilabelCalibrator, binary_logits

__all__ = ["CONFORMAL_SKIPPED", "binary_split", "evaluate_multilabel", "finding_seed", "finding_task"]

CONFORMAL_SKIPPED = (
    "conformal prediction sets are not computed for a multilabel task: a set of classes assumes exactly one "
    "label per case, and findings co-occur"
)


def finding_seed(seed: int, j: int) -> int:
    """The seed of finding ``j``'s binary evaluation."""
    return int(np.random.SeedSequence([int(seed), 17, j]).generate_state(1)[0] % (2**31))


def finding_task(name: str) -> TaskInfo:
    """The binary task of one finding: column 1 (``name``) is the positive class."""
    return TaskInfo(kind="binary", class_names=[f"no {name}", name], positive_index=1)


def binary_split(sp: SplitPredictions, j: int) -> SplitPredictions:
    """Finding ``j`` of a multilabel split as a binary split (logits ``[0, s_j]``, labels ``y[:, j]``)."""
    return SplitPredictions(
        logits=binary_logits(np.asarray(sp.logits)[:, j]),
        y=np.asarray(sp.y)[:, j].astype(np.int64),
        patient=sp.patient,
        case=sp.case,
        groups=sp.groups,
    )


def _check(splits: dict[str, SplitPredictions], names: list[str]) -> None:
    if "test" not in splits:
        raise ValueError(f"splits: a 'test' split is required, got {sorted(splits)}")
    f = len(names)
    for name, sp in splits.items():
        z, y = np.asarray(sp.logits), np.asarray(sp.y)
        if z.ndim != 2 or z.shape[1] != f or y.shape != z.shape:
            raise ValueError(
                f"split {name!r}: logits and y: expected shape (N, {f}) each (one column per finding), got "
                f"{z.shape} and {y.shape}"
            )
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"split {name!r}: y: expected 0/1 per finding")


def _evaluate_finding(
    splits: dict[str, SplitPredictions], j: int, name: str, options: EvalOptions, seed: int
) -> EvalResult:
    """One finding's binary evaluation; a calibrator that cannot be fitted (e.g. one class only in the
    calibration split) leaves that finding uncalibrated, with a warning."""
    sub = {s: binary_split(sp, j) for s, sp in splits.items()}
    opts = dataclasses.replace(options, conformal_alpha=None)
    try:
        return evaluate_run(sub, finding_task(name), opts, seed=finding_seed(seed, j))
    except ValueError as err:
        if options.calibration == "none":
            raise
        res = evaluate_run(
            sub, finding_task(name), dataclasses.replace(opts, calibration="none"), seed=finding_seed(seed, j)
        )
        note = f"calibration of finding {name!r} could not be fitted ({err}); it is left uncalibrated"
        res.metrics["calibration"]["warnings"].append(note)
        res.metrics["warnings"].append(note)
        return res


def _macro_block(probs: np.ndarray, y: np.ndarray, bs: Bootstrap, names: list[str]) -> dict[str, Any]:
    """Macro AUROC (mean over findings with both classes) and mean Brier, with paired bootstrap CIs."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(bool)
    usable = [j for j in range(y.shape[1]) if y[:, j].any() and not y[:, j].all()]
    stats = {f"auc_{j}": auroc_stat(probs[:, j], y[:, j]) for j in usable}
    stats["brier"] = mean_stat(np.mean((probs - y) ** 2, axis=1))
    boot = bs.run(stats)
    method = "cluster_bootstrap" if bs.clustered else "bootstrap"
    if usable:
        values = [float(roc_auc_score(y[:, j], probs[:, j])) for j in usable]
        samples = np.mean(np.column_stack([boot[f"auc_{j}"] for j in usable]), axis=1)
        macro = value_ci(float(np.mean(values)), bs.ci(samples), method)
    else:
        macro = value_ci(float("nan"), None, None, note="no finding has positive and negative cases")
    macro["findings"] = [names[j] for j in usable]
    brier = value_ci(float(np.mean((probs - y) ** 2)), bs.ci(boot["brier"]), method)
    return {
        "discrimination": {"n": int(len(y)), "macro_auroc": macro, "auroc": macro},
        "calibration": {"brier": brier},
    }


def _split_size(sp: SplitPredictions, names: list[str]) -> dict[str, Any]:
    y = np.asarray(sp.y)
    _, per_patient = np.unique(np.asarray(sp.patient), return_counts=True)
    return {
        "cases": int(len(y)),
        "patients": int(len(per_patient)),
        "max_cases_per_patient": int(per_patient.max()) if len(per_patient) else 0,
        "per_finding": {n: int(y[:, j].sum()) for j, n in enumerate(names)},
        "no_finding": int((y.sum(axis=1) == 0).sum()),
    }


def evaluate_multilabel(
    splits: dict[str, SplitPredictions], names: list[str], options: EvalOptions, seed: int
) -> EvalResult:
    """Evaluate a multilabel model's predictions: per finding (the binary path) and macro over findings.

    Args:
        splits: Split name -> predictions with ``logits`` and ``y`` of shape ``(N, F)``; "test" required.
        names: The F finding names, in column order.
        options: Evaluation settings (``conformal_alpha`` is not used: see :data:`CONFORMAL_SKIPPED`).
        seed: Seed of every bootstrap (finding ``j`` uses :func:`finding_seed`).

    Returns:
        ``EvalResult``: ``metrics`` (``docs/metrics_schema.md``, "Multilabel tasks"), calibrated finding
        probabilities ``(N, F)`` per split, and a :class:`MultilabelCalibrator` (None when no finding's
        calibrator was applied).

    Raises:
        ValueError: Shapes or labels are not as expected (names the split and field).
    """
    _check(splits, names)
    per_finding: dict[str, Any] = {}
    cals: list[Any] = []
    calibrated = {s: expit(np.asarray(sp.logits, dtype=np.float64)) for s, sp in splits.items()}
    raw = {s: p.copy() for s, p in calibrated.items()}
    warnings: list[str] = []
    for j, name in enumerate(names):
        res = _evaluate_finding(splits, j, name, options, seed)
        per_finding[name] = res.metrics
        cals.append(res.calibrator)
        for s in calibrated:
            calibrated[s][:, j] = res.calibrated[s][:, 1]
        warnings.extend(f"{name}: {w}" for w in res.metrics.get("warnings", []))
    calibrator = MultilabelCalibrator(cals, names) if any(c is not None for c in cals) else None
    primary = "calibrated" if calibrator is not None else "uncalibrated"
    evaluation: dict[str, Any] = {}
    for i, s in enumerate(("test", "val")):
        if s not in splits:
            continue
        sp = splits[s]
        bs = Bootstrap(
            len(sp.y),
            options.n_bootstrap,
            seed=np.random.SeedSequence([int(seed), 29, i]),
            clusters=np.asarray(sp.patient),
            ci_level=options.ci_level,
        )
        evaluation[s] = {
            "primary": primary,
            "ci_resampling": "patient_cluster" if bs.clustered else "case",
            "uncalibrated": _macro_block(raw[s], np.asarray(sp.y), bs, names),
            "calibrated": _macro_block(calibrated[s], np.asarray(sp.y), bs, names) if calibrator else None,
        }
    cal_split = splits.get("calibration")
    metrics = {
        "schema_version": SCHEMA_VERSION,
        "seed": int(seed),
        "task": {
            "kind": "multilabel",
            "class_names": list(names),
            "finding_names": list(names),
            "positive_index": None,
            "positive_class": None,
        },
        "options": {**dataclasses.asdict(options), "operating_points": list(options.operating_points)},
        "splits": {s: _split_size(sp, names) for s, sp in splits.items()},
        "calibration": {
            "requested": options.calibration,
            "n_cases": 0 if cal_split is None else int(len(cal_split.y)),
            "applied": "per_finding" if calibrator is not None else "none",
            "per_finding": {n: per_finding[n]["calibration"].get("applied") for n in names},
            "warnings": [w for w in warnings if "calibrat" in w],
        },
        "evaluation": evaluation,
        "per_finding": per_finding,
        "conformal": {
            "alpha": options.conformal_alpha,
            "fitted_on": None,
            "methods": {},
            "reason": CONFORMAL_SKIPPED,
        },
        "subgroups": {},
        "patient_level": None,
        "warnings": warnings,
    }
    return EvalResult(metrics=_jsonable(metrics), calibrated=calibrated, calibrator=calibrator)
