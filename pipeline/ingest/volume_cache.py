"""Integrity of the workspace's volume cache (``<workspace>/cache/volumes/<fingerprint>.npy`` + ``.json``).

Every cached volume carries the sha256 of its ``.npy`` bytes, its byte count and its own file name in the
``.json`` side-car, written when the volume is decoded. Two checks use them:

* :func:`sidecar_meta` (Ingest, deciding whether a volume must be decoded): stat-only, never reads the
  voxels: side-car readable, digest present, names this volume, ``.npy`` size as recorded. A truncated
  volume is decoded again.
* :func:`load_volume` (Augment, Promote, predict's reference: whenever voxels are READ FOR USE): the bytes
  read are hashed once and compared with the digest. On a mismatch (a truncated file, another case's array
  copied over it) or an unreadable file, the volume is rebuilt from its source files (decoded again, as
  Ingest did) with the private recipe Ingest left under ``private/cache/<fingerprint>.json``; the caller's
  ``audit`` counts it (code ``cache_rebuilt``). When the sources are gone or changed since, the volume
  cannot be rebuilt: :class:`CacheFault` code ``cache_lost``, a per-case rejection for the caller.

A multi-channel case volume (``data.channels``, :mod:`pipeline.ingest.channels`) is rebuilt the same way from
its recipe, which names the channel volumes it combines (each verified, and rebuilt from its sources, first).

The recipe holds source paths and identifiers, so it lives under ``private/`` (mode 0600), never beside the
volume. Messages name the volume by its fingerprint file name only (no source path, no value).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.io import write_bytes, write_json

REBUILT = "cache_rebuilt"
LOST = "cache_lost"


class CacheFault(IngestError):
    """A cached volume that is unusable (code ``cache_unreadable``, ``cache_mismatch``) or cannot be
    rebuilt (code ``cache_lost``)."""


def npy_bytes(array: np.ndarray) -> bytes:
    """The ``.npy`` bytes of ``array`` (C order, no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_volume(cache_file: Path, array: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    """Save ``array`` and its side-car (``meta`` plus ``sha256``, ``bytes`` and ``volume``), atomically;
    the side-car is written last, so a volume without one is never taken for cached. Returns the side-car."""
    data = npy_bytes(array)
    write_bytes(cache_file, data)
    meta = dict(meta, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data), volume=cache_file.name)
    write_json(cache_file.with_suffix(".json"), meta)
    return meta


def sidecar_meta(cache_file: Path) -> dict[str, Any] | None:
    """The side-car of a cached volume when it looks intact from ``stat`` alone, else None.

    Intact: side-car readable JSON with a ``sha256``, naming this file, and the ``.npy`` as long as
    recorded. The voxels are not read (see :func:`load_volume` for the content check).
    """
    try:
        meta = json.loads(cache_file.with_suffix(".json").read_text())
        size = cache_file.stat().st_size
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get("sha256") or meta.get("volume") != cache_file.name:
        return None
    return meta if meta.get("bytes") == size else None


def verified_load(cache_file: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a cached volume, checking its bytes against the digest in its side-car (one hash per read).

    Raises:
        CacheFault: code ``cache_unreadable`` (missing, unreadable, no digest) or ``cache_mismatch``.
    """
    name = cache_file.name
    try:
        meta = json.loads(cache_file.with_suffix(".json").read_text())
        data = cache_file.read_bytes()
    except (OSError, ValueError) as err:
        raise CacheFault(
            f"cached volume {name}: cannot be read ({type(err).__name__}); expected a volume and side-car",
            "cache_unreadable",
        ) from err
    if not isinstance(meta, dict) or not meta.get("sha256") or meta.get("volume") != name:
        raise CacheFault(
            f"cached volume {name}: side-car has no digest for this volume; expected one written by Ingest",
            "cache_unreadable",
        )
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise CacheFault(
            f"cached volume {name}: content ({len(data)} bytes) does not match the sha256 recorded when it "
            f"was written ({meta.get('bytes')} bytes); expected the volume Ingest wrote",
            "cache_mismatch",
        )
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:  # digest matched but not a plain array: written by something else
        raise CacheFault(f"cached volume {name}: not a plain .npy array ({err})", "cache_unreadable") from err
    return array, meta


def recipe_dir(workspace: Path) -> Path:
    """Where Ingest keeps how to rebuild each cached volume (PRIVATE: source paths and identifiers)."""
    return Path(workspace) / "private" / "cache"


def write_recipe(folder: Path, job: Any) -> None:
    """Record how to rebuild ``job``'s volume (once per volume: skipped when the recipe exists)."""
    from pipeline.ingest.sources import item_to_dict

    path = folder / (Path(job.cache_file).stem + ".json")
    if path.exists():
        return
    recipe = {
        "item": item_to_dict(job.item),
        "options": {"tilt": job.options.tilt, "uneven_spacing": job.options.uneven_spacing},
        "mask_regions": [list(r) for r in job.mask_regions],
        "hashes": list(job.hashes),
    }
    write_json(path, recipe, mode=0o600)


def source_stamp(path: str, recorded: str | None) -> str:
    """The current value of a source file's recorded fingerprint part: sha256, or ``size:mtime_ns`` where
    the fingerprint used that (see :func:`pipeline.ingest.decode_jobs.fingerprint`)."""
    if recorded is not None and ":" not in recorded:
        from pipeline.io import file_sha256

        return file_sha256(path)
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}"


def rebuild(workspace: Path, cache_file: Path) -> None:
    """Decode ``cache_file``'s volume again from its sources (the unusable files are replaced).

    Raises:
        CacheFault: code ``cache_lost``: no recipe, a source file gone, changed since, or no longer
            decodable.
    """
    from pipeline.ingest.decode_jobs import DecodeJob, _decode_to_cache, unexpected_failure
    from pipeline.ingest.sources import LoadOptions, SourceItem

    name = cache_file.name
    try:
        recipe = json.loads((recipe_dir(workspace) / (cache_file.stem + ".json")).read_text())
        if isinstance(recipe, dict) and recipe.get("combine"):
            return _rebuild_combined(workspace, cache_file, recipe)
        it = recipe["item"]
        item = SourceItem(it["key"], it["kind"], tuple(it["files"]), dict(it["ids"]), dict(it["header"]))
        hashes = list(recipe.get("hashes") or [None] * len(item.files))
        options = LoadOptions(**recipe["options"])
        mask = tuple(tuple(int(v) for v in r) for r in recipe["mask_regions"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CacheFault(
            f"cached volume {name} is unusable and no readable rebuild recipe was recorded; expected "
            "Ingest to run again",
            LOST,
        ) from err
    for i, (f, h) in enumerate(zip(item.files, hashes, strict=True)):
        try:
            same = source_stamp(f, h) == h if h is not None else os.path.isfile(f)
        except OSError:
            same = False
        if not same:  # message: position only, never the path
            raise CacheFault(
                f"cached volume {name} is unusable and its source file {i + 1} of {len(item.files)} is gone "
                "or changed since it was ingested; expected the source to rebuild it from",
                LOST,
            )
    job = DecodeJob(item, str(cache_file), options, mask, tuple(hashes))
    for stale in (cache_file.with_suffix(".json"), cache_file):
        stale.unlink(missing_ok=True)
    try:
        _decode_to_cache(job)
    except IngestError as err:
        raise CacheFault(f"cached volume {name}: rebuilding failed ({err.code})", LOST) from err
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a reader failure is a per-case loss, as at ingest
        raise CacheFault(
            f"cached volume {name}: rebuilding failed ({unexpected_failure(item, err).code})", LOST
        ) from err


def _rebuild_combined(workspace: Path, cache_file: Path, recipe: dict[str, Any]) -> None:
    """Rebuild a multi-channel case volume (``data.channels``) from the channel volumes its recipe names,
    each verified (and itself rebuilt from its sources when unusable), as Ingest combined them."""
    from pipeline.ingest.channels import build_combined

    for stale in (cache_file.with_suffix(".json"), cache_file):
        stale.unlink(missing_ok=True)
    try:
        build_combined(workspace, recipe, cache_file)
    except IngestError as err:  # a channel volume lost (cache_lost) or the combination refused
        raise CacheFault(
            f"cached volume {cache_file.name}: rebuilding its channels failed ({err.code})", LOST
        ) from err


def load_volume(
    workspace: Path, volume: str, audit: Counter | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """A cached volume's voxels and side-car, verified; rebuilt from its sources when unusable.

    Args:
        workspace: The workspace (its ``cache/volumes`` and ``private/cache``).
        volume: The volume's file name (a manifest's ``volume`` column).
        audit: Counter updated with ``cache_rebuilt`` and the fault code that caused it.

    Raises:
        CacheFault: code ``cache_lost`` (see :func:`rebuild`).
    """
    cache_file = Path(workspace) / "cache" / "volumes" / Path(volume).name
    try:
        return verified_load(cache_file)
    except CacheFault as fault:
        rebuild(workspace, cache_file)
        if audit is not None:
            audit[REBUILT] += 1
            audit[fault.code] += 1
    return verified_load(cache_file)


__all__ = [
    "CacheFault",
    "LOST",
    "REBUILT",
    "load_volume",
    "npy_bytes",
    "rebuild",
    "recipe_dir",
    "sidecar_meta",
    "verified_load",
    "write_recipe",
    "write_volume",
]
