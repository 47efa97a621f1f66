"""Champion/challenger: compare two models on the same current test cases and decide a promotion.

Both models are scored on the *current* data (the splits are stable across nights, so neither model ever
trained on these calibration or test patients). Each model gets its own calibrator, fitted the same way
(``evaluate.calibration``) on the current calibration split, and the decision uses the calibrated
probabilities of the test cases in the **locked holdout**: test patients whose keyed hash falls below
``ops.promotion.holdout_fraction``. The holdout is used by promotion decisions only, and every decision that
looked at it is counted in the registry. When the holdout is too small (or holds one class), the whole test
split is used and the decision says so.

Rule (non-inferiority plus calibration):

* ``diff = AUROC(challenger) - AUROC(champion)`` with a paired interval: DeLong (binary) or a paired
  patient-cluster bootstrap (``method: bootstrap``, and always for multi-class macro one-vs-rest AUROC);
  promoted only if the lower bound exceeds ``-auroc_margin``;
* and ``Brier(challenger) <= Brier(champion) + brier_margin``.

A first model (no champion) is promoted only if the lower bound of its own AUROC interval exceeds
``min_auroc``. Axis order: probabilities ``(N, K)`` (cases, classes); labels and patients ``(N,)``.

Multilabel tasks (``task.kind: multilabel``; probabilities and labels ``(N, F)``, one 0/1 column per finding)
follow the same rule with the figures of :mod:`pipeline.evaluate.multilabel`: the macro AUROC (mean over the
findings that have positive and negative cases) with a paired patient-cluster bootstrap of the difference
and its expanded percentile interval (:meth:`pipeline.stats.bootstrap.Bootstrap.ci`), and the mean Brier over
findings for "calibration not worse". Each model's probabilities come from its own saved per-finding
calibrators. The locked holdout is usable when it has ``min_holdout_cases`` cases and positive and negative
cases of every finding (:func:`usable_multilabel_holdout`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config, PromotionPolicy
from pipeline.errors import IngestError
from pipeline.evaluate.delong import delong_ci, delong_roc_test
from pipeline.ingest.splits import holdout_mask, usable_holdout
from pipeline.stats.bootstrap import Bootstrap, auroc_stat, percentile_ci, score_auroc_stat

log = logging.getLogger(__name__)


@dataclass
class Scored:
    """A model's outputs on the current evaluation cases.

    Attributes:
        raw: Split -> softmax probabilities ``(N, K)``.
        calibrated: Split -> calibrated probabilities ``(N, K)``.
        logits: Split -> logits ``(N, K)``.
        y: Split -> labels ``(N,)``.
        patients: Split -> patient pseudonyms ``(N,)``.
        cases: Split -> case ids ``(N,)``.
        calibrator: Method, parameters and source of the model's saved calibrator (fitted by its Evaluate).
        multilabel: The model has one sigmoid output per finding (``y`` is then ``(N, F)`` 0/1).
    """

    raw: dict[str, np.ndarray]
    calibrated: dict[str, np.ndarray]
    logits: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    patients: dict[str, np.ndarray]
    cases: dict[str, np.ndarray]
    calibrator: dict[str, Any]
    multilabel: bool = False


def brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Multi-class Brier score: mean over cases of ``sum_k (p_k - 1[y = k])^2``."""
    onehot = np.eye(probs.shape[1])[y]
    return float(np.mean(np.sum((probs - onehot) ** 2, axis=1)))


def _auroc_point(probs: np.ndarray, y: np.ndarray, positive_index: int | None) -> float:
    from sklearn.metrics import roc_auc_score

    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        return float(roc_auc_score(y == pos, probs[:, pos]))
    return float(
        roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
    )


