"""MedicalNet 3D ResNets: strict loading of MedicalNet's own checkpoint layout (models/medicalnet.py).

The reference network below follows the original Tencent MedicalNet ``models/resnet.py`` (same module
names, strides, dilations and shortcut types), so a checkpoint written from it has MedicalNet's exact
key names, and its features are what the pretrained weights were trained to produce.
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import create_backbone, freeze, get_spec, list_backbones, param_groups
from models.medicalnet import MedicalNetResNet, load_medicalnet_state_dict
from pipeline.errors import WeightsError

torch.set_num_threads(2)


# ---- reference: the original MedicalNet ResNet (Tencent/MedicalNet models/resnet.py) ---------------
def _conv3x3x3(inp: int, out: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(inp, out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _downsample_basic_block(x: torch.Tensor, planes: int, stride: int) -> torch.Tensor:
    out = F.avg_pool3d(x, kernel_size=1, stride=stride)
    zero_pads = torch.zeros(out.size(0), planes - out.size(1), *out.shape[2:])
    return torch.cat([out.data, zero_pads], dim=1)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = _conv3x3x3(inplanes, planes, stride=stride, dilation=dilation)
        self.bn1 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv3d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(
            planes, planes, 3, stride=stride, dilation=dilation, padding=dilation, bias=False
        )
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        return self.relu(out + residual)


class _OriginalMedicalNet(nn.Module):
    def __init__(self, block, layers, num_seg_classes=2, shortcut_type="B"):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv3d(1, 64, kernel_size=7, stride=(2, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 3), stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], shortcut_type)
        self.layer2 = self._make_layer(block, 128, layers[1], shortcut_type, stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], shortcut_type, stride=1, dilation=2)
        self.layer4 = self._make_layer(block, 512, layers[3], shortcut_type, stride=1, dilation=4)
        self.conv_seg = nn.Sequential(
            nn.ConvTranspose3d(512 * block.expansion, 32, 2, stride=2),
            nn.BatchNorm3d(32),
            nn.ReLU(inplace=True),
            nn.Conv3d(32, 32, kernel_size=3, stride=(1, 1, 1), padding=(1, 1, 1), bias=False),
            nn.BatchNorm3d(32),
            nn.ReLU(inplace=True),
            nn.Conv3d(32, num_seg_classes, kernel_size=1, stride=(1, 1, 1), bias=False),
        )

    def _make_layer(self, block, planes, blocks, shortcut_type, stride=1, dilation=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            if shortcut_type == "A":
                downsample = partial(_downsample_basic_block, planes=planes * block.expansion, stride=stride)
            else:
                downsample = nn.Sequential(
                    nn.Conv3d(
                        self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False
                    ),
                    nn.BatchNorm3d(planes * block.expansion),
                )
        layers = [block(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


_REF = {
    10: (_BasicBlock, [1, 1, 1, 1], "B"),
    18: (_BasicBlock, [2, 2, 2, 2], "A"),
    34: (_BasicBlock, [3, 4, 6, 3], "A"),
    50: (_Bottleneck, [3, 4, 6, 3], "B"),
}


def _reference(depth: int, seed: int) -> _OriginalMedicalNet:
    block, layers, shortcut = _REF[depth]
    net = _OriginalMedicalNet(block, layers, shortcut_type=shortcut)
    gen = torch.Generator().manual_seed(seed)  # every tensor is overwritten from this generator
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                if name.endswith("running_var"):
                    t.copy_(0.5 + torch.rand(t.shape, generator=gen))
                else:
                    t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return net.eval()


def _write_medicalnet_checkpoint(net: nn.Module, path: Path) -> dict[str, torch.Tensor]:
    sd = {"module." + k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd}, path)
    return sd


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_registered_and_spec() -> None:
    assert list_backbones("medicalnet_*") == sorted(
        f"medicalnet_resnet{d}" for d in (10, 18, 34, 50, 101, 152, 200)
    )
    spec = get_spec("medicalnet_resnet10")
    assert spec.spatial_dims == 3 and spec.in_chans == 1
    assert spec.intensity == "zscore_nonzero"
    assert spec.axis_order.startswith("N,C,D,H,W")
    assert spec.weights.format == "medicalnet" and spec.weights.license == "MIT"
    assert spec.weights.hf_repo == "TencentMedicalNet/MedicalNet-Resnet10"
    assert spec.weights.hf_filenames == ("resnet_10_23dataset.pth", "resnet_10.pth")
    assert get_spec("medicalnet_resnet50").num_features == 2048


@pytest.mark.parametrize(
    "depth",
    [10, 18, pytest.param(34, marks=pytest.mark.slow), 50],  # 34 = 18's block and shortcut, 250 MB file
)
def test_loads_medicalnet_checkpoint_exactly(depth: int, tmp_path: Path, rng) -> None:
    ref = _reference(depth, seed=depth)
    f = tmp_path / f"synthetic_resnet_{depth}.pth"  # not an official file name: those have pinned digests
    file_sd = _write_medicalnet_checkpoint(ref, f)
    model = create_backbone(f"medicalnet_resnet{depth}", num_classes=3, weights=str(f)).eval()
    assert model.pretrained_weights.source == "explicit"
    assert model.pretrained_weights.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    loaded = model.state_dict()
    for k, v in file_sd.items():
        key = k[len("module.") :]
        if key.startswith("conv_seg."):
            assert key not in loaded
            continue
        assert torch.equal(loaded[key], v), key
    new = {k for k in loaded if "module." + k not in file_sd}
    assert new == {"fc.weight", "fc.bias"}
    # Same layout as MedicalNet: identical features from the same weights.
    x = torch.from_numpy(rng.standard_normal((1, 1, 16, 24, 24)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.features(x), atol=1e-4, rtol=1e-4)
        emb = model.forward_head(model.forward_features(x), pre_logits=True)
        assert emb.shape == (1, get_spec(f"medicalnet_resnet{depth}").num_features)
        assert model(x).shape == (1, 3)


def test_wrong_depth_lists_keys(tmp_path: Path) -> None:
    f = tmp_path / "synthetic_resnet_10.pth"
    _write_medicalnet_checkpoint(_reference(10, seed=0), f)
    with pytest.raises(WeightsError) as info:
        create_backbone("medicalnet_resnet18", num_classes=2, weights=str(f))
    msg = str(info.value)
    assert str(f) in msg and "layer1.1.conv1.weight" in msg  # missing in a ResNet-10 file
    assert "downsample" in msg  # type-B shortcut weights are unexpected in shortcut A


def test_missing_backbone_key_is_refused(tmp_path: Path) -> None:
    ref = _reference(10, seed=1)
    sd = {"module." + k: v for k, v in ref.state_dict().items() if k != "layer2.0.bn1.weight"}
    f = tmp_path / "synthetic_resnet_10.pth"
    torch.save({"state_dict": sd}, f)
    with pytest.raises(WeightsError, match=r"layer2\.0\.bn1\.weight"):
        create_backbone("medicalnet_resnet10", num_classes=2, weights=str(f))


def test_not_a_checkpoint_dict_is_refused(tmp_path: Path) -> None:
    m = MedicalNetResNet(10, num_classes=2)
    with pytest.raises(WeightsError, match="state_dict"):
        load_medicalnet_state_dict(m, {"epoch": 3}, "x.pth")


def _fake_hf_snapshot(tmp_path: Path, depth: int, filename: str, seed: int) -> tuple[str, dict]:
    """A synthetic MedicalNet checkpoint as ``filename`` of a (temporary) Hugging Face cache snapshot."""
    blob_src = tmp_path / "tmp.pth"
    file_sd = _write_medicalnet_checkpoint(_reference(depth, seed=seed), blob_src)
    payload = blob_src.read_bytes()
    repo = tmp_path / "hf_home" / "hub" / f"models--TencentMedicalNet--MedicalNet-Resnet{depth}"
    commit = "a" * 40
    (repo / "blobs").mkdir(parents=True)
    digest = hashlib.sha256(payload).hexdigest()
    (repo / "blobs" / digest).write_bytes(payload)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(repo / "blobs" / digest, snap), snap / filename)
    return digest, file_sd


def test_hf_cache_snapshot_is_found_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A MedicalNet repo snapshot in a (temporary) Hugging Face cache is used, without network."""
    # resnet_18_23dataset.pth has no published sha256 (models/catalog.py): used once the user pins its content
    digest, file_sd = _fake_hf_snapshot(tmp_path, 18, "resnet_18_23dataset.pth", seed=3)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="weights_sha256"):
        create_backbone("medicalnet_resnet18", num_classes=2)
    model = create_backbone("medicalnet_resnet18", num_classes=2, weights_sha256=digest)
    assert model.pretrained_weights.source == "hf_cache"
    assert model.pretrained_weights.sha256 == digest
    assert torch.equal(model.state_dict()["layer4.0.conv2.weight"], file_sd["module.layer4.0.conv2.weight"])


