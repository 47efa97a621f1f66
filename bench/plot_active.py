"""Label-efficiency curves of one or more ``bench/active.py`` results (seeds pooled): the mean
whole-test-set AUC per round and strategy with the range over seeds as a PNG, a Markdown table, and each
strategy's paired difference with random over seeds x rounds (t interval, as ``bench/active.py``) and
over per-seed means (t interval on seeds - 1 dof).

    python bench/plot_active.py OUT.png RESULT.json [RESULT.json ...]
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import t  # noqa: E402


def merge(paths: list[Path]) -> dict:
    """Pool the seeds of several results with the same rounds; strategies present in every file."""
    docs = [json.loads(p.read_text()) for p in paths]
    rounds = docs[0]["rounds"]
    if any(d["rounds"] != rounds for d in docs):
        raise SystemExit("plot_active: the results have different rounds")
    names = [s for s in docs[0]["per_seed"] if all(s in d["per_seed"] for d in docs)]
    per_seed = {s: {k: v for d in docs for k, v in d["per_seed"][s].items()} for s in names}
    return {"dataset": docs[0]["dataset"], "default": docs[-1]["default_strategy"], "rounds": rounds,
            "per_seed": per_seed}


def paired(per_seed: dict, name: str) -> tuple[float, float, float, int]:
    """Mean difference with random over seeds x chosen rounds (round 0 is the shared start) and its CI."""
    seeds = sorted(set(per_seed[name]) & set(per_seed["random"]))
    d = np.array([np.array(per_seed[name][k]) - np.array(per_seed["random"][k]) for k in seeds])[:, 1:].ravel()
    return _t_interval(d)


def per_seed_paired(per_seed: dict, name: str) -> tuple[float, float, float, int]:
    """The same difference averaged within each seed first, t interval over seeds: the rounds of one seed
    share their starting set and model, so they are not independent pairs."""
    seeds = sorted(set(per_seed[name]) & set(per_seed["random"]))
    d = np.array([np.mean(np.array(per_seed[name][k][1:]) - np.array(per_seed["random"][k][1:])) for k in seeds])
    return _t_interval(d)


def _t_interval(d: np.ndarray) -> tuple[float, float, float, int]:
    """Mean of the differences ``d``, its 95% t interval and the count."""
    m, sd = float(d.mean()), float(d.std(ddof=1))
    h = float(t.ppf(0.975, len(d) - 1) * sd / math.sqrt(len(d)))
    return m, m - h, m + h, len(d)


def main(argv: list[str] | None = None) -> int:
    args = argv or sys.argv[1:]
    dst, srcs = Path(args[0]), [Path(a) for a in args[1:]]
    doc = merge(srcs)
    rounds, n_seeds = doc["rounds"], len(next(iter(doc["per_seed"].values())))
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    print(
        "| strategy | " + " | ".join(f"{r} labels" for r in rounds)
        + " | vs random, seeds x rounds (95% CI) | vs random, per-seed means (95% CI) |"
    )
    print("|---" * (len(rounds) + 3) + "|")
    for name, seeds in doc["per_seed"].items():
        v = np.array(list(seeds.values()), dtype=float)  # seeds x rounds
        label = f"{name} (default)" if name == doc["default"] else name
        ax.plot(rounds, v.mean(axis=0), "--" if name == "random" else "-", marker="o", label=label)
        ax.fill_between(rounds, v.min(axis=0), v.max(axis=0), alpha=0.15)
        diff = " | "
        if name != "random" and "random" in doc["per_seed"]:
            m, lo, hi, n = paired(doc["per_seed"], name)
            ms, los, his, ns = per_seed_paired(doc["per_seed"], name)
            diff = f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}], n = {n} | {ms:+.3f} [{los:+.3f}, {his:+.3f}], {ns} seeds"
        print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in v.mean(axis=0)) + f" | {diff} |")
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test AUC (whole official test set)")
    ax.set_title(f"{doc['dataset']}: labelling rounds, {n_seeds} seeds (band: min-max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst)
    print(dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
