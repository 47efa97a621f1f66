"""3D MedicalNet ResNets (Tencent MedicalNet weights) on MONAI's ResNet, with a strict offline loader.

MedicalNet (Chen et al. 2019, MIT licence) released 3D ResNet-10..200 pretrained by segmentation on 23
medical data sets. Its checkpoints are ``{"state_dict": {"module.<key>": tensor}}`` (saved from
``DataParallel``) with a ``conv_seg.*`` segmentation head. MONAI's ``resnet*(pretrained=path)`` loads a
local file without unwrapping that layout, and users fall back to ``strict=False``, which silently loads
nothing (MONAI #2289). :func:`load_medicalnet_state_dict` unwraps it, drops ``conv_seg``, and refuses
any other missing or unexpected key.

The network is MONAI's :class:`monai.networks.nets.ResNet` rebuilt with MedicalNet's own layout, so
the features match what the weights were trained with:

- conv1 7x7x7 with stride 2, then 3x3x3 max-pool with stride 2;
- layer3 and layer4 keep stride 1 with dilation 2 and 4 (MONAI's default uses stride 2, no dilation);
- shortcut type B (1x1x1 conv + BN, no bias) for depths 10, 50, 101, 152, 200; type A (parameter-free
  zero-padded identity) for 18 and 34, as MONAI's ``get_medicalnet_pretrained_resnet_args`` states.
  The type-A shortcut is re-implemented without MedicalNet's ``.data`` detach, so gradients flow
  through it when fine-tuning (the forward values are identical).

Input conventions (in the :class:`~models.spec.BackboneSpec`): 1 channel, intensity z-scored over the
non-zero voxels, voxel order ``(N, C, D, H, W)``.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck
from torch import nn

from models.registry import register_backbone
from models.spec import BackboneSpec, WeightSource
from models.weights import ResolvedWeights, read_checkpoint
from models.errors import WeightsError

__all__ = [
    "MedicalNetResNet",
    "ResNet3dInterface",
    "load_medicalnet_state_dict",
    "MEDICALNET_DEPTHS",
    "adapt_first_conv",
]

AXIS_ORDER_3D = "N,C,D,H,W (batch, channel, slices, rows, columns)"

#: depth -> (block, layers, shortcut type, has 23-data-set weights)
MEDICALNET_DEPTHS: dict[int, tuple[str, list[int], str, bool]] = {
    10: ("basic", [1, 1, 1, 1], "B", True),
    18: ("basic", [2, 2, 2, 2], "A", True),
    34: ("basic", [3, 4, 6, 3], "A", True),
    50: ("bottleneck", [3, 4, 6, 3], "B", True),
    101: ("bottleneck", [3, 4, 23, 3], "B", False),
    152: ("bottleneck", [3, 8, 36, 3], "B", False),
    200: ("bottleneck", [3, 24, 36, 3], "B", False),
}


def _shortcut_a(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    """MedicalNet's type-A shortcut: strided identity, zero-padded to ``planes`` channels (no detach)."""
    if stride != 1:
        x = x[:, :, ::stride, ::stride, ::stride]
    pad = planes - x.shape[1]
    return F.pad(x, (0, 0, 0, 0, 0, 0, 0, pad)) if pad > 0 else x