def test_substituted_official_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file under an official name whose sha256 is pinned (resnet_10_23dataset.pth) must be that file."""
    digest, _ = _fake_hf_snapshot(tmp_path, 10, "resnet_10_23dataset.pth", seed=3)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for trust in ({}, {"weights_sha256": digest}, {"allow_unpinned": True}):
        with pytest.raises(WeightsError) as info:
            create_backbone("medicalnet_resnet10", num_classes=2, **trust)
        assert info.value.code == "weights_mismatch"
        assert "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605" in str(info.value)


def test_no_weights_anywhere_lists_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        create_backbone("medicalnet_resnet34", num_classes=2)
    msg = str(info.value)
    assert "TencentMedicalNet/MedicalNet-Resnet34" in msg and "resnet_34_23dataset.pth" in msg
    assert str(tmp_path / "torch") in msg


def test_three_channel_input_adapts_conv1(tmp_path: Path, rng) -> None:
    ref = _reference(10, seed=5)
    f = tmp_path / "synthetic_resnet_10.pth"
    _write_medicalnet_checkpoint(ref, f)
    m1 = create_backbone("medicalnet_resnet10", num_classes=2, weights=str(f)).eval()
    m3 = create_backbone("medicalnet_resnet10", num_classes=2, in_chans=3, weights=str(f)).eval()
    x = torch.from_numpy(rng.standard_normal((1, 1, 8, 16, 16)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(
            m3.forward_features(x.expand(-1, 3, -1, -1, -1)), m1.forward_features(x), atol=1e-4, rtol=1e-4
        )


def test_param_groups_and_gradient_through_shortcut_a(rng) -> None:
    m = create_backbone("medicalnet_resnet18", num_classes=2, pretrained=False)
    groups = param_groups(m)
    assert len(groups) == 6
    assert groups[-1] == [m.fc.weight, m.fc.bias]
    assert groups[0][0] is m.conv1.weight
    freeze(m, 2)  # layer4 + head
    trainable = {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"layer4", "fc"}
    freeze(m, 6)
    # gradient of layer2's output w.r.t. its input flows through the type-A identity shortcut too
    m.train()
    inp = torch.from_numpy(np.abs(rng.standard_normal((1, 64, 4, 8, 8))).astype(np.float32)).requires_grad_()
    with torch.no_grad():
        for p in m.layer2[0].parameters():
            p.zero_()  # residual branch contributes nothing: only the shortcut carries gradient
    m.layer2[0](inp).sum().backward()
    assert inp.grad is not None and float(inp.grad.abs().sum()) > 0


def test_compact_3d_resnet_keeps_resolution_for_small_volumes_and_has_no_weights() -> None:
    from models import create_backbone, get_spec, param_groups
    from pipeline.errors import WeightsError

    m = create_backbone("resnet10_3d_compact", num_classes=3, in_chans=1, pretrained=False)
    x = torch.randn(2, 1, 28, 28, 28)
    feats = m.forward_features(x)
    # 3^3 stride-2 stem, no max-pool, three stride-2 stages: 28 -> 14 -> 14 -> 7 -> 4 -> 2
    assert feats.shape == (2, 256, 2, 2, 2)
    assert m(x).shape == (2, 3) and m.forward_head(feats, pre_logits=True).shape == (2, 256)
    assert len(param_groups(m)) == 6 and get_spec("resnet18_3d_compact").weights is None
    with pytest.raises(WeightsError, match="no known pretrained weights"):
        create_backbone("resnet10_3d_compact", num_classes=2, pretrained=True)
