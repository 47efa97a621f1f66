"""The validation score every training decision uses (early stopping, strategy and fold selection)."""

from __future__ import annotations

import numpy as np


def val_score(y: np.ndarray, probs: np.ndarray, positive_index: int | None) -> float:
    """Validation AUROC: the positive class's (binary), macro one-vs-rest otherwise (NaN if undefined).

    Multilabel (``y`` of shape ``(N, F)``, 0/1 per finding; ``probs`` the ``(N, F)`` sigmoids): the macro
    AUROC over the findings that have positive and negative cases (NaN when none has).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    if y.ndim == 2:
        aucs = [
            float(roc_auc_score(y[:, j] > 0.5, probs[:, j]))
            for j in range(y.shape[1])
            if 0 < (y[:, j] > 0.5).sum() < len(y)
        ]
        return float(np.mean(aucs)) if aucs else float("nan")
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


def multilabel_refusals(cfg) -> list[tuple[str, str]]:
    """``(field, message)`` for each training setting a multilabel task cannot use (empty otherwise).

    Refused: ``train.strategy: linear_probe`` and ``train.probe_init`` (the probe is a single-label
    logistic regression), ``train.semi_supervised: pseudo_label`` / ``mean_teacher`` (single-label),
    ``evaluate.study_label_fractions`` (the transfer study selects and compares single-label models),
    ``evaluate.external`` (:func:`pipeline.ops.external.validate_external` is single-label);
    ``auto`` candidates and ``semi_supervised: auto`` are narrowed instead, with a log line, by
    :func:`multilabel_training`.
    """
    if not cfg.task.multilabel:
        return []
    tc, out = cfg.train, []
    if tc.strategy == "linear_probe":
        out.append(
            ("train.strategy", "'linear_probe' is single-label; expected partial, finetune, gradual, scratch")
        )
    if tc.strategy == "auto" and set(tc.auto_candidates) <= {"linear_probe"}:
        out.append(("train.auto_candidates", "only 'linear_probe', which is single-label; add 'finetune'"))
    if tc.probe_init:
        out.append(("train.probe_init", "the linear probe is single-label; expected false"))
    if tc.semi_supervised in ("pseudo_label", "mean_teacher"):
        out.append(
            ("train.semi_supervised", "its methods are single-label; expected 'off' or 'auto' (= off)")
        )
    if cfg.evaluate.study_label_fractions:  # it would train its models for nothing
        out.append(("evaluate.study_label_fractions", "the transfer study is single-label; expected none"))
    if cfg.evaluate.external:
        out.append(("evaluate.external", "external validation is single-label so far; expected none"))
    return [(f, f"{f}: {m} (task.kind: multilabel)") for f, m in out]


def multilabel_training(cfg, log) -> tuple[tuple[str, ...], str]:
    """The ``auto`` candidates and the ``semi_supervised`` setting a multilabel run trains with.

    Raises:
        ConfigError: code ``multilabel_unsupported``, naming the first refused field
            (:func:`multilabel_refusals`).
    """
    from pipeline.errors import ConfigError

    tc = cfg.train
    refused = multilabel_refusals(cfg)
    if refused:
        raise ConfigError(refused[0][1], code="multilabel_unsupported")
    if not cfg.task.multilabel:
        return tuple(tc.auto_candidates), tc.semi_supervised
    candidates = tuple(c for c in tc.auto_candidates if c != "linear_probe")
    if tc.strategy == "auto" and candidates != tuple(tc.auto_candidates):
        log.info("FineTune: multilabel task: 'linear_probe' left out of train.auto_candidates (single-label)")
    if tc.semi_supervised == "auto":
        log.info("FineTune: multilabel task: semi-supervised training off (train.semi_supervised: auto)")
    return candidates, "off"