class ResNet3dInterface:
    """The medtl fine-tuning interface over a MONAI 3D :class:`~monai.networks.nets.ResNet`.

    Shared by :class:`MedicalNetResNet` and :class:`models.resnet3d.CompactResNet3d`; the host class sets
    ``drop_rate``, ``num_classes`` and ``num_features``.
    """

    drop_rate: float
    num_classes: int
    num_features: int

    def _init_interface(self, depth: int, num_classes: int, drop_rate: float) -> None:
        """Record the facts the interface needs (call after ``ResNet.__init__``)."""
        self.depth = depth
        self.drop_rate = float(drop_rate)
        self.num_classes = num_classes
        self.num_features = self.fc.in_features  # type: ignore[attr-defined]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map before pooling.

        Args:
            x: Input ``(N, C, D, H, W)``.

        Returns:
            ``(N, num_features, d, h, w)``.
        """
        x = self.act(self.bn1(self.conv1(x)))
        if not self.no_max_pool:
            x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pool, dropout, classifier.

        Args:
            x: Output of :meth:`forward_features`.
            pre_logits: Return the pooled embedding ``(N, num_features)`` instead of the logits.
        """
        x = torch.flatten(self.avgpool(x), 1)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of an input ``(N, C, D, H, W)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``)."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a freshly initialised one with ``num_classes`` outputs."""
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
        nn.init.constant_(self.fc.bias, 0)

    def param_groups(self) -> list[list[nn.Parameter]]:
        """Stem (conv1, bn1), layer1, layer2, layer3, layer4, head (fc)."""
        parts = [
            [self.conv1, self.bn1],
            [self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4],
            [self.fc],
        ]
        return [[p for m in part for p in m.parameters()] for part in parts]


class MedicalNetResNet(ResNet3dInterface, ResNet):
    """MONAI 3D ResNet in MedicalNet's layout, with the medtl fine-tuning interface.

    ``state_dict`` keys equal MedicalNet's (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    ``layerK.0.downsample.0/1``) plus the classifier ``fc``.

    Args:
        depth: One of :data:`MEDICALNET_DEPTHS`.
        num_classes: Number of logits.
        in_chans: Input channels (MedicalNet: 1).
        drop_rate: Dropout before the classifier.
    """

    def __init__(self, depth: int, num_classes: int, in_chans: int = 1, drop_rate: float = 0.0) -> None:
        if depth not in MEDICALNET_DEPTHS:
            raise ValueError(f"MedicalNet depth={depth}; expected one of {sorted(MEDICALNET_DEPTHS)}")
        block, layers, shortcut, _ = MEDICALNET_DEPTHS[depth]
        super().__init__(
            block=block,
            layers=layers,
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=3,
            n_input_channels=in_chans,
            conv1_t_size=7,
            conv1_t_stride=2,
            shortcut_type=shortcut,
            num_classes=num_classes,
            bias_downsample=False,
        )
        self._init_interface(depth, num_classes, drop_rate)
        self.shortcut_type = shortcut
        # MedicalNet: layer3/layer4 keep resolution and dilate instead (stride 1, dilation 2 and 4).
        for layer, dilation in ((self.layer3, 2), (self.layer4, 4)):
            for blk in layer:
                assert isinstance(blk, (ResNetBlock, ResNetBottleneck))
                convs = [blk.conv1, blk.conv2] if isinstance(blk, ResNetBlock) else [blk.conv2]
                for conv in convs:
                    conv.stride = (1, 1, 1)
                    conv.dilation = (dilation,) * 3
                    conv.padding = (dilation,) * 3
                blk.stride = 1
                if isinstance(blk.downsample, nn.Sequential):
                    blk.downsample[0].stride = (1, 1, 1)
        for layer, stride in ((self.layer1, 1), (self.layer2, 2), (self.layer3, 1), (self.layer4, 1)):
            ds = layer[0].downsample
            if isinstance(ds, partial):
                layer[0].downsample = partial(_shortcut_a, planes=ds.keywords["planes"], stride=stride)


