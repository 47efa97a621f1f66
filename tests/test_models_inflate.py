"""2D -> 3D inflation (models/inflate.py): the I3D property on real ImageNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn

from models import create_backbone, freeze, get_spec, list_backbones, param_groups
from models.inflate import Inflated3d, InflatedConv3d, InflationError, check_inflation, inflate_modules

torch.set_num_threads(2)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.astype(np.float32))


def _grace_hopper(size: int) -> torch.Tensor:
    """The sample photo, (1, 3, size, size), scaled to [0, 1] then normalised with mean = std = 0.5."""
    from matplotlib import cbook
    from PIL import Image

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    img = img.resize((size, size), Image.BICUBIC)
    return (_t(np.asarray(img) / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5


def test_registered_inflated_specs() -> None:
    names = list_backbones("inflated_*")
    assert {"inflated_efficientnet_lite0", "inflated_resnet18"} <= set(names)
    spec = get_spec("inflated_efficientnet_lite0")
    base = get_spec("efficientnet_lite0")
    assert spec.spatial_dims == 3 and len(spec.input_size) == 3 and spec.input_size[1:] == base.input_size
    assert spec.mean == base.mean and spec.std == base.std and spec.weights == base.weights
    assert spec.axis_order.startswith("N,C,D,H,W")


def test_i3d_property_with_imagenet_weights() -> None:
    """A volume whose slices all equal one photo gives the 2D network's features at every depth."""
    net2d = create_backbone("efficientnet_lite0", num_classes=1000).eval()
    net3d = create_backbone("inflated_efficientnet_lite0", num_classes=1000).eval()
    assert net3d.pretrained_weights.pinned
    img = _grace_hopper(224)
    vol = img.unsqueeze(2).expand(-1, -1, 4, -1, -1).contiguous()
    with torch.no_grad():
        fmap2 = net2d.forward_features(img)
        fmap3 = net3d.forward_features(vol)
        assert fmap3.ndim == 5
        for d in range(fmap3.shape[2]):  # every depth position, ends included (replicate padding)
            torch.testing.assert_close(fmap3[:, :, d], fmap2, atol=2e-4, rtol=1e-4)
        emb2 = net2d.forward_head(fmap2, pre_logits=True)
        emb3 = net3d.forward_head(fmap3, pre_logits=True)
        torch.testing.assert_close(emb3, emb2, atol=1e-4, rtol=1e-4)
        assert int(net3d(vol).argmax()) == int(net2d(img).argmax()) == 652
    assert check_inflation(net2d, net3d, img, depth=3) < 1e-3


def test_inflated_kernel_is_repeated_and_divided() -> None:
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    w2 = conv.weight.detach().clone()
    c3 = InflatedConv3d(conv)
    assert c3.weight.shape == (4, 3, 3, 3, 3)
    torch.testing.assert_close(c3.weight.sum(dim=2), w2)
    torch.testing.assert_close(c3.weight[:, :, 0], w2 / 3)


def test_inflated_conv_is_truly_3d(rng) -> None:
    """Depth structure matters: a volume that varies along depth is not seen slice by slice."""
    conv = nn.Conv2d(1, 2, 3, padding=1)
    c3 = InflatedConv3d(conv)
    vol = _t(rng.standard_normal((1, 1, 5, 8, 8)))
    with torch.no_grad():
        per_slice = torch.stack([conv(vol[:, :, d]) for d in range(5)], dim=2)
        out = c3(vol)
        assert out.shape == per_slice.shape
        assert not torch.allclose(out, per_slice, atol=1e-3)
        # interior slice 1 = the 2D conv averaged over slices 0, 1, 2 (kernel / 3 per slice, bias once)
        mean_of_neighbours = sum(conv(vol[:, :, d]) for d in range(3)) / 3
        torch.testing.assert_close(out[:, :, 1], mean_of_neighbours, atol=1e-5, rtol=1e-5)


def test_resnet_inflation_with_nontrivial_batchnorm(rng) -> None:
    net2d = timm.create_model("resnet18", num_classes=5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net2d.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    ref = timm.create_model("resnet18", num_classes=5)
    ref.load_state_dict(net2d.state_dict())
    net3d = Inflated3d(net2d)
    img = _t(rng.standard_normal((2, 3, 48, 48)))
    assert check_inflation(ref, net3d, img, depth=5) < 1e-4


def test_depth_stride_one_keeps_slices(rng) -> None:
    net3d = Inflated3d(timm.create_model("resnet18", num_classes=2), depth_stride=1).eval()
    with torch.no_grad():
        fmap = net3d.forward_features(_t(rng.standard_normal((1, 3, 6, 64, 64))))
    assert fmap.shape[2] == 6 and fmap.shape[3:] == (2, 2)


def test_2d_only_blocks_are_refused() -> None:
    with pytest.raises(InflationError, match="SqueezeExcite"):
        inflate_modules(timm.create_model("efficientnet_b0", pretrained=False))
    with pytest.raises(InflationError, match="AvgPool2d"):
        inflate_modules(nn.Sequential(nn.Conv2d(1, 1, 3), nn.AvgPool2d(2)))


def test_fine_tuning_interface_and_spatial_dims_dispatch(rng) -> None:
    m = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1, spatial_dims=3)
    assert isinstance(m, Inflated3d)
    assert m.backbone_spec.name == "inflated_efficientnet_lite0" and m.backbone_spec.in_chans == 1
    x = _t(rng.standard_normal((2, 1, 8, 64, 64)))
    m.eval()
    with torch.no_grad():
        assert m(x).shape == (2, 2)
        assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, 1280)
    m.reset_classifier(4)
    with torch.no_grad():
        assert m(x).shape == (2, 4)
    assert isinstance(m.get_classifier(), nn.Linear) and m.get_classifier().out_features == 4
    groups = param_groups(m)
    assert groups[-1] == list(m.get_classifier().parameters())
    freeze(m, 1)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == [
        "net.classifier.weight",
        "net.classifier.bias",
    ]
    with pytest.raises(ValueError, match="spatial_dims=2"):
        create_backbone("medicalnet_resnet10", num_classes=2, spatial_dims=2, pretrained=False)


def test_inflated_one_channel_trains_one_step(rng) -> None:
    m = create_backbone("inflated_efficientnet_lite0", num_classes=2, in_chans=1)
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    x = _t(rng.standard_normal((2, 1, 8, 32, 32)))
    y = torch.tensor([0, 1])
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    assert m.net.conv_stem.weight.grad is not None and float(m.net.conv_stem.weight.grad.abs().sum()) > 0
    opt.step()
