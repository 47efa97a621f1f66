"""Comparison of this run's model with an earlier one on the same test cases (``evaluate.compare_with``).

The earlier model is named by its Evaluate folder (its ``predictions.csv`` is read), by that
``predictions.csv`` itself, or by its FineTune folder (its ``model.pt`` is run on this run's test tensors,
which needs the same preprocessing). Cases are matched by pseudonymous ``case_id`` (the same workspace key
gives the same pseudonyms); cases whose label differs between the two files are left out and counted.

Both models are scored by their uncalibrated softmax probability, on the same footing: a binary AUROC is
unchanged by temperature or Platt scaling (with more than two classes they can change one-vs-rest AUROCs,
so neither model's calibrator is applied). Binary tasks compare the positive class;
multi-class and ordinal tasks compare every class one-vs-rest. Two paired analyses are reported: the
DeLong test (:func:`pipeline.evaluate.delong.delong_roc_test`) and the paired (cluster) bootstrap of the
AUROC difference (:func:`pipeline.evaluate.metrics.paired_auroc_difference`). Keys are documented in
``docs/metrics_schema.md`` (``comparison``).

Axis order: probabilities are (N, K) (cases, classes); labels and ids are (N,).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError
from pipeline.evaluate.delong import delong_ci, delong_roc_test
from pipeline.evaluate.metrics import paired_auroc_difference, value_ci
from pipeline.stats.bootstrap import Bootstrap

__all__ = ["PreviousScores", "compare_models", "load_previous", "paired_auroc_comparison", "verdict"]


@dataclass(frozen=True)
class PreviousScores:
    """The earlier model's test predictions.

    Attributes:
        kind: ``"evaluate"`` (read from predictions.csv) or ``"finetune"`` (model run on this run's tensors).
        name: Folder (or file) name of the earlier output, never a full path.
        case: Case ids, (M,).
        y: Labels, (M,).
        probs: Uncalibrated probabilities, (M, K).
    """

    kind: str
    name: str
    case: np.ndarray
    y: np.ndarray
    probs: np.ndarray


def _read_predictions_csv(
    path: Path, n_classes: int, split: str = "test"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("split") == split]
    except OSError as err:
        raise ConfigError(f"evaluate.compare_with: cannot read {path}: {err}") from err
    if not rows:
        raise ConfigError(
            f"evaluate.compare_with: {path} holds no '{split}' rows; expected a medtl predictions.csv"
        )
    raw = [c for c in rows[0] if c.startswith("p_raw_")]
    if len(raw) != n_classes:
        raise ConfigError(
            f"evaluate.compare_with: {path} has {len(raw)} probability columns ({raw}); this task has {n_classes} classes"
        )
    case = np.array([r["case_id"] for r in rows])
    y = np.array([int(r["label_index"]) for r in rows], dtype=np.int64)
    probs = np.array([[float(r[c]) for c in raw] for r in rows], dtype=np.float64)
    return case, y, probs


def load_previous(
    path: Path,
    n_classes: int,
    test_x: np.ndarray | None = None,
    test_case: np.ndarray | None = None,
    test_y: np.ndarray | None = None,
    device: Any = None,
) -> PreviousScores:
    """Load the earlier model's test predictions.

    Args:
        path: An Evaluate folder, its ``predictions.csv``, or a FineTune folder (``model.pt``, ``model_info.json``).
        n_classes: Classes of this run's task.
        test_x: This run's test tensors, (N, C, H, W) or (N, C, D, H, W); needed for a FineTune folder.
        test_case: This run's test case ids, (N,); needed for a FineTune folder.
        test_y: This run's test labels, (N,); needed for a FineTune folder.
        device: Torch device for running a FineTune folder's model.

    Raises:
        ConfigError: If the path is none of the above, or the earlier model does not fit this run's task or inputs.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        case, y, p = _read_predictions_csv(path, n_classes)
        return PreviousScores("evaluate", path.parent.name, case, y, p)
    if (path / "predictions.csv").is_file():
        case, y, p = _read_predictions_csv(path / "predictions.csv", n_classes)
        return PreviousScores("evaluate", path.name, case, y, p)
    if (path / "model.pt").is_file() and (path / "model_info.json").is_file():
        from pipeline.trained.artefact import TrainedModel
        from pipeline.trained.scorer import Scorer

        if test_x is None or test_case is None or test_y is None:
            raise ConfigError(
                f"evaluate.compare_with: {path} is a FineTune folder; this run has no test tensors to score"
            )
        try:
            scorer = Scorer(TrainedModel.load(path), device or "cpu")
            probs = scorer.probabilities(test_x, calibrated=False)
        except (RuntimeError, ValueError, KeyError) as err:
            raise ConfigError(
                f"evaluate.compare_with: the model in {path} cannot score this run's test tensors "
                f"(shape {tuple(test_x.shape[1:])}): {err}"
            ) from err
        if probs.shape[1] != n_classes:
            raise ConfigError(
                f"evaluate.compare_with: the model in {path} has {probs.shape[1]} outputs; this task has {n_classes} classes"
            )
        return PreviousScores("finetune", path.name, np.asarray(test_case), np.asarray(test_y), probs)
    raise ConfigError(
        f"evaluate.compare_with: {path} is not an Evaluate folder (predictions.csv), a predictions.csv file or a "
        "FineTune folder (model.pt + model_info.json)"
    )


def verdict(ci: Any, better: str = "better", worse: str = "worse") -> str:
    """The verdict a paired difference's CI supports: ``better`` (above 0), ``worse`` (below 0) or
    ``no evidence of a difference`` (it contains 0, or is undefined)."""
    try:
        lo, hi = float(ci[0]), float(ci[1])
    except (TypeError, ValueError, IndexError):
        return "no evidence of a difference"
    if lo > 0:
        return better
    if hi < 0:
        return worse
    return "no evidence of a difference"


def paired_auroc_comparison(
    y_pos: np.ndarray, s_a: np.ndarray, s_b: np.ndarray, bs: Bootstrap, level: float
) -> dict[str, Any]:
    """AUROC of ``a`` minus ``b`` on the same cases: DeLong and the paired (cluster) bootstrap, and the
    verdict from the primary one (the cluster bootstrap when patients have several cases, else DeLong)."""
    if y_pos.all() or not y_pos.any():
        return {"error": "one class only among the matched cases: AUROC undefined"}
    a1, lo1, hi1 = delong_ci(y_pos, s_a, level)
    a2, lo2, hi2 = delong_ci(y_pos, s_b, level)
    test = delong_roc_test(y_pos, s_a, s_b, level).to_dict()
    boot = paired_auroc_difference(y_pos, s_a, s_b, bs)
    primary = "paired_bootstrap" if bs.clustered else "delong"
    ci = (boot if primary == "paired_bootstrap" else test).get("ci")
    return {
        "auroc_current": value_ci(a1, (lo1, hi1), "delong"),
        "auroc_previous": value_ci(a2, (lo2, hi2), "delong"),
        "delong": test,
        "paired_bootstrap": boot,
        "primary": primary,
        "verdict": verdict(ci),
    }


def compare_models(
    y: np.ndarray,
    case: np.ndarray,
    patient: np.ndarray,
    probs_now: np.ndarray,
    previous: PreviousScores,
    class_names: list[str],
    positive_index: int | None,
    n_bootstrap: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Paired comparison of AUROC, this run's model minus the earlier one, on the matched test cases.

    Args:
        y: This run's test labels, (N,).
        case: This run's test case ids, (N,).
        patient: Patient pseudonym per case, (N,) (cluster bootstrap when a patient has several cases).
        probs_now: This run's uncalibrated test probabilities, (N, K).
        previous: The earlier model's predictions.
        class_names: One name per class.
        positive_index: Binary tasks: the positive class column; None compares every class one-vs-rest.
        n_bootstrap: Bootstrap resamples.
        level: Confidence level.
        seed: Bootstrap seed.

    Returns:
        The ``comparison`` block of metrics.json (docs/metrics_schema.md).
    """
    prev_index = {c: i for i, c in enumerate(previous.case)}
    idx_now, idx_prev, mismatch = [], [], 0
    for i, c in enumerate(case):
        j = prev_index.get(c)
        if j is None:
            continue
        if int(previous.y[j]) != int(y[i]):
            mismatch += 1
            continue
        idx_now.append(i)
        idx_prev.append(j)
    matched = set(case[idx_now].tolist()) if idx_now else set()
    out: dict[str, Any] = {
        "previous": previous.name,
        "previous_kind": previous.kind,
        "split": "test",
        "scores": "uncalibrated softmax probabilities of both models",
        "difference": "current minus previous",
        "n_matched": len(idx_now),
        "n_current_only": int(sum(c not in prev_index for c in case)),
        "n_previous_only": int(sum(c not in set(case.tolist()) for c in previous.case)),
        "n_label_mismatch": mismatch,
    }
    if len(idx_now) < 2:
        out["reason"] = "fewer than 2 test cases in common (matched by pseudonymous case id)"
        return out
    i_now, i_prev = np.array(idx_now), np.array(idx_prev)
    yy, pn, pp = y[i_now], probs_now[i_now], previous.probs[i_prev]
    pats = np.asarray(patient)[i_now]
    bs = Bootstrap(len(yy), n_bootstrap, seed=seed, clusters=pats, ci_level=level)
    out["ci_resampling"] = "patient_cluster" if bs.clustered else "case"
    cols = [positive_index] if positive_index is not None else list(range(len(class_names)))
    out["classes"] = {}
    for k in cols:
        out["classes"][class_names[k]] = paired_auroc_comparison(yy == k, pn[:, k], pp[:, k], bs, level)
    if positive_index is not None:
        out.update(out["classes"][class_names[positive_index]])
    out["cases_matched_fraction"] = len(matched) / max(len(case), 1)
    return out