def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-conv kernel ``(O, I, *k)`` to ``in_chans`` inputs (any spatial rank).

    One channel sums the native kernels; more channels repeat them cyclically and scale by
    ``I / in_chans`` (timm's ``adapt_input_conv`` rule, extended to 3D kernels).
    """
    native = weight.shape[1]
    if in_chans == native:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    reps = -(-in_chans // native)
    rep = weight.repeat(1, reps, *([1] * (weight.ndim - 2)))[:, :in_chans]
    return rep * (native / in_chans)


def load_medicalnet_state_dict(model: MedicalNetResNet, checkpoint: dict, path: str = "<checkpoint>") -> None:
    """Load a MedicalNet checkpoint into ``model`` strictly.

    Unwraps ``"state_dict"``, strips the ``module.`` prefix, drops the ``conv_seg.*`` segmentation head
    and adapts ``conv1`` to the model's input channels. Only the new classifier ``fc`` may be absent
    from the file (and ``num_batches_tracked`` counters, which older checkpoints lack; they hold no
    weights).

    Args:
        model: Target network.
        checkpoint: Deserialised file (``{"state_dict": {...}}`` or a flat state_dict).
        path: File name for error messages.

    Raises:
        WeightsError: Any missing backbone key, unexpected key or shape mismatch (all listed).
    """
    sd = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(
            f"MedicalNet checkpoint {path!r}: expected {{'state_dict': {{name: tensor}}}}; "
            "got top-level keys "
            f"{list(checkpoint)[:10] if isinstance(checkpoint, dict) else type(checkpoint).__name__}"
        )
    sd = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("conv_seg.")}
    target = model.state_dict()
    if "conv1.weight" in sd and sd["conv1.weight"].ndim == 5:
        sd["conv1.weight"] = adapt_first_conv(sd["conv1.weight"], target["conv1.weight"].shape[1])
    head = {k for k in target if k.startswith("fc.")}
    missing = [k for k in target if k not in sd and k not in head and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target or k in head]
    bad_shapes = [
        f"{k}: file {tuple(v.shape)} vs network {tuple(target[k].shape)}"
        for k, v in sd.items()
        if k in target and k not in head and v.shape != target[k].shape
    ]
    if missing or unexpected or bad_shapes:
        raise WeightsError(
            f"MedicalNet checkpoint {path!r} does not fit ResNet-{model.depth} "
            f"(shortcut {model.shortcut_type}): "
            f"missing backbone keys {missing}; unexpected keys {unexpected}; shape mismatches {bad_shapes}. "
            "Check the depth (resnet_10.pth goes with medicalnet_resnet10, ...)"
        )
    result = model.load_state_dict(sd, strict=False)
    leftover = [k for k in result.missing_keys if k not in head and not k.endswith("num_batches_tracked")]
    if leftover or result.unexpected_keys:  # pragma: no cover - guarded above
        raise WeightsError(
            f"MedicalNet checkpoint {path!r}: missing {leftover}, unexpected {result.unexpected_keys}"
        )


def _medicalnet_spec(depth: int) -> BackboneSpec:
    block, _, shortcut, has23 = MEDICALNET_DEPTHS[depth]
    files = ((f"resnet_{depth}_23dataset.pth",) if has23 else ()) + (f"resnet_{depth}.pth",)
    return BackboneSpec(
        name=f"medicalnet_resnet{depth}",
        spatial_dims=3,
        input_size=(56, 448, 448),
        in_chans=1,
        mean=(0.0,),
        std=(1.0,),
        intensity="zscore_nonzero",
        classifier="fc",
        weights=WeightSource(
            description=(
                f"Tencent MedicalNet 3D ResNet-{depth} (segmentation pre-training on 23 medical data sets)"
            ),
            license="MIT",
            format="medicalnet",
            hf_repo=f"TencentMedicalNet/MedicalNet-Resnet{depth}",
            hf_filenames=files,
            torch_hub_filenames=files,
            url=f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}",
        ),
        axis_order=AXIS_ORDER_3D,
        architecture=f"monai:resnet{depth} (MedicalNet layout, shortcut {shortcut})",
        num_features=512 * (4 if block == "bottleneck" else 1),
        notes=(
            "MedicalNet preprocessing: z-score over non-zero voxels (background set to N(0,1) noise in the "
            "original), volumes resized to the input size with nearest-neighbour zoom, no spacing "
            "resampling. Native training size D,H,W = 56,448,448; any size works."
        ),
    )


def _make_factory(depth: int):
    def factory(
        spec: BackboneSpec, num_classes: int, in_chans: int, weights: ResolvedWeights | None
    ) -> nn.Module:
        model = MedicalNetResNet(depth, num_classes=num_classes, in_chans=in_chans)
        if weights is not None:
            load_medicalnet_state_dict(model, dict(read_checkpoint(weights.path)), weights.path)
        return model

    return factory


for _depth in MEDICALNET_DEPTHS:
    register_backbone(_medicalnet_spec(_depth))(_make_factory(_depth))
