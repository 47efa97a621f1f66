"""Backbones and pretrained weights for medtl (no luigi, no knowledge of runs or workspaces).

Public API::

    from models import create_backbone, get_spec, list_backbones, BackboneSpec
    spec = get_spec("efficientnet_lite0")
    model = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1)
    groups = param_groups(model)          # stem -> ... -> head
    freeze(model, n_trainable_groups=1)   # linear probe

The package imports lazily (PEP 562): ``import models.errors`` or ``models.spec`` loads neither torch nor
timm. The first access to a public name below imports its module and registers every built-in backbone
(2D timm, 3D MedicalNet, compact 3D ResNets trained from scratch, inflated 2D->3D).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> module that defines it.
_EXPORTS = {
    "BackboneSpec": "models.spec",
    "WeightSource": "models.spec",
    "INTENSITY_POLICIES": "models.spec",
    "ResolvedWeights": "models.weights",
    "resolve_weights": "models.weights",
    "read_checkpoint": "models.weights",
    "sha256_file": "models.weights",
    "verify_sha256": "models.weights",
    "create_backbone": "models.registry",
    "get_spec": "models.registry",
    "list_backbones": "models.registry",
    "register_backbone": "models.registry",
    "register_prefix": "models.registry",
    "param_groups": "models.registry",
    "freeze": "models.registry",
    "GradualUnfreezing": "models.registry",
    "Inflated3d": "models.inflate",
    "InflationError": "models.inflate",
    "check_inflation": "models.inflate",
    "inflate_modules": "models.inflate",
}
#: Modules whose import registers built-in backbones.
_REGISTERING = ("models.inflate", "models.medicalnet", "models.resnet3d", "models.timm2d")

__all__ = sorted(_EXPORTS)


def register_builtin_backbones() -> None:
    """Import every module that registers a built-in backbone (idempotent)."""
    for name in _REGISTERING:
        importlib.import_module(name)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    if module == "models.registry" or module == "models.inflate":
        register_builtin_backbones()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
