"""Decoding the matched items of an Ingest run into the workspace's volume cache, in a process pool.

One :class:`DecodeJob` per item: its volume is decoded (:func:`pipeline.ingest.sources.load_item`),
masked when configured, and saved as ``<fingerprint>.npy`` with its public facts beside it as
``<fingerprint>.json``. The fingerprint is keyed over the item's grouping, its files' content hashes and
the load options, so a later snapshot reuses an unchanged volume. A failed item comes back to the parent
as the :class:`~pipeline.errors.IngestError` the worker raised, its ``code`` intact (medtl errors keep
their code through pickling, :class:`~pipeline.errors.MedtlError`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.io import write_bytes, write_json

#: Part of every volume fingerprint; 3: volumes are checked by :func:`check_values` before caching.
CACHE_VERSION = 3


@dataclass(frozen=True)
class DecodeJob:
    """One item to decode into ``cache_file`` (picklable: it crosses into a worker process)."""

    item: Any  # SourceItem
    cache_file: str
    options: Any  # LoadOptions
    mask_regions: tuple = ()


def cached_meta(cache_file: Path) -> dict[str, Any] | None:
    """The public facts saved beside a cached volume, or None when the volume is not (fully) cached."""
    meta_file = cache_file.with_suffix(".json")
    if cache_file.exists() and meta_file.exists():
        try:
            return json.loads(meta_file.read_text())
        except (OSError, ValueError):
            return None
    return None


def apply_mask_regions(array: np.ndarray, regions: tuple | list) -> np.ndarray:
    """Blank rectangular pixel regions (e.g. burned-in text) of a 2D image.

    Args:
        array: Image in axis order ``(i, j, ...)`` = (column x, row y, ...), as :class:`Volume` holds it.
        regions: ``[x0, y0, x1, y1]`` boxes in pixel coordinates (x = column, y = row, end exclusive),
            clipped to the image.

    Returns:
        A copy with every box set to the image's minimum value.
    """
    out = np.array(array, copy=True)
    fill = out.min() if out.size else 0
    for x0, y0, x1, y1 in regions:
        out[max(0, x0) : max(0, x1), max(0, y0) : max(0, y1), ...] = fill
    return out


def _needs_mask(meta: dict[str, Any], shape: tuple[int, ...]) -> bool:
    flags = meta.get("flags") or []
    is_2d = len(shape) >= 3 and shape[2] == 1 or len(shape) == 2
    return is_2d and ("needs_pixel_review" in flags or "burned_in_annotation" in flags)


def mask_for(item: Any, cfg: Any) -> tuple:
    """The configured mask regions when ``item`` is a single 2D image (applied at decode if flagged)."""
    regions = tuple(tuple(int(v) for v in r) for r in getattr(cfg.ingest, "mask_regions", ()) or ())
    shape = list(item.header.get("shape_guess") or [])
    return regions if len(shape) >= 3 and shape[2] == 1 else ()


def fingerprint(key: bytes, item: Any, options: Any, hashes: list[str | None], mask: tuple = ()) -> str:
    """Keyed fingerprint of a volume: item key (grouping + relative paths), file contents, options."""
    if any(h is None for h in hashes):  # not from an index scan: fall back to size + mtime
        hashes = [f"{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in item.files]
    blob = json.dumps(
        [item.key, hashes, repr(options), [list(m) for m in mask], CACHE_VERSION], separators=(",", ":")
    )
    return hmac.new(key, blob.encode(), hashlib.sha256).hexdigest()[:24]


def safe_decode(job: DecodeJob) -> dict[str, Any]:
    """:func:`_decode_to_cache`, with any unexpected reader failure turned into an IngestError.

    A malformed file must never end the run with a traceback; the error type and message are kept so the
    failure can be reported (code ``decode_failed``). This is the process-pool entry point: an
    IngestError it raises reaches the parent with its code.
    """
    try:
        return _decode_to_cache(job)
    except IngestError:
        raise
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a bad file, or a reader bug: reported, run goes on
        raise unexpected_failure(job.item, err) from err


def _where(item: Any) -> str:
    return item.files[0] if len(item.files) == 1 else f"series starting {item.files[0]}"


def check_values(array: np.ndarray, where: str) -> None:
    """Refuse an image no model can learn from, judged on its stored values as loaded (after the modality
    LUT, before any windowing or normalisation, before masking).

    Raises:
        IngestError: code ``empty`` (no voxels), ``non_finite`` (a NaN or infinite voxel) or ``constant``
            (every voxel the same value). Messages give counts only, never a pixel value.
    """
    if array.size == 0:
        raise IngestError(
            f"{where}: image of shape {list(array.shape)} has no voxels; expected an image", "empty"
        )
    if array.dtype.kind in "fc":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise IngestError(
                f"{where}: {bad} of {array.size} voxels are NaN or infinite; expected finite values",
                "non_finite",
            )
    if array.min() == array.max():
        raise IngestError(
            f"{where}: every one of the {array.size} voxels holds the same value; expected an image with "
            "contrast (a blank or constant image)",
            "constant",
        )


def unexpected_failure(item: Any, err: Exception) -> IngestError:
    """The per-item IngestError (code ``decode_failed``) for an unexpected reader failure on ``item``."""
    where = _where(item)
    return IngestError(
        f"{where}: decoding failed with {type(err).__name__}: {err}; expected a readable "
        f"{item.kind} input (please report this file's structure if it is valid)",
        "decode_failed",
    )


def _decode_to_cache(job: DecodeJob) -> dict[str, Any]:
    """Decode one item and save its voxels (and public facts) to the cache (runs in a worker process)."""
    from pipeline.ingest.sources import load_item  # looked up per call: tests replace it

    cache_file = Path(job.cache_file)
    cached = cached_meta(cache_file)
    if cached is not None:
        return cached
    vol = load_item(job.item, job.options)
    check_values(vol.array, _where(job.item))
    meta = dict(vol.meta)
    array = vol.array
    if job.mask_regions and _needs_mask(meta, array.shape):
        array = apply_mask_regions(array, job.mask_regions)
        meta["flags"] = list(meta.get("flags") or []) + ["masked_regions"]
        meta["masked_regions"] = [list(r) for r in job.mask_regions]
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_bytes(cache_file, buf.getvalue())
    meta["affine"] = vol.affine.tolist()
    meta["shape"] = list(array.shape)
    write_json(cache_file.with_suffix(".json"), meta)
    return json.loads(cache_file.with_suffix(".json").read_text())


def run_jobs(jobs: list[DecodeJob], processes: int) -> tuple[list[Any], int]:
    """Decode the jobs whose volume is not cached yet, in a pool of ``processes`` worker processes.

    Returns:
        The meta dict of every job in order (the IngestError, code intact, in place of a failed one;
        other errors propagate), and how many volumes were decoded (the rest came from the cache).
    """
    out: list[Any] = [cached_meta(Path(j.cache_file)) for j in jobs]
    todo = [i for i, m in enumerate(out) if m is None]
    if processes <= 1 or len(todo) < 4:
        for i in todo:
            try:
                out[i] = safe_decode(jobs[i])
            except IngestError as err:
                out[i] = err
        return out, len(todo)
    with ProcessPoolExecutor(max_workers=min(processes, len(todo))) as pool:
        futures = {i: pool.submit(safe_decode, jobs[i]) for i in todo}
        for i, f in futures.items():
            try:
                out[i] = f.result()
            except IngestError as err:  # pickled in the worker, rebuilt here with its code
                out[i] = err
    return out, len(todo)
