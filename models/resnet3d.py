"""Compact 3D ResNets for small volumes, trained from scratch.

MedicalNet's layout (7^3 stride-2 stem, max-pool, 64-512 channels) was built for 56x448x448 CT/MR crops:
on a small volume (a 28^3 or 64^3 crop, an organ mask, a nodule patch) its stem alone divides every side
by 4, and its width makes a CPU epoch slow. These networks keep MONAI's ResNet blocks with:

- a 3^3 stem with stride 2 and no max-pool, so a 28^3 input reaches layer1 at 14^3;
- half the MedicalNet widths (32, 64, 128, 256) and shortcut type B;
- dropout 0.2 before the classifier.

They have no pretrained weights (use ``pretrained: false`` / ``train.strategy: scratch``); they are the
3D baseline that transfer from MedicalNet or inflated ImageNet weights must beat. On AdrenalMNIST3D
(28^3) ``resnet10_3d_compact`` trains at about 8 s per epoch of 1,188 volumes on 2 CPU cores
(BENCHMARKS.md).

Input conventions: 1 channel, intensities scaled to [0, 1] then ``(x - 0.5) / 0.5``, ``(N, C, D, H, W)``.
"""

from __future__ import annotations

from monai.networks.nets.resnet import ResNet
from torch import nn

from models.medicalnet import AXIS_ORDER_3D, ResNet3dInterface
from models.registry import register_backbone
from models.spec import BackboneSpec
from models.weights import ResolvedWeights

__all__ = ["CompactResNet3d", "COMPACT_DEPTHS"]

#: depth -> basic blocks per stage
COMPACT_DEPTHS: dict[int, list[int]] = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2]}
COMPACT_WIDTHS = [32, 64, 128, 256]


class CompactResNet3d(ResNet3dInterface, ResNet):
    """MONAI 3D ResNet with a 3^3 stride-2 stem, no max-pool and widths 32-256.

    Args:
        depth: 10 or 18 (basic blocks ``[1, 1, 1, 1]`` or ``[2, 2, 2, 2]``).
        num_classes: Number of logits.
        in_chans: Input channels.
        drop_rate: Dropout before the classifier.
        stem_stride: Stride of the stem convolution (1 for volumes under about 24 voxels a side).
    """

    def __init__(
        self, depth: int, num_classes: int, in_chans: int = 1, drop_rate: float = 0.2, stem_stride: int = 2
    ) -> None:
        if depth not in COMPACT_DEPTHS:
            raise ValueError(f"compact 3D ResNet depth={depth}; expected one of {sorted(COMPACT_DEPTHS)}")
        super().__init__(
            block="basic",
            layers=COMPACT_DEPTHS[depth],
            block_inplanes=COMPACT_WIDTHS,
            spatial_dims=3,
            n_input_channels=in_chans,
            conv1_t_size=3,
            conv1_t_stride=stem_stride,
            no_max_pool=True,
            shortcut_type="B",
            num_classes=num_classes,
            bias_downsample=False,
        )
        self._init_interface(depth, num_classes, drop_rate)


def _compact_spec(depth: int) -> BackboneSpec:
    return BackboneSpec(
        name=f"resnet{depth}_3d_compact",
        spatial_dims=3,
        input_size=(32, 32, 32),
        in_chans=1,
        mean=(0.5,),
        std=(0.5,),
        intensity="imagenet_unit",
        classifier="fc",
        weights=None,
        axis_order=AXIS_ORDER_3D,
        architecture=(
            f"monai:resnet (basic {COMPACT_DEPTHS[depth]}, widths {COMPACT_WIDTHS}, 3^3 stride-2 stem)"
        ),
        num_features=COMPACT_WIDTHS[-1],
        notes=(
            "Random initialisation (no pretrained weights): the from-scratch 3D baseline for small volumes "
            "(about 16-96 voxels a side). Any input size works; the spec's input_size is a typical one."
        ),
        extra=(("depth", depth),),
    )


def _factory(
    spec: BackboneSpec, num_classes: int, in_chans: int, weights: ResolvedWeights | None
) -> nn.Module:
    return CompactResNet3d(dict(spec.extra)["depth"], num_classes=num_classes, in_chans=in_chans)


for _depth in COMPACT_DEPTHS:
    register_backbone(_compact_spec(_depth))(_factory)
