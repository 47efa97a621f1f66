"""Statistics the report needs for the TRIPOD+AI / CLAIM items beyond discrimination and calibration.

Everything here is computed once by the Evaluate stage (:func:`reporting_items`, written to
``metrics.json`` under ``reporting``, schema in ``docs/metrics_schema.md``); the report only formats it:

* ``sample_size``: cases, patients and events per split, each split's use, the smallest AUROC and
  sensitivity difference the test split can detect, and warnings (stable ``code``) when a split is too
  small for its use (a test split with under 10 events, conformal sets from under ``ceil(1/alpha - 1)``
  calibration cases, a class with too few calibration cases for class-conditional sets, ...);
* ``participants``: per split (train included, from the Augment index), cases, patients, cases per class
  and per value of each subgroup column, and how many cases miss each subgroup value;
* ``subgroup_differences``: per subgroup column, each group against the largest group, with paired
  (patient-cluster) bootstrap CIs of the difference: AUROC, sensitivity and specificity (fairness:
  equal-opportunity and false-positive-rate gaps), and the calibration-in-the-large gap;
* ``site_heterogeneity``: when a site column exists, per-site AUROC (DeLong variance) and a
  DerSimonian-Laird random-effects summary (Q, I^2, tau^2);
* ``error_analysis``: the most confident false positives and false negatives by pseudonym.

Only pseudonyms, counts and the subgroup values already shown per group are written (no path, no tag).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as sps

from pipeline.evaluate.delong import delong_roc_variance
from pipeline.stats.bootstrap import Bootstrap, auroc_stat, macro_auroc_stat, mean_stat

log = logging.getLogger(__name__)

__all__ = [
    "ERROR_CASES",
    "MIN_EVENTS",
    "SITE_COLUMNS",
    "error_cases",
    "hanley_mcneil_se",
    "reporting_items",
]

#: Fewer events (cases of the rarest class) than this makes a split too small for its use.
MIN_EVENTS = 10
#: Cases listed per error type (and class) in the error analysis.
ERROR_CASES = 5
#: Power of the detectable-difference calculation.
POWER = 0.8
#: Subgroup column names treated as the acquisition site (heterogeneity across clusters).
SITE_COLUMNS = ("site", "centre", "center", "hospital", "institution")
#: How the group value of a case without one is recorded (``pipeline.evaluate.stage.collect_predictions``).
MISSING = ("unknown", "")

SPLIT_USE = {
    "train": "model fitting",
    "val": "early stopping, model selection and the choice of operating thresholds",
    "calibration": "fitting the post-hoc calibrator and the conformal prediction sets",
    "test": "the reported performance (used once)",
}


def reporting_items(
    cfg,
    preds: dict[str, Any],
    calibrated: dict[str, np.ndarray],
    metrics: dict[str, Any],
    augment_dir: Path | None = None,
) -> dict[str, Any]:
    """The ``reporting`` block of ``metrics.json``.

    Args:
        cfg: The run config (task, ``evaluate`` options).
        preds: Split name -> ``SplitPredictions`` (after the promotion holdout was left out of test).
        calibrated: Split name -> primary probabilities, (N, K) (calibrated when a calibrator was applied).
        metrics: The metrics dict so far (``calibration``, ``conformal``, ``evaluation`` are read).
        augment_dir: The Augment stage folder; its ``index.csv`` gives the train split's characteristics.
    """
    names = list(cfg.task.class_names)
    pos = cfg.task.positive_index if cfg.task.kind == "binary" else None
    level = cfg.evaluate.ci_level
    n_boot = cfg.evaluate.n_bootstrap
    seed = cfg.train.seed
    index_rows = _index_rows(augment_dir)
    out: dict[str, Any] = {
        "sample_size": sample_size(preds, calibrated, names, pos, metrics, level, index_rows),
        "participants": participants(preds, names, index_rows),
    }
    out["missing_subgroup_values"] = {
        col: {s: d["missing"].get(col, 0) for s, d in out["participants"].items()}
        for col in sorted({c for d in out["participants"].values() for c in d["groups"]})
    }
    test = preds.get("test")
    probs = calibrated.get("test") if test is not None else None
    if test is None or probs is None:
        return _finite(out)
    y = np.asarray(test.y, dtype=np.int64)
    out["subgroup_differences"] = subgroup_differences(
        probs, y, np.asarray(test.patient), test.groups, names, pos, level, n_boot, seed
    )
    site = next(
        (c for c in sorted(test.groups) if c.lower() in SITE_COLUMNS or c.lower().startswith("site")), None
    )
    if site is not None:
        out["site_heterogeneity"] = site_heterogeneity(
            probs, y, np.asarray(test.groups[site]), site, pos, level
        )
    out["error_analysis"] = error_analysis(probs, y, test, names, pos)
    return _finite(out)


def _finite(obj: Any) -> Any:
    """The block with every non-finite float as ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ------------------------------------------------------------------------------------------- sample size
