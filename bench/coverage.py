"""Coverage of the report's intervals on simulated small test sets.

Run from the repository root::

    OMP_NUM_THREADS=1 python bench/coverage.py --replicates 2000 --seed 20261203 --out coverage.json

Simulator (binormal model with patient clusters). A patient has disease ``D ~ Bernoulli(prevalence)``
and ``m`` images (``m = 1`` without clusters; 1-4 images, mean 2, with clusters); every image carries the
patient's label ``y = D``. Image ``j`` of patient ``i`` has the score ``s_ij = mu * D + u_i + e_ij`` with a
patient effect ``u_i ~ N(0, rho)`` and ``e_ij ~ N(0, 1 - rho)``, so marginally ``s | D ~ N(mu D, 1)`` and
the true probability of an image is ``p(s) = P(D = 1 | s)``, with ``logit p = log(pi / (1 - pi)) + mu s -
mu^2 / 2``. Images of one patient share the label and have correlated scores: a clustered test set.
The model's probability is ``logit q = b0 + b1 logit p``: well calibrated (``b0 = 0, b1 = 1``),
over-confident (``b1 > 1``) or under-confident (``b1 < 1``), optionally shifted (``b0``).

The true (population, per-image) value of every metric is computed by numerical integration over the
score density ``pi N(mu, 1) + (1 - pi) N(0, 1)`` on a fine grid (ECE with the same 15 equal-width bins as
the report, from the true probabilities; equal-mass bins at the population quantiles of ``q``).

Each replicate draws a test set (and a calibration set of the same size for the conformal sets), runs the
report's code (``discrimination_block``, ``calibration_block`` with ``--bootstrap`` resamples,
``SplitConformal``) and records whether each interval holds the true value; for conformal sets the
share of test images whose set holds the true label (nominal ``1 - alpha``), overall and per class.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.special import expit, logit
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluate.calibration_metrics import binned_error_ci, calibration_block  # noqa: E402
from pipeline.evaluate.conformal import SplitConformal  # noqa: E402
from pipeline.evaluate.summary import CONFORMAL_METHODS  # noqa: E402
from pipeline.evaluate.discrimination import discrimination_block  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.stats.bootstrap import Bootstrap  # noqa: E402

N_BINS = 15
#: Lower and upper tolerance of a coverage share around its nominal level.
BAND = (0.02, 0.025)


@dataclass(frozen=True)
class Scenario:
    """One simulated setting.

    Args:
        name: Key in the output.
        n: Test images per replicate.
        prevalence: P(D = 1) per patient (and per image).
        mu: Separation of the binormal scores (AUROC = Phi(mu / sqrt(2))).
        b0: Calibration shift of the model: ``logit q = b0 + b1 logit p``.
        b1: Calibration slope of the model (> 1 over-confident, < 1 under-confident).
        clustered: 1-4 images per patient (shared label, correlated scores) instead of one.
        rho: Share of the score variance that is the patient effect (clustered only).
    """

    name: str
    n: int
    prevalence: float
    mu: float
    b0: float
    b1: float
    clustered: bool
    rho: float = 0.5


CALIBRATIONS = {"well": (0.0, 1.0), "over": (0.0, 1.8), "under": (0.3, 0.6)}


def scenarios(sizes: tuple[int, ...] = (150, 500)) -> list[Scenario]:
    """Well / over- / under-confident models at each size, with and without clusters."""
    out = []
    for n in sizes:
        for clustered in (False, True):
            for cal, (b0, b1) in CALIBRATIONS.items():
                prev = 0.2 if cal == "over" else 0.3
                name = f"{cal}_n{n}_{'clustered' if clustered else 'independent'}"
                out.append(Scenario(name, n, prev, 1.8, b0, b1, clustered))
    return out


# ------------------------------------------------------------------------------------------ simulator
def _logit_p(sc: Scenario, s: np.ndarray) -> np.ndarray:
    pi = sc.prevalence
    return np.log(pi / (1 - pi)) + sc.mu * s - sc.mu**2 / 2


def model_probability(sc: Scenario, s: np.ndarray) -> np.ndarray:
    """The simulated model's probability of disease for scores ``s``."""
    return expit(sc.b0 + sc.b1 * _logit_p(sc, s))


