"""Time the vectorised bootstrap of the AUROC: 2,000 resamples of 10,000 predictions (target < 2 s).

Run from the repository root: ``python bench/bootstrap_speed.py [--n 10000] [--resamples 2000]``.
Prints the best of ``--repeats`` wall-clock times for the case bootstrap and for the patient-cluster
bootstrap (3 cases per patient), and checks the bootstrap SD against the DeLong standard error.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.evaluate.delong import delong_roc_variance
from pipeline.stats.bootstrap import Bootstrap, auroc_stat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    y = rng.random(args.n) < 0.3
    scores = rng.normal(size=args.n) + 1.0 * y
    patients = np.repeat(np.arange((args.n + 2) // 3), 3)[: args.n]
    _, var = delong_roc_variance(y, scores)

    for label, clusters in (("case", None), ("cluster(3 cases/patient)", patients)):
        bs = Bootstrap(args.n, args.resamples, seed=args.seed, clusters=clusters)
        stat = {"auc": auroc_stat(scores, y)}
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            samples = bs.run(stat)["auc"]
            times.append(time.perf_counter() - t0)
        lo, hi = bs.ci(samples)
        print(
            f"{label:>26}: {args.resamples} resamples x {args.n} predictions: best {min(times):.3f} s "
            f"(all: {', '.join(f'{t:.3f}' for t in times)}); 95% CI [{lo:.4f}, {hi:.4f}]; "
            f"bootstrap SD {np.std(samples):.5f} vs DeLong SE {np.sqrt(var):.5f}"
        )


if __name__ == "__main__":
    main()
