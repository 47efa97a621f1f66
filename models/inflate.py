"""2D -> 3D inflation of ImageNet networks (I3D, Carreira & Zisserman 2017).

Every ``Conv2d`` kernel ``(O, I, kh, kw)`` becomes a ``Conv3d`` kernel ``(O, I, kd, kh, kw)`` that
repeats the 2D kernel ``kd`` times along depth and divides it by ``kd``; BatchNorm, pooling and the
global pool become their 3D twins with the same parameters. Depth is padded by replicating the edge
slice, so the I3D property holds exactly, not only away from the ends: a volume whose slices are all
the same image gives, at every depth, the 2D network's features of that image, hence the same pooled
embedding and logits. :func:`check_inflation` verifies that property, and every inflated backbone is
checked once when it is built, so a block with hidden 2D assumptions (e.g. ``x.mean((2, 3))`` in
squeeze-excitation) is refused rather than silently wrong.

Input axis order of inflated networks: ``(N, C, D, H, W)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, SelectAdaptivePool2d
from timm.layers.padding import get_same_padding
from torch import nn

from models import timm2d as _timm2d  # noqa: F401  (the 2D backbones inflated below)
from models.registry import BackboneFactory, _lookup, param_groups, register_backbone
from models.spec import BackboneSpec
from models.weights import ResolvedWeights

__all__ = ["InflatedConv3d", "Inflated3d", "inflate_modules", "check_inflation", "InflationError"]

AXIS_ORDER_3D = "N,C,D,H,W (batch, channel, slices, rows, columns)"


class InflationError(ValueError):
    """A 2D network cannot be inflated faithfully."""


class InflatedConv3d(nn.Conv3d):
    """A ``Conv3d`` inflated from a ``Conv2d`` (kernel repeated along depth and divided by its depth).

    Rows and columns are zero-padded as the 2D conv did (static padding, or TensorFlow "SAME" for
    timm's ``Conv2dSame``); depth is padded "SAME" with ``depth_padding_mode`` (default replicate).

    Args:
        conv: The 2D convolution.
        depth_kernel: Kernel depth; None = the kernel width.
        depth_stride: Stride along depth; None = the stride along width.
        depth_padding_mode: ``"replicate"`` (exact I3D property at the ends) or ``"constant"`` (zeros).
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        depth_kernel: int | None = None,
        depth_stride: int | None = None,
        depth_padding_mode: str = "replicate",
    ) -> None:
        if conv.padding_mode != "zeros":
            raise InflationError(
                f"cannot inflate {conv}: padding_mode={conv.padding_mode!r}; expected 'zeros'"
            )
        kh, kw = conv.kernel_size
        sh, sw = conv.stride
        kd = kw if depth_kernel is None else int(depth_kernel)
        sd = sw if depth_stride is None else int(depth_stride)
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            (kd, kh, kw),
            stride=(sd, sh, sw),
            padding=0,
            dilation=(1, *conv.dilation),
            groups=conv.groups,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if depth_padding_mode not in ("replicate", "constant"):
            raise InflationError(
                f"depth_padding_mode={depth_padding_mode!r}; expected 'replicate' or 'constant'"
            )
        self.depth_padding_mode = depth_padding_mode
        self.same_hw = isinstance(conv, Conv2dSame) or conv.padding == "same"
        self.static_hw = (0, 0) if self.same_hw else tuple(int(p) for p in conv.padding)
        with torch.no_grad():
            self.weight.copy_(conv.weight.unsqueeze(2).repeat(1, 1, kd, 1, 1) / kd)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` ``(N, C, D, H, W)``."""
        d, h, w = x.shape[-3:]
        kd, kh, kw = self.kernel_size
        sd, sh, sw = self.stride
        _, dh, dw = self.dilation
        if self.same_hw:
            ph = get_same_padding(h, kh, sh, dh)
            pw = get_same_padding(w, kw, sw, dw)
            hw_pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        else:
            ph, pw = self.static_hw
            hw_pad = (pw, pw, ph, ph)
        if any(hw_pad):
            x = F.pad(x, (*hw_pad, 0, 0))
        pd = get_same_padding(d, kd, sd, 1)
        if pd:
            x = F.pad(x, (0, 0, 0, 0, pd // 2, pd - pd // 2), mode=self.depth_padding_mode)
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormAct3d(nn.BatchNorm3d):
    """3D twin of timm's ``BatchNormAct2d`` (same parameter names, activation and drop submodules)."""

    def __init__(self, bn: BatchNormAct2d) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.load_state_dict(bn.state_dict())
        self.drop = bn.drop
        self.act = bn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise, drop, activate ``x`` ``(N, C, D, H, W)``."""
        return self.act(self.drop(super().forward(x)))


class GlobalPool3d(nn.Module):
    """3D twin of timm's ``SelectAdaptivePool2d`` (global ``avg`` or ``max`` pooling)."""

    def __init__(self, pool_type: str = "avg", flatten: bool = True) -> None:
        super().__init__()
        if pool_type not in ("avg", "max", ""):
            raise InflationError(f"global pool_type={pool_type!r}; expected 'avg', 'max' or '' (none)")
        self.pool_type = pool_type
        self.flatten = flatten

    def is_identity(self) -> bool:
        """True when no pooling is done (timm API)."""
        return not self.pool_type

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pool ``(N, C, D, H, W)`` to ``(N, C)`` (or ``(N, C, 1, 1, 1)`` without flatten)."""
        if self.pool_type == "avg":
            x = x.mean(dim=(2, 3, 4), keepdim=True)
        elif self.pool_type == "max":
            x = x.amax(dim=(2, 3, 4), keepdim=True)
        return torch.flatten(x, 1) if self.flatten else x


#: Blocks whose forward hard-codes 2D axes (e.g. ``x.mean((2, 3))``); refused by name.
KNOWN_2D_ONLY = (
    "SqueezeExcite",
    "SEModule",
    "EffectiveSEModule",
    "EcaModule",
    "CecaModule",
    "CbamModule",
    "GatherExcite",
    "GlobalContext",
    "SelectiveKernel",
    "SplitAttn",
)


def _convert(module: nn.Module, depth_stride: int | None, depth_padding_mode: str) -> nn.Module | None:
    """Return the 3D twin of a 2D-specific module, None when the module is dimension-agnostic."""
    if type(module).__name__ in KNOWN_2D_ONLY:
        raise InflationError(
            f"cannot inflate module {type(module).__name__}: its forward hard-codes 2D axes; "
            "choose a backbone without it (e.g. efficientnet_lite*, resnet*)"
        )
    if isinstance(module, nn.Conv2d):
        return InflatedConv3d(
            module,
            depth_stride=None if depth_stride is None else (depth_stride if module.stride[1] > 1 else 1),
            depth_padding_mode=depth_padding_mode,
        )
    if isinstance(module, BatchNormAct2d):
        return BatchNormAct3d(module)
    if type(module) is nn.BatchNorm2d:
        bn = nn.BatchNorm3d(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        bn.load_state_dict(module.state_dict())
        return bn
    if type(module) is nn.MaxPool2d:
        k, s, p, d = (module.kernel_size, module.stride, module.padding, module.dilation)
        k, s, p, d = (v if isinstance(v, tuple) else (v, v) for v in (k, s, p, d))
        sd = s[1] if depth_stride is None else (depth_stride if s[1] > 1 else 1)
        return nn.MaxPool3d((k[1], *k), (sd, *s), (p[1], *p), (1, *d), ceil_mode=module.ceil_mode)
    if isinstance(module, SelectAdaptivePool2d):
        return GlobalPool3d(module.pool_type, flatten=isinstance(module.flatten, nn.Flatten))
    if type(module) is nn.AdaptiveAvgPool2d:
        if module.output_size not in (1, (1, 1)):
            raise InflationError(f"cannot inflate {module}: only global pooling (output size 1) is supported")
        return nn.AdaptiveAvgPool3d(1)
    if type(module).__name__.lower().endswith("2d") or isinstance(module, nn.modules.pooling._AvgPoolNd):
        raise InflationError(
            f"cannot inflate module {type(module).__name__}: no 3D twin known; "
            "supported: Conv2d (incl. timm Conv2dSame), BatchNorm2d, BatchNormAct2d, MaxPool2d, "
            "AdaptiveAvgPool2d(1), SelectAdaptivePool2d"
        )
    return None


def inflate_modules(
    net: nn.Module, depth_stride: int | None = None, depth_padding_mode: str = "replicate"
) -> nn.Module:
    """Replace, in place, every 2D-specific submodule of ``net`` by its inflated 3D twin.

    Args:
        net: A 2D network (e.g. a timm model); modified in place.
        depth_stride: Stride along depth of every strided layer; None = the same as along width
            (isotropic), 1 = keep all slices (thick-slice volumes with few slices).
        depth_padding_mode: Depth padding of convolutions, ``"replicate"`` or ``"constant"``.

    Returns:
        ``net`` itself.

    Raises:
        InflationError: A 2D-specific module has no known 3D twin.
    """
    for name, child in list(net.named_children()):
        new = _convert(child, depth_stride, depth_padding_mode)
        if new is not None:
            setattr(net, name, new)
        else:
            inflate_modules(child, depth_stride, depth_padding_mode)
    return net


class Inflated3d(nn.Module):
    """A 2D timm network inflated to 3D, with the medtl fine-tuning interface.

    Args:
        net2d: The 2D network with pretrained weights (consumed: its modules are converted in place).
        depth_stride: See :func:`inflate_modules`.
        depth_padding_mode: See :func:`inflate_modules`.
    """

    def __init__(
        self, net2d: nn.Module, depth_stride: int | None = None, depth_padding_mode: str = "replicate"
    ) -> None:
        super().__init__()
        self.depth_stride = depth_stride
        self.depth_padding_mode = depth_padding_mode
        self.net = inflate_modules(net2d, depth_stride, depth_padding_mode)
        self.num_features = int(getattr(net2d, "num_features", 0))

    @property
    def num_classes(self) -> int:
        """Number of logits."""
        return int(self.net.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Un-pooled feature map of ``x`` ``(N, C, D, H, W)``."""
        return self.net.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool (+ classifier unless ``pre_logits``): ``(N, num_features)`` or logits."""
        return self.net.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of ``x`` ``(N, C, D, H, W)``."""
        return self.net(x)

    def get_classifier(self) -> nn.Module:
        """The classifier module."""
        return self.net.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        """New classifier with ``num_classes`` outputs (the new global pool is inflated too)."""
        self.net.reset_classifier(num_classes)
        inflate_modules(self.net, self.depth_stride, self.depth_padding_mode)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """The 2D network's groups (stem -> blocks -> head)."""
        return param_groups(self.net)


def check_inflation(
    net2d: nn.Module, net3d: nn.Module, image: torch.Tensor, depth: int = 4, atol: float = 1e-4
) -> float:
    """Check the I3D property: a depth-constant volume gives the 2D network's embedding and logits.

    Both networks are put in eval mode.

    Args:
        net2d: The 2D network.
        net3d: Its inflation.
        image: 2D input ``(N, C, H, W)``.
        depth: Number of slices of the test volume.
        atol: Tolerance on the largest absolute difference.

    Returns:
        Largest absolute difference between the 2D and 3D embeddings and logits.

    Raises:
        InflationError: The difference exceeds ``atol`` (the inflation is not faithful).
    """
    net2d.eval()
    net3d.eval()
    vol = image.unsqueeze(2).expand(-1, -1, depth, -1, -1).contiguous()
    with torch.no_grad():
        f2 = net2d.forward_head(net2d.forward_features(image), pre_logits=True)
        f3 = net3d.forward_head(net3d.forward_features(vol), pre_logits=True)
        l2, l3 = net2d(image), net3d(vol)
    err = max(float((f2 - f3).abs().max()), float((l2 - l3).abs().max()))
    if not err <= atol:
        raise InflationError(
            f"inflated {type(net2d).__name__} breaks the I3D property: max |2D - 3D| = {err:.3g} > {atol} "
            "on a depth-constant volume (a block probably has 2D-only code)"
        )
    return err


def _inflated_factory(base_name: str, depth_stride: int | None) -> BackboneFactory:
    def factory(
        spec: BackboneSpec, num_classes: int, in_chans: int, weights: ResolvedWeights | None
    ) -> nn.Module:
        base_spec, base_factory = _lookup(base_name)
        net2d = base_factory(base_spec, num_classes, in_chans, weights)
        gen = torch.Generator().manual_seed(0)
        probe = torch.randn(1, in_chans, 64, 64, generator=gen)
        with torch.no_grad():
            net2d.eval()
            ref_feat = net2d.forward_head(net2d.forward_features(probe), pre_logits=True)
            ref_logits = net2d(probe)
        model = Inflated3d(net2d, depth_stride=depth_stride)
        model.eval()
        vol = probe.unsqueeze(2).expand(-1, -1, 4, -1, -1).contiguous()
        with torch.no_grad():
            err = max(
                float(
                    (model.forward_head(model.forward_features(vol), pre_logits=True) - ref_feat).abs().max()
                ),
                float((model(vol) - ref_logits).abs().max()),
            )
        scale = max(1.0, float(ref_logits.abs().max()), float(ref_feat.abs().max()))
        if err > 1e-4 * scale:
            raise InflationError(
                f"inflated backbone {spec.name!r} breaks the I3D property (max |2D - 3D| = {err:.3g}); "
                f"{base_name!r} has a block that cannot be inflated faithfully"
            )
        model.train()
        return model

    return factory


def register_inflated(base_name: str, depth_stride: int | None = None, depth_size: int = 32) -> None:
    """Register ``inflated_<base_name>``: the 2D backbone's weights inflated to 3D.

    Args:
        base_name: Registered 2D backbone.
        depth_stride: See :func:`inflate_modules`.
        depth_size: Depth recorded in the spec's ``input_size`` (depth has no native size; any works).
    """
    base = _lookup(base_name)[0]
    extra: dict[str, Any] = dict(base.extra)
    extra.update(inflated_from=base_name, depth_stride=depth_stride)
    spec = dataclasses.replace(
        base,
        name=f"inflated_{base_name}",
        spatial_dims=3,
        input_size=(depth_size, *base.input_size),
        axis_order=AXIS_ORDER_3D,
        architecture=f"inflated({base.architecture})",
        notes=(
            f"{base_name} ImageNet weights inflated to 3D (I3D: kernel repeated along depth / depth, depth "
            "padded by replication). In-plane preprocessing as the 2D backbone; the depth "
            f"{depth_size} in input_size is nominal. " + base.notes
        ).strip(),
        extra=tuple(extra.items()),
    )
    register_backbone(spec)(_inflated_factory(base_name, depth_stride))


for _base in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet50"):
    register_inflated(_base)