def _events(y: np.ndarray, names: list[str]) -> dict[str, int]:
    return {n: int((y == k).sum()) for k, n in enumerate(names)}


def hanley_mcneil_se(auc: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC from its value and the class sizes (Hanley & McNeil 1982, eq. 2).

    Hand-written: neither scipy nor scikit-learn offers this planning formula (DeLong needs the scores, and
    the point here is what a split of this size can show, not the observed scores' variance).
    """
    if n_pos < 1 or n_neg < 1 or not math.isfinite(auc):
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    return float(math.sqrt(max(var, 0.0)))


def _z(level: float) -> float:
    return float(sps.norm.ppf(1 - (1 - level) / 2) + sps.norm.ppf(POWER))


def sample_size(
    preds: dict[str, Any],
    probs: dict[str, np.ndarray],
    names: list[str],
    pos: int | None,
    metrics: dict[str, Any],
    level: float,
    index_rows: list[dict[str, str]],
) -> dict[str, Any]:
    """Cases, patients and events per split, the smallest detectable differences, and size warnings."""
    splits: dict[str, Any] = {}
    if index_rows:
        tr = [
            r
            for r in index_rows
            if r.get("split") == "train" and str(r.get("label_index", "")).lstrip("-").isdigit()
        ]
        y_tr = np.array([int(r["label_index"]) for r in tr], dtype=np.int64)
        if len(tr):
            splits["train"] = _split_entry(y_tr, {r.get("patient_id") for r in tr}, names, pos, "train")
    for s in ("val", "calibration", "test"):
        if s in preds:
            sp = preds[s]
            splits[s] = _split_entry(np.asarray(sp.y), set(np.asarray(sp.patient).tolist()), names, pos, s)
    out: dict[str, Any] = {"min_events": MIN_EVENTS, "power": POWER, "ci_level": level, "splits": splits}
    warnings: list[dict[str, Any]] = []
    for s, e in splits.items():
        if s != "train" and e["min_events"] < MIN_EVENTS:
            warnings.append(
                {
                    "code": f"{s}_few_events",
                    "split": s,
                    "message": f"the {s} split has {e['min_events']} case(s) of its rarest class "
                    f"({e['rarest_class']}), under {MIN_EVENTS}: too few for {SPLIT_USE[s]}",
                }
            )
    conf = metrics.get("conformal") or {}
    alpha, n_cal = conf.get("alpha"), (splits.get("calibration") or {}).get("cases", 0)
    if alpha and "calibration" in splits:
        need = math.ceil(1 / alpha - 1)
        out["conformal_min_calibration_cases"] = need
        if n_cal < need:
            warnings.append(
                {
                    "code": "conformal_calibration_too_small",
                    "split": "calibration",
                    "message": f"conformal sets at alpha {alpha:g} need at least {need} calibration cases; "
                    f"there are {n_cal}: every set is the full label set",
                }
            )
        small = [c for c, n in splits["calibration"]["events"].items() if n < need]
        if small and n_cal >= need:
            warnings.append(
                {
                    "code": "conformal_class_too_small",
                    "split": "calibration",
                    "message": f"{len(small)} class(es) have fewer than {need} calibration cases "
                    f"({', '.join(small)}): their class-conditional sets always contain them",
                }
            )
    out["warnings"] = warnings
    test = preds.get("test")
    if test is not None and "test" in probs:
        out["detectable_difference"] = detectable_difference(
            probs["test"], np.asarray(test.y), names, pos, level
        )
    return out


def _split_entry(
    y: np.ndarray, patients: set, names: list[str], pos: int | None, split: str
) -> dict[str, Any]:
    ev = _events(y, names)
    rarest = min(ev, key=lambda c: (ev[c], names.index(c)))
    entry: dict[str, Any] = {
        "cases": int(len(y)),
        "patients": len(patients),
        "events": ev,
        "min_events": ev[rarest],
        "rarest_class": rarest,
        "use": SPLIT_USE[split],
    }
    if pos is not None:
        entry["positives"] = ev[names[pos]]
        entry["negatives"] = int(len(y)) - ev[names[pos]]
    return entry


def detectable_difference(
    probs: np.ndarray, y: np.ndarray, names: list[str], pos: int | None, level: float
) -> dict[str, Any]:
    """The smallest true difference from a fixed reference value the test split detects with 80% power.

    AUROC: ``(z_{1-a/2} + z_power) * SE`` with the Hanley-McNeil SE at the observed AUROC (binary; for
    more classes the worst one-vs-rest class). Sensitivity (binary, 0.5 rule): the same with the binomial
    SE over the positive cases. A difference smaller than these cannot be shown on this test split.
    """
    from sklearn.metrics import roc_auc_score

    z = _z(level)
    classes = [pos] if pos is not None else list(range(len(names)))
    worst: dict[str, Any] | None = None
    for k in classes:
        yk = y == k
        if yk.all() or not yk.any():
            continue
        auc = float(roc_auc_score(yk, probs[:, k]))
        se = hanley_mcneil_se(auc, int(yk.sum()), int((~yk).sum()))
        d = {"class": names[k], "auroc": auc, "se": se, "difference": z * se}
        if worst is None or d["difference"] > worst["difference"]:
            worst = d
    out: dict[str, Any] = {
        "method": "hanley_mcneil_1982",
        "alpha": 1 - level,
        "power": POWER,
        "auroc": worst,
    }
    if pos is not None:
        yp = y == pos
        n_pos = int(yp.sum())
        if n_pos:
            sens = float((probs[yp, pos] >= 0.5).mean())
            se = math.sqrt(max(sens * (1 - sens), 0.25 / n_pos) / n_pos)  # floor: avoid 0 at sens 0 or 1
            out["sensitivity"] = {"sensitivity": sens, "n_positive": n_pos, "se": se, "difference": z * se}
    return out


# ------------------------------------------------------------------------------------------ participants
def _index_rows(augment_dir: Path | None) -> list[dict[str, str]]:
    if augment_dir is None or not (Path(augment_dir) / "index.csv").exists():
        return []
    from pipeline.augment.stage import read_index

    return read_index(Path(augment_dir))


def participants(preds: dict[str, Any], names: list[str], index_rows: list[dict[str, str]]) -> dict[str, Any]:
    """Per split: cases, patients, cases per class and per subgroup value, missing subgroup values."""
    out: dict[str, Any] = {}
    group_cols = sorted({c for sp in preds.values() for c in sp.groups})
    tr = [r for r in index_rows if r.get("split") == "train"]
    if tr:
        labels = [r.get("label_index", "") for r in tr]
        groups = {c: np.array([r.get(c) or r.get(f"group_{c}") or "unknown" for r in tr]) for c in group_cols}
        out["train"] = _characteristics(
            np.array([int(v) if str(v).lstrip("-").isdigit() else -1 for v in labels]),
            {r.get("patient_id") for r in tr},
            groups,
            names,
        )
    for s in ("val", "calibration", "test"):
        if s in preds:
            sp = preds[s]
            out[s] = _characteristics(
                np.asarray(sp.y), set(np.asarray(sp.patient).tolist()), sp.groups, names
            )
    return out


def _characteristics(y: np.ndarray, patients: set, groups: dict[str, np.ndarray], names: list[str]) -> dict:
    per_class = _events(y, names)
    unlabelled = int((y < 0).sum())
    entry: dict[str, Any] = {"cases": int(len(y)), "patients": len(patients), "per_class": per_class}
    if unlabelled:
        entry["unlabelled"] = unlabelled
    entry["groups"], entry["missing"] = {}, {}
    for col, vals in sorted(groups.items()):
        v = np.asarray(vals).astype(str)
        miss = np.isin(v, MISSING)
        entry["missing"][col] = int(miss.sum())
        uniq, counts = np.unique(v[~miss], return_counts=True)
        entry["groups"][col] = {str(u): int(c) for u, c in zip(uniq, counts, strict=True)}
    return entry


# -------------------------------------------------------------------------------- subgroup differences
def _metric(samples: np.ndarray, value: float, bs: Bootstrap) -> dict[str, Any]:
    lo, hi = bs.ci(samples)
    ok = math.isfinite(value) and math.isfinite(lo) and math.isfinite(hi)
    return {
        "value": value if math.isfinite(value) else None,
        "ci": [lo, hi] if ok else None,
        "ci_method": "cluster_bootstrap" if bs.clustered else "bootstrap",
        "excludes_zero": bool(ok and (lo > 0 or hi < 0)),
    }


def subgroup_differences(
    probs: np.ndarray,
    y: np.ndarray,
    patient: np.ndarray,
    groups: dict[str, np.ndarray],
    names: list[str],
    pos: int | None,
    level: float,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Each group minus the largest group of its column, with paired bootstrap CIs (test split).

    Binary: AUROC, sensitivity and specificity at the 0.5 rule (their gaps are the equal-opportunity and
    false-positive-rate differences) and calibration-in-the-large (mean predicted minus observed risk).
    Multi-class: macro AUROC, accuracy and the top-label calibration gap (mean confidence minus accuracy).
    Cases without a value (``unknown``) are left out. Resampling is by patient over the whole test split,
    so each difference uses the same resamples for both groups.
    """
    bs = Bootstrap(
        len(y), n_boot, seed=np.random.SeedSequence([int(seed), 16]), clusters=patient, ci_level=level
    )
    ones = np.ones((1, len(y)))
    # name -> (vectorised statistic, per-case weight restricting it: positives, negatives or all)
    if pos is not None:
        yp = (y == pos).astype(np.float64)
        pred = (probs[:, pos] >= 0.5).astype(np.float64)
        base = {
            "auroc": (auroc_stat(probs[:, pos], yp.astype(bool)), np.ones_like(yp)),
            "sensitivity": (mean_stat(pred), yp),
            "specificity": (mean_stat(1 - pred), 1 - yp),
            "calibration_in_the_large": (mean_stat(probs[:, pos] - yp), np.ones_like(yp)),
        }
    else:
        correct = (probs.argmax(1) == y).astype(np.float64)
        base = {
            "macro_auroc": (macro_auroc_stat(probs, y), np.ones(len(y))),
            "accuracy": (mean_stat(correct), np.ones(len(y))),
            "confidence_gap": (mean_stat(probs.max(1) - correct), np.ones(len(y))),
        }
    out: dict[str, Any] = {}
    for col, vals in sorted(groups.items()):
        v = np.asarray(vals).astype(str)
        present = [g for g in np.unique(v) if g not in MISSING]
        if len(present) < 2:
            continue
        sizes = {g: int((v == g).sum()) for g in present}
        ref = max(present, key=lambda g: (sizes[g], g))
        ref_stats = _restricted(base, v == ref)
        ref_samples = bs.run(ref_stats)  # the same resamples on every run: differences are paired
        ref_point = {k: float(f(ones)[0]) for k, f in ref_stats.items()}
        col_out: dict[str, Any] = {"reference": ref, "reference_cases": sizes[ref], "groups": {}}
        for g in present:
            if g == ref:
                continue
            stats_ = _restricted(base, v == g)
            samples = bs.run(stats_)
            diffs = {
                k: _metric(samples[k] - ref_samples[k], float(f(ones)[0]) - ref_point[k], bs)
                for k, f in stats_.items()
            }
            col_out["groups"][g] = {"cases": sizes[g], "differences": diffs}
        out[col] = col_out
    return out


def _restricted(base: dict[str, tuple[Any, np.ndarray]], mask: np.ndarray) -> dict[str, Any]:
    """Each statistic of ``base`` on the cases of ``mask`` only (count weights outside it set to 0)."""
    m = mask.astype(np.float64)
    return {k: (lambda w, f=f, a=m * wt: f(w * a[None, :])) for k, (f, wt) in base.items()}


# ----------------------------------------------------------------------------------- site heterogeneity
def site_heterogeneity(
    probs: np.ndarray, y: np.ndarray, sites: np.ndarray, column: str, pos: int | None, level: float
) -> dict[str, Any]:
    """Per-site AUROC (binary) or accuracy and their DerSimonian-Laird random-effects summary.

    Hand-written (a few lines): the maintained implementation (statsmodels' ``combine_effects``) is not a
    dependency of this project. Sites with one class (no AUROC) are listed but left out of the summary.
    """
    s = np.asarray(sites).astype(str)
    rows, est, var = [], [], []
    for site in sorted(set(s.tolist()) - set(MISSING)):
        m = s == site
        row: dict[str, Any] = {"site": site, "cases": int(m.sum())}
        try:
            if pos is not None:
                row["events"] = int((y[m] == pos).sum())
                value, v = delong_roc_variance((y[m] == pos).astype(int), probs[m, pos])
                row["metric"] = "auroc"
            else:
                value = float((probs[m].argmax(1) == y[m]).mean())
                v = value * (1 - value) / max(int(m.sum()), 1)
                row["metric"] = "accuracy"
        except ValueError as err:
            row["error"] = str(err)
            rows.append(row)
            continue
        row.update(value=value, se=math.sqrt(max(v, 0.0)))
        rows.append(row)
        if v > 0:
            est.append(value)
            var.append(v)
    out: dict[str, Any] = {
        "column": column,
        "metric": "auroc" if pos is not None else "accuracy",
        "sites": rows,
    }
    if len(est) < 2:
        out["reason"] = "fewer than two sites with an estimate"
        return out
    e, w = np.asarray(est), 1.0 / np.asarray(var)
    fixed = float((w * e).sum() / w.sum())
    q = float((w * (e - fixed) ** 2).sum())
    df = len(e) - 1
    tau2 = max(0.0, (q - df) / (w.sum() - (w**2).sum() / w.sum()))
    wr = 1.0 / (np.asarray(var) + tau2)
    pooled = float((wr * e).sum() / wr.sum())
    se = math.sqrt(1.0 / wr.sum())
    z = float(sps.norm.ppf(1 - (1 - level) / 2))
    out.update(
        method="dersimonian_laird",
        pooled={"value": pooled, "ci": [pooled - z * se, pooled + z * se], "ci_method": "random_effects"},
        q=q,
        df=df,
        p_value=float(sps.chi2.sf(q, df)),
        i2=max(0.0, (q - df) / q) if q > 0 else 0.0,
        tau2=tau2,
    )
    return out


# ------------------------------------------------------------------------------------------ error analysis
def error_cases(
    y: np.ndarray, probs: np.ndarray, names: list[str], pos: int | None, n: int = ERROR_CASES
) -> dict[str, dict[str, list[int]]]:
    """Indices of the most confident false positives and false negatives, per class (binary: positive).

    False positive of class c: predicted c (binary: ``p >= 0.5``; else the arg-max), true class another,
    most confident first (highest p_c). False negative: true class c, not predicted, lowest p_c first.
    Ties go to the lower index (deterministic).
    """
    y = np.asarray(y)
    out: dict[str, dict[str, list[int]]] = {}
    for k in [pos] if pos is not None else range(len(names)):
        p = probs[:, k]
        pred_k = p >= 0.5 if pos is not None else probs.argmax(1) == k
        fp = np.flatnonzero(pred_k & (y != k))
        fn = np.flatnonzero(~pred_k & (y == k))
        out[names[k]] = {
            "false_positives": fp[np.lexsort((fp, -p[fp]))][:n].tolist(),
            "false_negatives": fn[np.lexsort((fn, p[fn]))][:n].tolist(),
        }
    return out


def error_analysis(probs: np.ndarray, y: np.ndarray, sp, names: list[str], pos: int | None) -> dict[str, Any]:
    """The most confident errors of the test split, by pseudonymous case and patient id."""
    pred = np.where(probs[:, pos] >= 0.5, pos, 1 - pos) if pos is not None else probs.argmax(1)
    classes = {}
    for cname, kinds in error_cases(y, probs, names, pos).items():
        k = names.index(cname)
        classes[cname] = {
            kind: [
                {
                    "case_id": str(sp.case[i]),
                    "patient_id": str(sp.patient[i]),
                    "true": names[int(y[i])],
                    "predicted": names[int(pred[i])],
                    "probability": float(probs[i, k]),
                }
                for i in idx
            ]
            for kind, idx in kinds.items()
        }
        classes[cname]["n_false_positives"] = int(((pred == k) & (y != k)).sum())
        classes[cname]["n_false_negatives"] = int(((pred != k) & (y == k)).sum())
    return {
        "rule": f"positive if p[{names[pos]}] >= 0.5" if pos is not None else "arg-max",
        "probabilities": "primary",
        "per_class": ERROR_CASES,
        "classes": classes,
    }
