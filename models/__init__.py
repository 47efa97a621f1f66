"""Backbones and pretrained weights for medtl (no luigi, no knowledge of runs or workspaces).

Public API::

    from models import create_backbone, get_spec, list_backbones, BackboneSpec
    spec = get_spec("efficientnet_lite0")
    model = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1)
    groups = param_groups(model)          # stem -> ... -> head
    freeze(model, n_trainable_groups=1)   # linear probe

Importing this package registers every built-in backbone (2D timm, 3D MedicalNet, compact 3D
ResNets trained from scratch, inflated 2D->3D).
"""

from __future__ import annotations

from models import inflate as _inflate  # noqa: F401  (registers inflated 2D->3D backbones)
from models import medicalnet as _medicalnet  # noqa: F401  (registers 3D MedicalNet backbones)
from models import resnet3d as _resnet3d  # noqa: F401  (registers compact 3D ResNets, from scratch)
from models import timm2d as _timm2d  # noqa: F401  (registers 2D backbones)
from models.inflate import Inflated3d, InflationError, check_inflation, inflate_modules
from models.registry import (
    GradualUnfreezing,
    create_backbone,
    freeze,
    get_spec,
    list_backbones,
    param_groups,
    register_backbone,
    register_prefix,
)
from models.spec import INTENSITY_POLICIES, BackboneSpec, WeightSource
from models.weights import ResolvedWeights, read_checkpoint, resolve_weights, sha256_file, verify_sha256

__all__ = [
    "BackboneSpec",
    "WeightSource",
    "ResolvedWeights",
    "INTENSITY_POLICIES",
    "create_backbone",
    "get_spec",
    "list_backbones",
    "register_backbone",
    "register_prefix",
    "param_groups",
    "freeze",
    "GradualUnfreezing",
    "resolve_weights",
    "read_checkpoint",
    "sha256_file",
    "verify_sha256",
    "Inflated3d",
    "InflationError",
    "check_inflation",
    "inflate_modules",
]
