"""Plot the label-efficiency curves of a ``bench/active.py`` result: mean whole-test-set AUC per round and
strategy, with the range over seeds, as a PNG for BENCHMARKS.md.

    python bench/plot_active.py bench/results/active_breast_3s.json docs/img/active_breastmnist.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    src, dst = (Path(a) for a in (argv or sys.argv[1:]))
    doc = json.loads(src.read_text())
    rounds = doc["rounds"]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, seeds in doc["per_seed"].items():
        v = np.array(list(seeds.values()), dtype=float)  # seeds x rounds
        style = "--" if name == "random" else "-"
        label = f"{name} (default)" if name == doc["default_strategy"] else name
        ax.plot(rounds, v.mean(axis=0), style, marker="o", label=label)
        ax.fill_between(rounds, v.min(axis=0), v.max(axis=0), alpha=0.15)
    ax.set_xlabel("labelled training cases")
    ax.set_ylabel("test AUC (whole official test set)")
    ax.set_title(f"{doc['dataset']}: labelling rounds, {doc['seeds']} seeds (band: min-max)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst)
    print(dst)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
