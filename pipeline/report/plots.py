"""Report figures (matplotlib, Agg backend), returned as PNG bytes.

Each function takes predictions or metrics and draws one figure; nothing here reads files of a run or
computes a statistic (ROC points, reliability bins and decision curves come from the metrics).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def roc_figure(curves: dict[str, dict | None], auroc_text: dict[str, str] | None = None):
    """ROC curve(s) from the points in the metrics (``roc_curve`` of an evaluation block).

    Args:
        curves: Class name -> ``{"fpr": [...], "tpr": [...]}`` (None for a class without both outcomes):
            the positive class for binary tasks, one-vs-rest per class otherwise.
        auroc_text: Optional class name -> formatted AUROC for the legend.
    """
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, curve in curves.items():
        if not curve:
            continue
        label = name
        if auroc_text and name in auroc_text:
            label += f" (AUROC {auroc_text[name]})"
        ax.plot(curve["fpr"], curve["tpr"], lw=2, label=label)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title("ROC curve, test split")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    return fig


def reliability_figure(
    bins_before: list[dict],
    bins_after: list[dict] | None,
    xlabel: str,
    level: str = "95%",
    titles: tuple[str, str] = ("uncalibrated", "calibrated"),
):
    """Reliability diagrams before/after calibration from the metrics' reliability bins.

    ``level`` names the confidence level of the bars (``metrics.options.ci_level``).
    Each bin dict has ``mean_confidence``, ``observed_frequency``, ``observed_ci`` (Wilson) and
    ``count`` (see docs/metrics_schema.md); counts are written next to the points. With ``bins_after``
    None (no calibrator applied) only the uncalibrated panel is drawn.
    """
    panels = [b for b in (bins_before, bins_after) if b is not None]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels) - 0.4, 4.2), sharey=True, squeeze=False
    )
    axes = axes[0]
    for ax, bins, title in zip(axes, panels, titles[: len(panels)], strict=True):
        bins = [b for b in bins if b.get("count")]
        x = np.array([b["mean_confidence"] for b in bins], dtype=float)
        f = np.array([b["observed_frequency"] for b in bins], dtype=float)
        lo = np.array([b["observed_ci"][0] for b in bins], dtype=float)
        hi = np.array([b["observed_ci"][1] for b in bins], dtype=float)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        yerr = np.clip(np.vstack([f - lo, hi - f]), 0, None)
        ax.errorbar(x, f, yerr=yerr, fmt="o-", ms=4, capsize=2, label=f"observed ({level} CI)")
        for b, cx, fy in zip(bins, x, f, strict=True):
            ax.annotate(
                str(b["count"]),
                (cx, fy),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=6,
                color="dimgray",
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"Reliability, {title}")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("observed frequency")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def history_figure(history: list[dict[str, str]]):
    """Training curves: losses and validation AUROC per epoch."""
    ep = [int(h["epoch"]) for h in history]
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.plot(ep, [float(h["train_loss"]) for h in history], label="train loss")
    ax.plot(ep, [float(h["val_loss"]) for h in history], label="val loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax2 = ax.twinx()
    auc = [float(h["val_auroc"]) if h["val_auroc"] not in ("", "nan") else np.nan for h in history]
    ax2.plot(ep, auc, c="tab:green", label="val AUROC")
    best = [int(h["epoch"]) for h in history if h.get("best") in ("True", "true", "1")]
    if best:
        ax2.axvline(best[-1], c="tab:green", ls=":", lw=1)
    ax2.set_ylabel("val AUROC")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, fontsize=8, loc="center right")
    ax.set_title("Training (dotted line: kept checkpoint)")
    fig.tight_layout()
    return fig


def histogram_figure(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    positive_index: int | None,
    thresholds: dict[str, float] | None = None,
):
    """Distribution of the calibrated positive-class probability (or top confidence) per true class."""
    fig, ax = plt.subplots(figsize=(7.2, 3.2))
    col = positive_index if (probs.shape[1] == 2 and positive_index is not None) else None
    for k, name in enumerate(class_names):
        vals = probs[y == k, col] if col is not None else probs[y == k].max(1)
        if len(vals):
            ax.hist(vals, bins=np.linspace(0, 1, 26), alpha=0.5, label=f"true {name} (n={len(vals)})")
    styles = ["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 1))]
    for i, (name, t) in enumerate((thresholds or {}).items()):
        ax.axvline(t, ls=styles[i % len(styles)], lw=1.2, c="k", label=f"{name} ({t:.2f})")
    what = f"P({class_names[col]})" if col is not None else "top-class confidence"
    ax.set_xlabel(f"calibrated {what}")
    ax.set_ylabel("test cases")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def decision_curve_figure(curve: dict):
    """Net benefit of the model against treat-all and treat-none."""
    t = np.asarray(curve["thresholds"], dtype=float)
    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    ax.plot(t, curve["model"], label="model (calibrated)")
    ax.plot(t, curve["treat_all"], label="treat all", ls="--")
    ax.plot(t, np.zeros_like(t), label="treat none", ls=":")
    top = max(np.nanmax(np.asarray(curve["model"], dtype=float)), 0.05)
    ax.set_ylim(-0.05, top * 1.15)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title("Decision curve, test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def label_efficiency_figure(
    runs: list[dict], metric: str = "AUROC", key: str = "test_auroc", split: str = "test", level: str = "95%"
):
    """AUROC (CI bars at ``level``) against the share of training labels, one line per strategy.

    Each run dict has ``strategy``, ``label_fraction`` and ``key`` (``{"value", "ci"}``, or None / absent
    when not scored); ``split`` names the split on the axis and in the title.
    """
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    strategies = list(dict.fromkeys(r["strategy"] for r in runs))
    for j, strat in enumerate(strategies):
        pts = sorted(
            (r["label_fraction"], r[key])
            for r in runs
            if r["strategy"] == strat and isinstance(r.get(key), dict) and r[key].get("value") is not None
        )
        if not pts:
            continue
        x = np.array([p[0] for p in pts]) * (
            1 + 0.025 * (j - (len(strategies) - 1) / 2)
        )  # dodge overlapping bars
        v = np.array([p[1]["value"] for p in pts], dtype=float)
        lo = np.array([p[1]["ci"][0] if p[1]["ci"][0] is not None else np.nan for p in pts], dtype=float)
        hi = np.array([p[1]["ci"][1] if p[1]["ci"][1] is not None else np.nan for p in pts], dtype=float)
        yerr = np.nan_to_num(np.clip(np.vstack([v - lo, hi - v]), 0, None))
        ax.errorbar(x, v, yerr=yerr, fmt="o-", capsize=3, label=strat)
    fr = sorted({r["label_fraction"] for r in runs})
    ax.set_xscale("log")
    ax.set_xticks(fr)
    ax.set_xticklabels([f"{f:.0%}" for f in fr])
    ax.minorticks_off()
    ax.axhline(0.5, c="grey", lw=0.8, ls=":")
    ax.set_xlabel("share of training labels used")
    ax.set_ylabel(f"{split} {metric} ({level} CI)")
    ax.set_title(f"Label efficiency, {split} split")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _middle_slices(vol: np.ndarray) -> list[np.ndarray]:
    d, h, w = vol.shape
    return [vol[d // 2], vol[:, h // 2, :], vol[:, :, w // 2]]


def explanation_figure(images: np.ndarray, cams: np.ndarray, cases: Sequence[Any]):
    """Overlay figure: each case's input (grey, or in colour for three-channel 2D input) with its Grad-CAM
    map.

    Args:
        images: Inputs, (N, C, H, W) or (N, C, D, H, W), in the order of ``cases``.
        cams: Maps from :func:`grad_cam`, (N, H, W) or (N, D, H, W).
        cases: The explained cases (``pipeline.evaluate.gradcam.CamCase``: captions use the pseudonymous
            case id only).

    Returns:
        A matplotlib figure (2D: one panel per case; 3D: a row of three orthogonal middle slices per case).
    """
    n = len(cases)
    three_d = cams.ndim == 4
    if three_d:
        fig, axes = plt.subplots(n, 3, figsize=(6.6, 2.6 * n), squeeze=False)
    else:
        cols = min(n, 4) if n else 1
        rows = int(np.ceil(n / cols)) if n else 1
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, case in enumerate(cases):
        colour = not three_d and np.shape(images[i])[0] == 3
        img = np.asarray(images[i] if colour else images[i][0], dtype=np.float32)
        if colour:  # (3, H, W) -> (H, W, 3), one scale for all channels so hues are kept
            img = np.moveaxis(img, 0, -1)
            img = np.clip((img - img.min()) / max(float(img.max() - img.min()), 1e-6), 0, 1)
        pairs = (
            list(zip(_middle_slices(img), _middle_slices(cams[i]), strict=True))
            if three_d
            else [(img, cams[i])]
        )
        panel = axes[i] if three_d else [axes.ravel()[i]]
        for j, (ax, (im, cam)) in enumerate(zip(panel, pairs, strict=False)):
            ax.imshow(im, cmap=None if colour else "gray", interpolation="nearest")
            ax.imshow(cam, cmap="jet", alpha=0.35, vmin=0, vmax=1, interpolation="bilinear")
            if j == 0:
                mark = "correct" if case.correct else "WRONG"
                ax.set_title(
                    f"{case.case_id[:16]}\n{mark}: true {case.true_name[:18]}\n"
                    f"predicted {case.pred_name[:18]} (p={case.prob:.2f})",
                    fontsize=7,
                    color="black" if case.correct else "firebrick",
                )
    fig.tight_layout(h_pad=1.2)
    return fig


def flow_figure(boxes: list[tuple[str, list[str]]], exclusions: list[str], splits: list[str]):
    """Participant-flow diagram: a column of boxes, the exclusions beside the first arrow, then one box per
    split (every text is already formatted from counts by the caller)."""
    from matplotlib.patches import FancyBboxPatch

    n_rows = len(boxes) + 1
    fig, ax = plt.subplots(figsize=(7.5, 1.25 * n_rows + 0.4))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, n_rows)
    ax.axis("off")

    def box(x: float, y: float, w: float, text: str, fc: str = "#dbe9f6", ec: str = "C0") -> None:
        ax.add_patch(
            FancyBboxPatch((x - w / 2, y - 0.35), w, 0.7, boxstyle="round,pad=0.05", fc=fc, ec=ec, lw=1.5)
        )
        ax.text(x, y, text, ha="center", va="center", fontsize=7.5, wrap=True)

    for i, (title, lines) in enumerate(boxes):
        y = n_rows - 0.5 - i
        box(4.0, y, 5.0, "\n".join([title] + lines))
        if i < len(boxes) - 1 or splits:
            ax.annotate("", (4.0, y - 0.95), (4.0, y - 0.4), arrowprops={"arrowstyle": "->", "color": "C0"})
        if i == 0 and exclusions:
            box(8.4, y - 0.5, 3.0, "\n".join(["excluded, by code:"] + exclusions), fc="#f9dcdc", ec="C3")
            ax.annotate("", (6.85, y - 0.5), (4.0, y - 0.5), arrowprops={"arrowstyle": "->", "color": "C3"})
    w = 10.0 / max(len(splits), 1)
    for j, text in enumerate(splits):
        box(w * (j + 0.5), 0.5, w - 0.25, text, fc="#dcf0dc", ec="C2")
    fig.tight_layout()
    return fig