def draw(sc: Scenario, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``n`` images: ``(q, y, patient)``."""
    if sc.clustered:
        m = rng.choice([1, 2, 3, 4], size=n, p=[0.4, 0.3, 0.2, 0.1])
        m = m[: int(np.searchsorted(np.cumsum(m), n)) + 1]
        patient = np.repeat(np.arange(len(m)), m)[:n]
        rho = sc.rho
    else:
        patient = np.arange(n)
        rho = 0.0
    g = int(patient.max()) + 1
    d = rng.random(g) < sc.prevalence
    u = rng.normal(0.0, np.sqrt(rho), g)
    s = sc.mu * d[patient] + u[patient] + rng.normal(0.0, np.sqrt(1 - rho), n)
    return model_probability(sc, s), d[patient].astype(np.int64), patient


# --------------------------------------------------------------------------------- population values
def _recalibration(x: np.ndarray, p: np.ndarray, w: np.ndarray, offset: bool) -> np.ndarray:
    """Population logistic fit of ``logit P(y) = a + b x`` (b fixed at 1 with ``offset``): Newton."""
    theta = np.array([0.0, 1.0])
    for _ in range(100):
        eta = theta[0] + theta[1] * x
        mu = expit(eta)
        g = np.array([np.sum(w * (p - mu)), np.sum(w * (p - mu) * x)])
        v = w * mu * (1 - mu)
        h = np.array([[v.sum(), (v * x).sum()], [(v * x).sum(), (v * x * x).sum()]])
        step = np.array([g[0] / h[0, 0], 0.0]) if offset else np.linalg.solve(h, g)
        theta = theta + step
        if np.abs(step).max() < 1e-12:
            break
    return theta


def _binned_population(q: np.ndarray, p: np.ndarray, w: np.ndarray, edges: np.ndarray) -> dict:
    ids = np.searchsorted(edges[1:-1], q)
    nb = len(edges) - 1
    mass = np.bincount(ids, weights=w, minlength=nb)
    gap = np.bincount(ids, weights=w * (p - q), minlength=nb)
    keep = mass > 1e-12
    return {
        "ece": float(np.abs(gap).sum()),
        "mce": float(np.max(np.abs(gap[keep] / mass[keep]))),
        "l2": float(np.sqrt(np.sum(gap[keep] ** 2 / mass[keep]))),
    }


def population(sc: Scenario, grid: int = 400_001) -> dict[str, float]:
    """True per-image values of every metric (numerical integration over the score density)."""
    s = np.linspace(-9.0, 9.0 + sc.mu, grid)
    ds = s[1] - s[0]
    pi = sc.prevalence
    f1, f0 = pi * norm.pdf(s - sc.mu) * ds, (1 - pi) * norm.pdf(s) * ds
    w = f1 + f0
    p = expit(_logit_p(sc, s))
    q = model_probability(sc, s)
    x = logit(np.clip(q, 1e-12, 1 - 1e-12))
    out: dict[str, float] = {}
    out["auroc"] = float(norm.cdf(sc.mu / np.sqrt(2)))
    # average precision = integral of precision over recall (scores decreasing)
    tp = np.cumsum(f1[::-1])
    fp = np.cumsum(f0[::-1])
    out["auprc"] = float(np.sum(f1[::-1] * tp / (tp + fp)) / f1.sum())
    pos = q >= 0.5
    tp, fn = f1[pos].sum(), f1[~pos].sum()
    fp, tn = f0[pos].sum(), f0[~pos].sum()
    total = tp + fn + fp + tn
    out["prevalence"] = pi
    out["sensitivity"] = tp / (tp + fn)
    out["specificity"] = tn / (tn + fp)
    out["ppv"] = tp / (tp + fp)
    out["npv"] = tn / (tn + fn)
    out["accuracy"] = (tp + tn) / total
    out["balanced_accuracy"] = (out["sensitivity"] + out["specificity"]) / 2
    out["f1"] = 2 * tp / (2 * tp + fp + fn)
    out["brier"] = float(np.sum(w * (q * q - 2 * q * p + p)) / w.sum())
    qc = np.clip(q, 1e-15, 1 - 1e-15)
    out["nll"] = float(np.sum(w * -(p * np.log(qc) + (1 - p) * np.log(1 - qc))) / w.sum())
    wn = w / w.sum()
    uni = _binned_population(q, p, wn, np.linspace(0.0, 1.0, N_BINS + 1))
    cdf = np.cumsum(wn)
    qedges = np.interp(np.linspace(0.0, 1.0, N_BINS + 1), cdf, q)  # q increases with s
    qedges[0], qedges[-1] = 0.0, 1.0
    mass = _binned_population(q, p, wn, qedges)
    out["ece"], out["mce"] = uni["ece"], uni["mce"]
    out["ece_equal_mass"], out["l2_ce_debiased"] = mass["ece"], mass["l2"]
    out["calibration_intercept"] = float(_recalibration(x, p, wn, offset=True)[0])
    out["calibration_slope"] = float(_recalibration(x, p, wn, offset=False)[1])
    return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------- replicates
DISCRIMINATION = (
    "auroc",
    "auprc",
    "prevalence",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "accuracy",
    "balanced_accuracy",
    "f1",
)
CALIBRATION = (
    "brier",
    "nll",
    "ece",
    "ece_equal_mass",
    "l2_ce_debiased",
    "calibration_intercept",
    "calibration_slope",
)
ERRORS = ("ece", "ece_equal_mass", "l2_ce_debiased")
CONFORMAL = CONFORMAL_METHODS  # the sets the report prints
CLASS_NAMES = ["negative", "positive"]


def conformal_keys(promised: bool = True) -> list[str]:
    """Conformal shares: marginal coverage of every method and per-class coverage of Mondrian sets (the
    promised ones) or per-class coverage of the marginal methods (``promised=False``: no guarantee)."""
    keys = []
    for method, randomized, mondrian in CONFORMAL:
        key = f"conformal_{method}" + ("_randomized" if randomized else "_mondrian" if mondrian else "")
        per_class = [f"{key}[{c}]" for c in CLASS_NAMES]
        keys += ([key] + per_class if mondrian else [key]) if promised else ([] if mondrian else per_class)
    return keys


def _covers(entry: dict, truth: float) -> float:
    lo, hi = entry["ci"]
    if lo is None or hi is None:
        return float("nan")
    return float(lo - 1e-12 <= truth <= hi + 1e-12)


def replicate(
    sc: Scenario,
    truth: dict[str, float],
    seq: np.random.SeedSequence,
    n_boot: int,
    alpha: float,
    errors_only: bool = False,
) -> dict:
    """One simulated test (and calibration) set: 1.0 / 0.0 per interval (covered or not), conformal shares.

    ``errors_only``: only the binned calibration errors' intervals (``binned_error_ci``, the same call
    ``calibration_block`` makes), for runs that need many replicates of them quickly.
    """
    draw_seq, boot_seq = seq.spawn(2)
    rng = np.random.default_rng(draw_seq)
    q, y, patient = draw(sc, sc.n, rng)
    probs = np.column_stack([1 - q, q])
    bs = Bootstrap(sc.n, n_boot, seed=boot_seq, clusters=patient, strata=y)  # as Evaluate builds it
    if errors_only:
        cis = binned_error_ci(q, y.astype(np.float64), bs, N_BINS)
        return {m: float(cis[m][0] - 1e-12 <= truth[m] <= cis[m][1] + 1e-12) for m in ERRORS}
    disc = discrimination_block(probs, y, "binary", CLASS_NAMES, 1, bs)
    cal = calibration_block(probs, y, "binary", 1, bs, N_BINS)
    out = {m: _covers(disc[m], truth[m]) for m in DISCRIMINATION}
    out.update({m: _covers(cal[m], truth[m]) for m in CALIBRATION})
    qc, yc, _ = draw(sc, sc.n, rng)  # the calibration split of the conformal sets
    pc = np.column_stack([1 - qc, qc])
    for method, randomized, mondrian in CONFORMAL:
        key = f"conformal_{method}" + ("_randomized" if randomized else "_mondrian" if mondrian else "")
        cp = SplitConformal(
            alpha, method, randomized, random_state=int(rng.integers(2**31)), class_conditional=mondrian
        ).fit(pc, yc)
        covered = cp.predict_sets(probs)[np.arange(sc.n), y]
        out[key] = float(covered.mean())
        for j, c in enumerate(CLASS_NAMES):
            out[f"{key}[{c}]"] = float(covered[y == j].mean()) if np.any(y == j) else float("nan")
    return out


def _work(args: tuple) -> list[dict]:
    sc, truth, seed, index, first, count, n_boot, alpha, errors_only = args
    return [
        replicate(sc, truth, np.random.SeedSequence([seed, index, r]), n_boot, alpha, errors_only)
        for r in range(first, first + count)
    ]


def run(
    chosen: list[Scenario],
    replicates: int,
    seed: int,
    n_boot: int,
    alpha: float,
    jobs: int,
    level: float = 0.95,
    errors_only: bool = False,
) -> dict:
    """Coverage of every interval per scenario, pooled, and whether all lie in the band."""
    from multiprocessing import get_context

    truths = [population(sc) for sc in chosen]
    chunk = max(1, min(100, replicates // max(1, 4 * jobs)))
    tasks = [
        (sc, truths[i], seed, i, first, min(chunk, replicates - first), n_boot, alpha, errors_only)
        for i, sc in enumerate(chosen)
        for first in range(0, replicates, chunk)
    ]
    parts = []
    with get_context("fork").Pool(jobs) as pool:
        for i, part in enumerate(pool.imap(_work, tasks, chunksize=1)):
            parts.append(part)
            print(f"\r{i + 1}/{len(tasks)} chunks", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows: dict[str, list[dict]] = {sc.name: [] for sc in chosen}
    for t, part in zip(tasks, parts, strict=True):
        rows[t[0].name].extend(part)
    nominal = {m: level for m in (ERRORS if errors_only else DISCRIMINATION + CALIBRATION)}
    if not errors_only:
        nominal.update({k: 1.0 - alpha for k in conformal_keys()})
    by_scenario = {
        name: {m: float(np.nanmean([r[m] for r in rs])) for m in nominal} for name, rs in rows.items()
    }
    pooled = {m: float(np.nanmean([r[m] for rs in rows.values() for r in rs])) for m in nominal}
    unpromised = {
        name: {m: float(np.nanmean([r[m] for r in rs])) for m in conformal_keys(promised=False)}
        for name, rs in rows.items()
        if not errors_only
    }
    failures = [
        f"{name}: {m} {share:.3f} (nominal {nominal[m]:.2f})"
        for name, shares in by_scenario.items()
        for m, share in shares.items()
        if not nominal[m] - BAND[0] <= share <= nominal[m] + BAND[1]
    ]
    return {
        "replicates": replicates,
        "seed": seed,
        "n_bootstrap": n_boot,
        "band": [-BAND[0], BAND[1]],
        "nominal": nominal,
        "coverage": pooled,
        "by_scenario": by_scenario,
        "conformal_per_class_of_marginal_sets": unpromised,
        "true_values": {sc.name: t for sc, t in zip(chosen, truths, strict=True)},
        "scenarios": {sc.name: sc.__dict__ for sc in chosen},
        "not_measured": {"mce": "reported without an interval (ci: null, see ci_note)"},
        "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicates", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=20261203)
    ap.add_argument("--bootstrap", type=int, default=500, help="resamples inside each replicate")
    ap.add_argument("--alpha", type=float, default=0.1, help="conformal miscoverage")
    ap.add_argument("--sizes", type=int, nargs="+", default=[150, 500])
    ap.add_argument("--only", default="", help="comma-separated substrings of scenario names to keep")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--errors-only", action="store_true", help="only the ECE / equal-mass ECE / debiased L2 intervals"
    )
    args = ap.parse_args(argv)
    chosen = [
        sc
        for sc in scenarios(tuple(args.sizes))
        if not args.only or any(part in sc.name for part in args.only.split(","))
    ]
    t0 = time.perf_counter()
    res = run(
        chosen,
        args.replicates,
        args.seed,
        args.bootstrap,
        args.alpha,
        args.jobs,
        errors_only=args.errors_only,
    )
    res["seconds"] = round(time.perf_counter() - t0, 1)
    names = list(res["by_scenario"])
    print(f"{'metric':<34}{'nominal':>8}" + "".join(f"{n:>28}" for n in names))
    for m, nom in res["nominal"].items():
        print(f"{m:<34}{nom:>8.2f}" + "".join(f"{res['by_scenario'][n][m]:>28.3f}" for n in names))
    print(f"{res['seconds']} s; {len(res['failures'])} share(s) outside the band")
    for f in res["failures"]:
        print("  outside:", f)
    if args.out is not None:
        write_json(args.out, res)
    return 0 if not res["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
