"""Transfer-learning strategies: which parameters train, at which learning rate, and the linear probe.

Strategies (``train.strategy``), cheapest first (:data:`CHEAPEST_FIRST`):

- ``linear_probe``: frozen backbone; multinomial logistic regression (scikit-learn) on cached
  ``forward_head(forward_features(x), pre_logits=True)`` embeddings, its L2 strength picked by validation
  AUROC; the fitted probe (with its feature standardisation folded in) is written into the network's
  classifier, so the saved network gives exactly the probe's probabilities.
- ``partial``: the last ``train.trainable_groups`` parameter groups (:func:`models.param_groups`) train.
- ``gradual``: :class:`models.GradualUnfreezing` from the head towards the stem at
  ``train.unfreeze_milestones``.
- ``finetune``: everything trains; pretrained layers at ``lr * backbone_lr_mult`` (discriminative LRs).
- ``scratch``: the same network from random initialisation, every layer at ``lr``.

Frozen BatchNorm layers stay in eval mode (their running statistics are those of the pretrained weights, or
of the target domain after :func:`reestimate_bn`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import TrainConfig

log = logging.getLogger(__name__)

#: Strategies in order of cost (``auto`` runs its candidates in this order).
CHEAPEST_FIRST = ("linear_probe", "partial", "gradual", "finetune", "scratch")


def setup_trainable(model: nn.Module, strategy: str, tc: TrainConfig):
    """Set ``requires_grad`` for ``strategy``; returns its :class:`models.GradualUnfreezing` or None."""
    from models import GradualUnfreezing, freeze, param_groups

    n_groups = len(param_groups(model))
    if strategy == "linear_probe":
        freeze(model, 1)
    elif strategy == "partial":
        freeze(model, min(tc.trainable_groups, n_groups))
    elif strategy == "gradual":
        schedule = GradualUnfreezing(
            initial_groups=1,
            milestones=tuple(tc.unfreeze_milestones),
            groups_per_step=tc.unfreeze_groups_per_step,
        )
        schedule.apply(model, 0)
        return schedule
    elif strategy in ("finetune", "scratch"):
        freeze(model, n_groups)
    else:
        raise ValueError(f"strategy={strategy!r}; expected one of {CHEAPEST_FIRST}")
    return None


def make_optimizer(
    model: nn.Module, strategy: str, tc: TrainConfig, pretrained: bool
) -> torch.optim.Optimizer:
    """AdamW with discriminative learning rates: head at ``lr``, pretrained body at ``lr * backbone_lr_mult``.

    ``partial`` optimises only its trainable groups; ``gradual`` gets every parameter (frozen ones have no
    gradient and are skipped by AdamW until they are unfrozen).
    """
    from models import param_groups

    groups = param_groups(model)
    mult = tc.backbone_lr_mult if (pretrained and strategy != "scratch") else 1.0
    keep = (lambda p: p.requires_grad) if strategy in ("partial", "linear_probe") else (lambda p: True)
    body = [p for g in groups[:-1] for p in g if keep(p)]
    head = [p for p in groups[-1] if keep(p)]
    param_sets = [{"params": head, "lr": tc.lr}]
    if body:
        param_sets.insert(0, {"params": body, "lr": tc.lr * mult})
    return torch.optim.AdamW(param_sets, weight_decay=tc.weight_decay)


def set_frozen_bn_eval(model: nn.Module) -> None:
    """Put BatchNorm layers whose affine parameters are frozen in eval mode (keep their running stats)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64) -> int:
    """Replace every BatchNorm layer's running statistics by the cumulative mean/var over ``x``.

    Args:
        model: The network (left in eval mode).
        x: Inputs ``(N, C, *spatial)`` of the target domain (unaugmented training images).
        device: Where to run.
        batch_size: Batch size of the passes (batches of 1 are skipped: no variance).

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns or len(x) < 2:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if len(xb) < 2:
            continue
        model(torch.from_numpy(xb.astype(np.float32)).to(device))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    model.eval()
    return len(bns)


@torch.no_grad()
def extract_features(
    model: nn.Module, x: np.ndarray, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Embeddings ``(N, num_features)`` = ``forward_head(forward_features(x), pre_logits=True)`` in eval mode.

    Args:
        model: A backbone from :func:`models.create_backbone`.
        x: Inputs ``(N, C, *spatial)``.
        device: Where to run.
        batch_size: Inference batch size.
    """
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size].astype(np.float32)).to(device)
        out.append(model.forward_head(model.forward_features(xb), pre_logits=True).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)


@dataclass
class ProbeResult:
    """Outcome of :func:`fit_linear_probe`."""

    c: float
    val_score: float
    scores: dict[float, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "C": self.c,
            "val_auroc": self.val_score,
            "val_auroc_by_C": {str(k): v for k, v in self.scores.items()},
        }


