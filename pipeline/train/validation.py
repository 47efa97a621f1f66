"""The validation score every training decision uses (early stopping, strategy and fold selection)."""

from __future__ import annotations

import numpy as np


def val_score(y: np.ndarray, probs: np.ndarray, positive_index: int | None) -> float:
    """Validation AUROC: the positive class's (binary), macro one-vs-rest otherwise (NaN if undefined)."""
    from sklearn.metrics import roc_auc_score

    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        pos = 1 if positive_index is None else positive_index
        return float(roc_auc_score(y == pos, probs[:, pos]))
    try:
        return float(
            roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1])))
        )
    except ValueError:
        return float("nan")

