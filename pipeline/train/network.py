"""The network a training run starts from: the configured backbone with a new head, or the champion's
weights (warm start)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipeline.config import Config
from pipeline.errors import MedtlError

log = logging.getLogger(__name__)

WARM_START_FILE = "warm_start.pt"


def build_model(
    cfg: Config, num_classes: int, pretrained: bool | None = None, seed: int = 0, in_chans: int = 1
) -> nn.Module:
    """The configured backbone with a new head and ``in_chans`` input channels (1 grey, 3 colour; see
    :mod:`pipeline.augment.preprocess`)."""
    from models import create_backbone

    use_pretrained = cfg.model.pretrained if pretrained is None else pretrained
    model = create_backbone(
        cfg.model.backbone,
        num_classes=num_classes,
        in_chans=in_chans,
        spatial_dims=cfg.preprocess.spatial_dims,
        pretrained=use_pretrained,
        weights=str(cfg.model.weights) if (use_pretrained and cfg.model.weights) else None,
        weights_sha256=cfg.model.weights_sha256,
        allow_unpinned=cfg.model.allow_unpinned,
    )
    if use_pretrained:
        init_new_head(model, seed)
    return model


def init_new_head(model: nn.Module, seed: int) -> None:
    """Small-scale init of the new classifier (std 0.01, zero bias), seeded.

    timm's EfficientNet init scales the head by 1/sqrt(num_classes), which for 2 classes gives logits of
    +-30 on pretrained features and a loss that starts in the tens; a near-zero head starts at chance
    with calibrated-ish logits and keeps the pretrained features from being wrecked in the first steps.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Linear):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
            head.bias.zero_()



def warm_start_into(model: nn.Module, work_dir: Path) -> bool:
    """Load ``warm_start.pt`` (a champion's ``model.pt``) from ``work_dir`` or its parent into ``model``.

    The FineTune task puts the file there when ``ops.retrain.warm_start: champion`` (k-fold runs train in
    ``work_dir/fold<k>``, hence the parent). A k-fold champion (``members.<k>.*`` keys) gives its first
    member. Loading is strict: a champion of another backbone or class count is an error, never a partial
    load.

    Returns:
        True when weights were loaded.
    """
    path = next((p for p in (work_dir / WARM_START_FILE, work_dir.parent / WARM_START_FILE) if p.is_file()), None)
    if path is None:
        return False
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if any(k.startswith("members.") for k in sd):
        sd = {k.split(".", 2)[2]: v for k, v in sd.items() if k.startswith("members.0.")}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise MedtlError(
            f"ops.retrain.warm_start: the champion's weights ({path}) do not fit this network "
            f"({type(model).__name__}, {cfg_summary(model)}); expected the same backbone and classes. "
            "Use warm_start: pretrained after changing the backbone or the classes"
        ) from err
    log.info(
        "FineTune: warm start from %s (a champion's weights, or a semi-supervised student's teacher)",
        WARM_START_FILE,
    )
    return True


def cfg_summary(model: nn.Module) -> str:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return f"{getattr(head, 'out_features', '?')} outputs"