def probe_head_weights(
    clf, mean: np.ndarray, scale: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fold a fitted ``LogisticRegression`` on standardised features into a linear head ``(W, b)``.

    ``softmax(W f + b)`` equals ``clf.predict_proba((f - mean) / scale)`` (binary: the logit difference is
    split symmetrically over the two rows); classes absent from training get weight 0 and bias -30.
    """
    coef = clf.coef_ / scale[None, :]
    intercept = clf.intercept_ - coef @ mean
    classes = [int(c) for c in clf.classes_]
    w = np.zeros((num_classes, coef.shape[1]))
    b = np.full(num_classes, -30.0)
    if len(classes) == 2 and coef.shape[0] == 1:
        w[classes[0]], b[classes[0]] = -coef[0] / 2, -intercept[0] / 2
        w[classes[1]], b[classes[1]] = coef[0] / 2, intercept[0] / 2
    else:
        for row, c in enumerate(classes):
            w[c], b[c] = coef[row], intercept[row]
    return w, b


def fit_linear_probe(
    model: nn.Module,
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    tc: TrainConfig,
    num_classes: int,
    positive_index: int | None,
    device: torch.device,
) -> ProbeResult:
    """Fit the linear probe on frozen features and write it into the model's classifier.

    Args:
        model: Backbone with an ``nn.Linear`` classifier (``get_classifier()``); modified in place.
        train_x: Training inputs ``(N, C, *spatial)``; train_y: their labels ``(N,)``.
        val_x: Validation inputs; val_y: their labels (pick ``C`` among ``tc.probe_c`` by AUROC).
        tc: Training options (``probe_c``, ``class_weighting``, ``seed``).
        num_classes: Classes of the task.
        positive_index: Positive class of a binary task (for the AUROC), or None.
        device: Where features are computed.

    Raises:
        ValueError: The classifier is not a linear layer of the right shape.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from pipeline.train.validation import val_score

    head = model.get_classifier()
    if not isinstance(head, nn.Linear) or head.out_features != num_classes:
        raise ValueError(
            f"linear probe: the classifier of {type(model).__name__} is {head!r}; expected nn.Linear with "
            f"{num_classes} outputs"
        )
    f_train = extract_features(model, train_x, device)
    f_val = extract_features(model, val_x, device)
    scaler = StandardScaler().fit(f_train)
    # Floor the per-feature scale at a tenth of the median: a nearly dead channel (std ~1e-4 on frozen,
    # eval-mode features) would otherwise get a weight 10^4 times larger once folded into the head, and
    # fine-tuning from that head (probe_init, LP-FT) sees logits in the hundreds as soon as BatchNorm
    # uses batch statistics (measured: train loss 174 in the first epoch on BreastMNIST).
    scaler.scale_ = np.maximum(scaler.scale_, 0.1 * float(np.median(scaler.scale_)))
    z_train, z_val = scaler.transform(f_train), scaler.transform(f_val)
    weight = "balanced" if tc.class_weighting == "balanced" else None
    best = None
    scores: dict[float, float] = {}
    for c in tc.probe_c:
        clf = LogisticRegression(C=c, class_weight=weight, max_iter=5000, random_state=tc.seed)
        clf.fit(z_train, train_y)
        probs = np.zeros((len(val_y), num_classes))
        probs[:, clf.classes_.astype(int)] = clf.predict_proba(z_val)
        score = val_score(val_y, probs, positive_index)
        if np.isnan(score):
            score = -float(np.mean(-np.log(np.clip(probs[np.arange(len(val_y)), val_y], 1e-12, None))))
        scores[float(c)] = float(score)
        if best is None or score > best[0] + 1e-9:
            best = (score, c, clf)
    assert best is not None
    w, b = probe_head_weights(best[2], scaler.mean_, scaler.scale_, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor(b, dtype=head.bias.dtype))
    log.info("linear probe: C=%g, val AUROC %.4f (by C: %s)", best[1], best[0], scores)
    return ProbeResult(c=float(best[1]), val_score=float(best[0]), scores=scores)


def pick_candidate(results: dict[str, float], tolerance: float) -> tuple[str, str]:
    """``auto``: the cheapest candidate within ``tolerance`` of the best validation AUROC, and why.

    Args:
        results: Strategy -> validation AUROC (NaN counts as worst).
        tolerance: AUROC a costlier candidate must gain to be preferred.
    """
    clean = {k: (v if np.isfinite(v) else -np.inf) for k, v in results.items()}
    order = sorted(clean, key=CHEAPEST_FIRST.index)
    best_name = max(order, key=lambda k: clean[k])
    best = clean[best_name]
    chosen = next(k for k in order if clean[k] >= best - tolerance)
    shown = ", ".join(f"{k} {results[k]:.4f}" for k in order)
    if chosen == best_name:
        reason = f"{chosen} has the highest validation AUROC ({shown})"
        cheaper = [k for k in order if CHEAPEST_FIRST.index(k) < CHEAPEST_FIRST.index(chosen)]
        if cheaper:
            reason += f"; it beats the cheaper {', '.join(cheaper)} by more than auto_tolerance {tolerance}"
    else:
        reason = (
            f"{chosen} is within auto_tolerance {tolerance} of the best validation AUROC ({best_name}) and "
            f"cheaper ({shown})"
        )
    return chosen, reason