def compare(
    y: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    patients: np.ndarray,
    policy: PromotionPolicy,
    positive_index: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Decide whether ``challenger`` may replace ``champion`` on the same cases.

    Args:
        y: Labels ``(N,)``.
        champion: Calibrated probabilities of the champion ``(N, K)``.
        challenger: Calibrated probabilities of the challenger ``(N, K)``.
        patients: Patient pseudonyms ``(N,)`` (bootstrap clusters).
        policy: Margins and method.
        positive_index: Positive class of a binary task.
        seed: Seed of the paired bootstrap.

    Returns:
        A JSON-able dict with ``promote`` (bool), ``reasons`` and every number used.
    """
    y = np.asarray(y, dtype=np.int64)
    out: dict[str, Any] = {"n_cases": int(len(y)), "n_patients": int(len(np.unique(patients)))}
    binary = champion.shape[1] == 2
    clustered = len(np.unique(patients)) < len(y)
    # DeLong assumes independent cases: with several cases per patient the patient-cluster bootstrap is used.
    method = policy.method if (binary and not clustered) else "bootstrap"
    if clustered and policy.method == "delong":
        out["method_note"] = "patients with several cases: patient-cluster bootstrap instead of DeLong"
    out["auroc_champion"] = _auroc_point(champion, y, positive_index)
    out["auroc_challenger"] = _auroc_point(challenger, y, positive_index)
    out["auroc_difference"] = out["auroc_challenger"] - out["auroc_champion"]
    if method == "delong":
        pos = 1 if positive_index is None else positive_index
        t = delong_roc_test(y == pos, challenger[:, pos], champion[:, pos], level=policy.ci_level)
        out["difference_ci"] = list(t.ci)
        out["p_value"] = t.p_value
    else:
        bs = Bootstrap(
            len(y), policy.n_bootstrap, seed=seed, clusters=np.asarray(patients), ci_level=policy.ci_level
        )
        a, b = score_auroc_stat(challenger, y, positive_index), score_auroc_stat(champion, y, positive_index)
        samples = bs.run({"diff": lambda w: a(w) - b(w)})["diff"]
        out["difference_ci"] = list(percentile_ci(samples, policy.ci_level))
        out["p_value"] = None
    out["method"] = method
    out["brier_champion"] = brier(champion, y)
    out["brier_challenger"] = brier(challenger, y)
    return _apply_rule(out, policy)


def _apply_rule(
    out: dict[str, Any], policy: PromotionPolicy, auroc: str = "AUROC", brier_: str = "Brier"
) -> dict[str, Any]:
    """Non-inferiority of the AUROC difference's interval plus "calibration not worse": sets ``promote`` and
    ``reasons`` in ``out`` (``auroc``, ``brier_``: how the figures are named, e.g. "macro AUROC")."""
    lower = out["difference_ci"][0]
    reasons = []
    auroc_ok = bool(np.isfinite(lower) and lower > -policy.auroc_margin)
    if not auroc_ok:
        reasons.append(
            f"{auroc} difference {out['auroc_difference']:+.4f} has lower {policy.ci_level:.0%} bound "
            f"{lower:+.4f} <= -margin {-policy.auroc_margin:+.4f} (not shown non-inferior)"
        )
    cal_ok = out["brier_challenger"] <= out["brier_champion"] + policy.brier_margin
    if not cal_ok:
        reasons.append(
            f"{brier_} {out['brier_challenger']:.4f} worse than champion {out['brier_champion']:.4f} "
            f"+ margin {policy.brier_margin}"
        )
    out["promote"] = auroc_ok and cal_ok
    if out["promote"]:
        reasons.append(
            f"non-inferior: {auroc} difference lower bound {lower:+.4f} > {-policy.auroc_margin:+.4f}, "
            f"{brier_} {out['brier_challenger']:.4f} <= {out['brier_champion']:.4f} + {policy.brier_margin}"
        )
    out["reasons"] = reasons
    return out


def first_model_check(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    policy: PromotionPolicy,
    positive_index: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Decide whether a first model (no champion yet) becomes champion: AUROC lower bound > ``min_auroc``."""
    y = np.asarray(y, dtype=np.int64)
    out: dict[str, Any] = {"n_cases": int(len(y)), "n_patients": int(len(np.unique(patients)))}
    if probs.shape[1] == 2 and policy.method == "delong":
        pos = 1 if positive_index is None else positive_index
        auc, lo, hi = delong_ci(y == pos, probs[:, pos], policy.ci_level)
        out["method"] = "delong"
    else:
        auc = _auroc_point(probs, y, positive_index)
        bs = Bootstrap(
            len(y), policy.n_bootstrap, seed=seed, clusters=np.asarray(patients), ci_level=policy.ci_level
        )
        samples = bs.run({"a": score_auroc_stat(probs, y, positive_index)})["a"]
        lo, hi = percentile_ci(samples, policy.ci_level)
        out["method"] = "bootstrap"
    out.update(auroc_challenger=float(auc), auroc_ci=[float(lo), float(hi)], brier_challenger=brier(probs, y))
    return _first_model_verdict(out, "AUROC", float(auc), float(lo), policy)


def _first_model_verdict(out: dict[str, Any], what: str, auc: float, lo: float, policy) -> dict[str, Any]:
    """A first model is promoted when the lower CI bound of its (macro) AUROC exceeds ``min_auroc``."""
    ok = bool(np.isfinite(lo) and lo > policy.min_auroc)
    out["promote"] = ok
    out["reasons"] = [
        f"first model: {what} {auc:.4f}, lower {policy.ci_level:.0%} bound {lo:.4f} "
        + ("> " if ok else "<= ")
        + f"min_auroc {policy.min_auroc}"
    ]
    return out


# ------------------------------------------------------------------------------------------- multilabel
def multilabel_brier(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean Brier over findings: the mean over findings of ``mean_i (p_ij - y_ij)^2`` (as Evaluate's)."""
    return float(np.mean((np.asarray(probs, np.float64) - np.asarray(y, np.float64)) ** 2))


def _check_multilabel(y: np.ndarray, named: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    """Labels ``(N, F)`` 0/1 as int64; every probability array ``(N, F)`` (ValueError naming the field)."""
    y = np.asarray(y)
    f = len(names)
    if y.ndim != 2 or y.shape[1] != f or not np.isin(y, (0, 1)).all():
        raise ValueError(f"y: expected 0/1 labels of shape (N, {f}) (one column per finding), got {y.shape}")
    for field, p in named.items():
        if np.shape(p) != y.shape:
            raise ValueError(
                f"{field}: expected probabilities of shape {y.shape} (one column per finding), "
                f"got {np.shape(p)}"
            )
    return y.astype(np.int64)


def _usable_findings(y: np.ndarray) -> list[int]:
    """Findings with positive and negative cases (the ones a macro AUROC averages, as Evaluate's)."""
    return [j for j in range(y.shape[1]) if 0 < int(y[:, j].sum()) < len(y)]


def _macro_auroc(probs: np.ndarray, y: np.ndarray, usable: list[int]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(np.mean([roc_auc_score(y[:, j], probs[:, j]) for j in usable]))


def _macro_auroc_stat(probs: np.ndarray, y: np.ndarray, usable: list[int]):
    """Weighted macro AUROC over ``usable`` findings of every count row (a resample without positives or
    negatives of a finding gives NaN, left out of the interval as for every bootstrap AUROC here)."""
    stats = [auroc_stat(probs[:, j], y[:, j] == 1) for j in usable]

    def stat(w: np.ndarray) -> np.ndarray:
        return np.mean(np.stack([s(w) for s in stats], axis=0), axis=0)

    return stat


def _multilabel_head(y: np.ndarray, patients: np.ndarray, names: list[str], usable: list[int]) -> dict:
    return {
        "n_cases": int(len(y)),
        "n_patients": int(len(np.unique(patients))),
        "metric": "macro AUROC over findings; Brier: mean over findings",
        "findings": [names[j] for j in usable],
        "method": "bootstrap",
    }


def _no_usable_finding(out: dict[str, Any]) -> dict[str, Any]:
    why = f"no finding has positive and negative cases among the {out['n_cases']} cases: no macro AUROC"
    return dict(out, promote=False, reasons=[why])


def compare_multilabel(
    y: np.ndarray,
    champion: np.ndarray,
    challenger: np.ndarray,
    patients: np.ndarray,
    policy: PromotionPolicy,
    names: list[str],
    seed: int = 0,
) -> dict[str, Any]:
    """Decide whether a multilabel ``challenger`` may replace ``champion`` on the same cases.

    Non-inferiority of the macro AUROC: the paired patient-cluster bootstrap interval of
    ``macro AUROC(challenger) - macro AUROC(champion)`` (same resamples for both models) must have its lower
    bound above ``-auroc_margin``; and the mean Brier over findings must not be worse by more than
    ``brier_margin``.

    Args:
        y: Labels ``(N, F)`` 0/1.
        champion: Calibrated finding probabilities of the champion ``(N, F)``.
        challenger: Calibrated finding probabilities of the challenger ``(N, F)``.
        patients: Patient pseudonyms ``(N,)`` (bootstrap clusters).
        policy: Margins, resamples and level.
        names: Finding names, in column order.
        seed: Seed of the paired bootstrap.

    Returns:
        A JSON-able dict with ``promote`` (bool), ``reasons`` and every number used (``auroc_*`` are macro
        AUROCs, ``brier_*`` mean Brier scores over findings, ``per_finding`` the AUROCs of each finding).
    """
    y = _check_multilabel(y, {"champion": champion, "challenger": challenger}, names)
    patients = np.asarray(patients)
    usable = _usable_findings(y)
    out = _multilabel_head(y, patients, names, usable)
    out["p_value"] = None
    if policy.method == "delong":
        out["method_note"] = "multilabel macro AUROC: paired patient-cluster bootstrap instead of DeLong"
    out["brier_champion"] = multilabel_brier(champion, y)
    out["brier_challenger"] = multilabel_brier(challenger, y)
    if not usable:
        return _no_usable_finding(out)
    from sklearn.metrics import roc_auc_score

    out["per_finding"] = {
        names[j]: {
            "auroc_champion": float(roc_auc_score(y[:, j], champion[:, j])),
            "auroc_challenger": float(roc_auc_score(y[:, j], challenger[:, j])),
        }
        for j in usable
    }
    out["auroc_champion"] = _macro_auroc(champion, y, usable)
    out["auroc_challenger"] = _macro_auroc(challenger, y, usable)
    out["auroc_difference"] = out["auroc_challenger"] - out["auroc_champion"]
    bs = Bootstrap(len(y), policy.n_bootstrap, seed=seed, clusters=patients, ci_level=policy.ci_level)
    a, b = _macro_auroc_stat(challenger, y, usable), _macro_auroc_stat(champion, y, usable)
    out["difference_ci"] = list(bs.ci(bs.run({"diff": lambda w: a(w) - b(w)})["diff"]))
    return _apply_rule(out, policy, "macro AUROC", "mean Brier over findings")


def first_model_check_multilabel(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray,
    policy: PromotionPolicy,
    names: list[str],
    seed: int = 0,
) -> dict[str, Any]:
    """A first multilabel model becomes champion when the lower bound of its macro AUROC's patient-cluster
    bootstrap interval (:meth:`Bootstrap.ci`, as Evaluate's) exceeds ``min_auroc``."""
    y = _check_multilabel(y, {"probs": probs}, names)
    patients = np.asarray(patients)
    usable = _usable_findings(y)
    out = dict(_multilabel_head(y, patients, names, usable), brier_challenger=multilabel_brier(probs, y))
    if not usable:
        return _no_usable_finding(out)
    auc = _macro_auroc(probs, y, usable)
    bs = Bootstrap(len(y), policy.n_bootstrap, seed=seed, clusters=patients, ci_level=policy.ci_level)
    lo, hi = bs.ci(bs.run({"a": _macro_auroc_stat(probs, y, usable)})["a"])
    out.update(auroc_challenger=auc, auroc_ci=[float(lo), float(hi)])
    return _first_model_verdict(out, "macro AUROC", auc, float(lo), policy)


def usable_multilabel_holdout(
    patients: np.ndarray, y: np.ndarray, key: bytes, fraction: float, min_cases: int
) -> np.ndarray | None:
    """The locked holdout mask of a multilabel test split when it is usable (at least ``min_cases`` cases
    and positive and negative cases of every finding), else None: :func:`pipeline.ingest.splits.
    usable_holdout` on the label matrix, the rule Evaluate uses to leave the holdout out of its report."""
    y = np.asarray(y)
    return usable_holdout(patients, y, y.shape[1], key, fraction, min_cases)


# ------------------------------------------------------------------------------------------ scoring glue
def model_inputs(spec_dict: dict[str, Any], rows: list[dict[str, str]], workspace: Path) -> np.ndarray:
    """Preprocess manifest rows from the workspace's volume cache with a model's recorded spec.

    Each volume is verified against its recorded sha256 and rebuilt from its source when unusable
    (:func:`pipeline.ingest.volume_cache.load_volume`); the rebuilds are logged.

    Returns:
        float32 ``(N, C, *spatial)`` network inputs (see :mod:`pipeline.augment.preprocess` for the order).

    Raises:
        IngestError: code ``cache_lost``: a volume is unusable and its source is gone or changed (the
            message names the volume file, never the source).
    """
    x, _kept, lost = usable_inputs(spec_dict, rows, workspace)
    if lost:
        raise lost[0]
    return x


def usable_inputs(
    spec_dict: dict[str, Any], rows: list[dict[str, str]], workspace: Path
) -> tuple[np.ndarray, list[int], list[IngestError]]:
    """As :func:`model_inputs`, but a case whose volume is lost is left out instead of stopping the night.

    Returns:
        The inputs of the usable rows, their indices in ``rows``, and the errors of the others.
    """
    from collections import Counter

    from pipeline.augment.preprocess import preprocess
    from pipeline.ingest.volume_cache import load_volume
    from pipeline.trained.artefact import preprocess_spec

    spec = preprocess_spec(spec_dict)
    audit: Counter = Counter()
    xs, kept, lost = [], [], []
    for i, r in enumerate(rows):
        try:
            arr, meta = load_volume(workspace, r["volume"], audit)
            xs.append(preprocess(arr, meta.get("axis4"), spec, meta.get("affine")))
            kept.append(i)
        except IngestError as err:
            lost.append(err)
    if audit:
        log.warning("model_inputs: cached volumes rebuilt from their sources: %s", dict(audit))
    if lost:
        log.warning("model_inputs: %d case(s) left out: %s", len(lost), sorted({e.code for e in lost}))
    x = np.stack(xs).astype(np.float32) if xs else np.zeros((0,), np.float32)
    return x, kept, lost


def score_model(
    cfg: Config,
    workspace: Path,
    model_stages: dict[str, str],
    current_augment: Path,
    current_ingest: Path,
    splits: tuple[str, ...] = ("calibration", "test"),
) -> Scored:
    """Score a registered model on the current calibration and test cases with its own saved calibrator.

    The calibrator is the one the model's Evaluate stage fitted on its calibration split
    (``calibrator.json``, bound to the model's sha256); it is not refitted on tonight's data.

    Args:
        cfg: The current config (device).
        workspace: The workspace.
        model_stages: The model's stage folder names (``finetune``, ``evaluate`` and ``augment`` are used);
            a registry row also carries ``files``, the sha256 of the model's files, checked before use.
        current_augment: The current Augment folder (its tensors are reused when preprocessing matches).
        current_ingest: The current Ingest folder (manifest rows, for cached volumes otherwise).
        splits: Splits to score.
    """
    from pipeline.augment.stage import read_index
    from pipeline.ingest.stage import read_manifest
    from pipeline.train.data import load_split, subset
    from pipeline.trained.artefact import TrainedModel
    from pipeline.trained.scorer import Scorer

    trained = TrainedModel.load(
        workspace / "finetune" / model_stages["finetune"],
        workspace / "evaluate" / model_stages["evaluate"],
        expected=model_stages.get("files") or None,  # a registry row: the digests recorded at registration
    )
    scorer = Scorer(trained, cfg.train.device)
    from pipeline.trained.multilabel import is_multilabel

    n_findings = len(cfg.task.classes) if cfg.task.multilabel else None  # labels (N, F) from the current data
    own = trained.preprocessing or json.loads(
        (workspace / "augment" / model_stages["augment"] / "transform_spec.json").read_text()
    )["deterministic"]
    cur = json.loads((current_augment / "transform_spec.json").read_text())["deterministic"]
    rows = read_index(current_augment)
    manifest = {r["case_id"]: r for r in read_manifest(current_ingest)} if own != cur else {}
    out: dict[str, dict[str, np.ndarray]] = {
        k: {} for k in ("raw", "calibrated", "logits", "y", "patients", "cases")
    }
    lost: dict[str, int] = {}
    for split in splits:
        data = load_split(current_augment, rows, split, n_findings)
        if len(data) == 0:
            continue
        x = data.x
        if own != cur:  # another preprocessing: from the cached volumes (a lost one is left out, counted)
            x, kept, errs = usable_inputs(own, [manifest[c] for c in data.case_ids], workspace)
            if errs:
                lost[split] = len(errs)
                data = subset(data, np.array(kept, dtype=np.int64))
        sc = scorer.score(x)
        out["logits"][split], out["raw"][split], out["calibrated"][split] = sc.logits, sc.raw, sc.calibrated
        out["y"][split] = data.targets.astype(np.int64)  # multilabel: the finding vectors (N, F)
        out["patients"][split] = np.array(data.patients)
        out["cases"][split] = np.array(data.case_ids)
    doc = trained.calibrator_info or {}
    info = {
        "method": doc.get("method", "none"),
        "parameters": (doc.get("state") or {}).get("fitted"),
        "fitted_on": doc.get("fitted_on"),
        "source": f"evaluate/{model_stages['evaluate']}/calibrator.json",
    }
    if lost:
        info["cases_left_out"] = lost
    return Scored(
        out["raw"],
        out["calibrated"],
        out["logits"],
        out["y"],
        out["patients"],
        out["cases"],
        info,
        multilabel=is_multilabel(trained.info),
    )


def _common_cases(a: Scored, b: Scored) -> tuple[Scored, Scored]:
    """Both models restricted to the test cases both could score (in ``a``'s order); a case one of them
    could not score (its cached volume lost) is left out of the comparison, never guessed."""
    common = set(a.cases["test"].tolist()) & set(b.cases["test"].tolist())
    ia = np.array([i for i, c in enumerate(a.cases["test"]) if c in common], dtype=np.int64)
    pos_b = {c: i for i, c in enumerate(b.cases["test"])}
    ib = np.array([pos_b[c] for c in a.cases["test"][ia]], dtype=np.int64)

    def take(s: Scored, idx: np.ndarray) -> Scored:
        keys = ("raw", "calibrated", "logits", "y", "patients", "cases")
        pick = {k: dict(getattr(s, k), test=getattr(s, k)["test"][idx]) for k in keys}
        return Scored(**pick, calibrator=s.calibrator, multilabel=s.multilabel)

    return take(a, ia), take(b, ib)


def decide(
    cfg: Config,
    key: bytes,
    challenger: Scored,
    champion: Scored | None,
) -> dict[str, Any]:
    """The promotion decision for ``challenger`` (against ``champion`` when there is one).

    Returns:
        A JSON-able dict: ``promote``, ``evaluated_on`` (``holdout`` or ``test``), the numbers and reasons.
    """
    policy = cfg.ops.promotion
    multilabel = cfg.task.multilabel
    if champion is not None and not np.array_equal(champion.cases["test"], challenger.cases["test"]):
        challenger, champion = _common_cases(challenger, champion)
    y = challenger.y["test"]
    patients = challenger.patients["test"]
    n_classes = challenger.raw["test"].shape[1]
    mask = holdout_mask(patients, key, policy.holdout_fraction)
    yh = y[mask]
    if multilabel:
        usable = usable_multilabel_holdout(
            patients, y, key, policy.holdout_fraction, policy.min_holdout_cases
        )
        found = f"{len(_usable_findings(yh))} of {y.shape[1]} finding(s) both ways"
        need = "positive and negative cases of every finding"
    else:
        usable = usable_holdout(
            patients, y, n_classes, key, policy.holdout_fraction, policy.min_holdout_cases
        )
        found, need = f"{len(np.unique(yh))} class(es)", "every class"
    if usable is not None:
        sel, evaluated_on = mask, "holdout"
        note = f"locked holdout: {int(mask.sum())} of {len(y)} test cases"
    else:
        sel, evaluated_on = np.ones(len(y), dtype=bool), "test"
        note = (
            f"locked holdout too small ({int(mask.sum())} cases, {found}; need "
            f">= {policy.min_holdout_cases} and {need}): whole test split ({len(y)} cases) used"
        )
    pos = cfg.task.positive_index
    names = cfg.task.class_names
    # the same call shape for both task kinds: the last-but-one argument is the finding names (multilabel)
    # or the positive class index
    first, pair = (first_model_check_multilabel, compare_multilabel) if multilabel else (first_model_check, compare)
    target = names if multilabel else pos
    new = challenger.calibrated["test"][sel]
    if champion is None:
        res = first(y[sel], new, patients[sel], policy, target, cfg.train.seed)
    else:
        res = pair(y[sel], champion.calibrated["test"][sel], new, patients[sel], policy, target, cfg.train.seed)
    res.update(
        evaluated_on=evaluated_on,
        note=note,
        holdout_fraction=policy.holdout_fraction,
        auroc_margin=policy.auroc_margin,
        brier_margin=policy.brier_margin,
        calibrator_challenger=challenger.calibrator,
        calibrator_champion=champion.calibrator if champion else None,
    )
    return res
