"""Decoding the matched items of an Ingest run into the workspace's volume cache, in a process pool.

One :class:`DecodeJob` per item: its volume is decoded (:func:`pipeline.ingest.sources.load_item`),
masked when configured, and saved as ``<fingerprint>.npy`` with its public facts beside it as
``<fingerprint>.json`` (with the sha256 of the ``.npy`` bytes: :mod:`pipeline.ingest.volume_cache`). The
fingerprint is keyed over the item's grouping, its files' content hashes and
the load options, so a later snapshot reuses an unchanged volume. A failed item comes back to the parent
as the :class:`~pipeline.errors.IngestError` the worker raised, its ``code`` intact (medtl errors keep
their code through pickling, :class:`~pipeline.errors.MedtlError`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.volume_cache import REBUILT, sidecar_meta, write_recipe, write_volume

#: Part of every volume fingerprint; 3: volumes are checked by :func:`check_values` before caching;
#: 4: the side-car records the volume's sha256 (older volumes are decoded once more); 5: PALETTE COLOR
#: DICOM decodes to RGB through its lookup tables (was: grey palette indices).
CACHE_VERSION = 5


@dataclass(frozen=True)
class DecodeJob:
    """One item to decode into ``cache_file`` (picklable: it crosses into a worker process)."""

    item: Any  # SourceItem
    cache_file: str
    options: Any  # LoadOptions
    mask_regions: tuple = ()
    hashes: tuple = ()  # the source files' fingerprint parts (sha256 or size:mtime), for a later rebuild


def cached_meta(cache_file: Path) -> dict[str, Any] | None:
    """The public facts saved beside a cached volume, or None when the volume is not (intactly) cached:
    no side-car, no digest in it, or a ``.npy`` of another length than recorded (stat only, see
    :func:`pipeline.ingest.volume_cache.sidecar_meta`)."""
    return sidecar_meta(cache_file)


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


def file_stamps(item: Any, hashes: list[str | None]) -> list[str]:
    """The source files' part of a volume fingerprint: content hashes from the index scan, or size + mtime
    of every file when one is missing (not from an index scan)."""
    if any(h is None for h in hashes):
        return [f"{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}" for f in item.files]
    return list(hashes)


def fingerprint(key: bytes, item: Any, options: Any, hashes: list[str | None], mask: tuple = ()) -> str:
    """Keyed fingerprint of a volume: item key (grouping + relative paths), file contents, options."""
    hashes = file_stamps(item, hashes)
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
    meta["affine"] = vol.affine.tolist()
    meta["shape"] = list(array.shape)
    write_volume(cache_file, array, meta)
    return json.loads(cache_file.with_suffix(".json").read_text())


def run_jobs(
    jobs: list[DecodeJob], processes: int, recipes: Path | None = None, audit: Counter | None = None
) -> tuple[list[Any], int]:
    """Decode the jobs whose volume is not (intactly) cached yet, in a pool of ``processes`` processes.

    Args:
        jobs: One per item.
        processes: Worker processes.
        recipes: Private folder for each volume's rebuild recipe (:func:`volume_cache.write_recipe`).
        audit: Counter updated with ``cache_rebuilt`` (and ``cache_unreadable``) for every volume that
            was cached but is decoded again because its side-car or length is wrong.

    Returns:
        The meta dict of every job in order (the IngestError, code intact, in place of a failed one;
        other errors propagate), and how many volumes were decoded (the rest came from the cache).
    """
    out: list[Any] = [cached_meta(Path(j.cache_file)) for j in jobs]
    todo = [i for i, m in enumerate(out) if m is None]
    for i in todo:  # a broken cached volume: remove it so the worker decodes it again (not silent: audit)
        f = Path(jobs[i].cache_file)
        if f.exists() or f.with_suffix(".json").exists():
            f.unlink(missing_ok=True)
            f.with_suffix(".json").unlink(missing_ok=True)
            if audit is not None:
                audit[REBUILT] += 1
                audit["cache_unreadable"] += 1
    out, n = _decode(jobs, out, todo, processes)
    if recipes is not None:
        recipes.mkdir(parents=True, exist_ok=True)
        for job, res in zip(jobs, out, strict=True):
            if not isinstance(res, IngestError):
                write_recipe(recipes, job)
    return out, n


def _decode(jobs: list[DecodeJob], out: list[Any], todo: list[int], processes: int) -> tuple[list[Any], int]:
    from pipeline.progress import track

    if processes <= 1 or len(todo) < 4:
        for i in track(todo, len(todo), "Ingest: decoding"):
            try:
                out[i] = safe_decode(jobs[i])
            except IngestError as err:
                out[i] = err
        return out, len(todo)
    with ProcessPoolExecutor(max_workers=min(processes, len(todo))) as pool:
        futures = {i: pool.submit(safe_decode, jobs[i]) for i in todo}
        for i, f in track(futures.items(), len(futures), "Ingest: decoding"):
            try:
                out[i] = f.result()
            except IngestError as err:  # pickled in the worker, rebuilt here with its code
                out[i] = err
    return out, len(todo)
