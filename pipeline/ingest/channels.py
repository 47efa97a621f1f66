"""Several images per case (``data.channels``): which image each channel is, and one volume of them all.

Without ``data.channels`` a case is one series or file. With it, a case is what the label row's id names
(:func:`select_cases`):

* ``series_description`` channels (DICOM): every series sharing the row's ``id_type`` value
  (StudyInstanceUID, PatientID, AccessionNumber, SeriesInstanceUID; with ``path``, every series under the
  folder the row names). Series that share such a value but no row names them form an unlabelled case, as
  unnamed series are unlabelled cases without channels. Each channel's regex is searched, case-insensitive,
  in the SeriesDescription (0008,103E) of the case's series (read here from one file per series, kept in
  memory only).
* ``column`` channels (NIfTI/PNG): the CSV row; each channel's column holds the image's path relative to
  ``data.source`` (a file, or the folder of a DICOM series).

Per case: no image for a channel is ``missing_channel``, two are ``ambiguous_channel``. Each channel's image
is decoded and cached as without channels (its own verified volume), then :func:`combine` puts the channels
on the FIRST channel's grid in world space (MONAI ``ResampleToMatch`` on MetaTensors with the volumes'
affines) and the case is cached as one volume ``(X, Y, Z, C)`` (``meta["axis4"] = "channels"``, the channel
axis last as the colour volumes of the cache keep it; Augment makes it the first axis of the network input).
A channel covering less than :data:`MIN_OVERLAP` of the first channel's field of view is
``channel_grid_mismatch``. A 4D channel (time/echo) gives its ``volume`` (default the first: the case is
flagged ``4d_first_volume_only``). These are per-case problems; the run goes on with the other cases.

Privacy: reasons name the channel by its configured name and the case by pseudonym and CSV line only,
never a SeriesDescription, a path or an identifier. The combined volume's rebuild recipe (the channel volumes
it is made of) is kept under ``private/cache/`` like every other recipe.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, IngestError

#: Part of every combined volume's fingerprint (bump when :func:`combine` changes what it writes).
COMBINE_VERSION = 1
#: Least share of the first channel's field of view another channel must cover (world space).
MIN_OVERLAP = 0.5
FOUR_D_FLAG = "4d_first_volume_only"
#: ITU-R BT.601 luma weights (as ``pipeline.augment.preprocess.LUMA``, which this layer cannot import): a
#: colour image used as one channel becomes its luminance.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: Side-car keys of a channel volume that describe its own file, not the combined case.
_OWN_KEYS = {"sha256", "bytes", "volume", "shape", "affine", "dtype", "axis4", "masked_regions"}


@dataclass
class ChannelCase:
    """One case of a channel run (PRIVATE: ``key`` and ``ref`` may be identifiers).

    Attributes:
        key: The case key (pseudonymised as the case id): ``<id_type>|<ref>`` or ``row|<ref>``.
        ref: The labels CSV reference naming the case, or None (an unlabelled group of series).
        line: The CSV line of its row (0: none).
        items: Per channel, the index in the scanned items of its image (None: missing).
        problem: ``(code, channel index)`` of the first channel that cannot be selected, or None.
    """

    key: str
    ref: str | None
    line: int
    items: list[int | None] = field(default_factory=list)
    problem: tuple[str, int] | None = None


@dataclass
class ChannelRun:
    """What :func:`run_channel_cases` gives the Ingest stage: cases shaped as scanned items, so the manifest
    rows are built by the same code as without channels."""

    items: list[Any]
    matched: dict[int, Any]
    jobs: list[tuple[int, Any]]
    results: list[Any]
    stats: dict[str, Any]
    n_decoded: int = 0  # volumes decoded or combined by this run
    n_volumes: int = 0  # channel volumes and combined volumes this run needed


def series_descriptions(items: list[Any], indices: set[int]) -> dict[int, str]:
    """SeriesDescription (0008,103E) of each DICOM item in ``indices`` (PRIVATE: free text; "" when absent).

    One header per series, read without pixels: the scan's incremental index stores no description, and a
    description never leaves memory.
    """
    from pipeline.ingest.dicom_values import _quiet_dcmread

    out: dict[int, str] = {}
    for i in sorted(indices):
        item = items[i]
        if item.kind != "dicom":
            out[i] = ""
            continue
        try:
            ds = _quiet_dcmread(item.files[0], stop_before_pixels=True, specific_tags=["SeriesDescription"])
            out[i] = str(ds.get("SeriesDescription") or "").strip()
        except Exception:  # noqa: BLE001 - unreadable since the scan: no description, no channel match
            out[i] = ""
    return out


def _groups(items: list[Any], id_type: str, refs_of: Callable[[Any], list[str]]) -> dict[str, list[int]]:
    """Series grouped by the case id (``id_type`` value); with ``path``, by every folder above them."""
    groups: dict[str, list[int]] = {}
    for idx, item in enumerate(items):
        if id_type == "path":
            keys: set[str] = set()
            for ref in refs_of(item):
                parts = ref.split("/")
                keys.update("/".join(parts[:n]) for n in range(1, len(parts)))
                keys.add(ref)
        else:
            value = ((item.ids or {}).get(id_type) or "").strip()
            keys = {value} if value else set()
        for k in keys:
            groups.setdefault(k, []).append(idx)
    return groups


def _labels_table(data: Any) -> dict[int, dict[str, str]]:
    """CSV line -> row of the labels CSV (column channels), checking the channel columns exist."""
    from pipeline.ingest.labels import read_table

    header, rows = read_table(Path(data.labels_csv))
    for i, ch in enumerate(data.channels):
        if ch.column not in header:
            raise ConfigError(
                f"data.channels[{i}].column: column {ch.column!r} is not in {Path(data.labels_csv).name}; "
                f"expected one of its columns {header}",
                code="missing_column",
            )
    return {line: row for line, row in enumerate(rows, start=2)}


def select_cases(
    data: Any,
    items: list[Any],
    labels: dict[str, Any],
    conflicted: set[str],
    refs_of: Callable[[Any], list[str]],
) -> tuple[list[ChannelCase], set[int], list[str]]:
    """The cases of a channel run and, per case, each channel's image.

    Args:
        data: The ``data`` config section (``channels`` set).
        items: The scanned items.
        labels: Usable label rows by reference (:func:`pipeline.ingest.labels.read_labels`).
        conflicted: References whose rows disagree (their case is left out).
        refs_of: An item's references as a relative path (the file, or a series' folder).

    Returns:
        The cases (sorted by key), the indices of items no case uses, and the label references that name
        no case.
    """
    from pipeline.ingest.labels import normalise_ref

    channels = list(data.channels)
    cases: list[ChannelCase] = []
    unnamed: list[str] = []
    if channels[0].column is not None:  # column channels: one case per CSV row
        table = _labels_table(data)
        by_path: dict[str, list[int]] = {}
        for idx, item in enumerate(items):
            for ref in dict.fromkeys(refs_of(item)):
                by_path.setdefault(ref, []).append(idx)
        for ref, row in labels.items():
            case = ChannelCase(f"row|{ref}", ref, row.line)
            cells = table.get(row.line, {})
            for c, ch in enumerate(channels):
                cell = normalise_ref(cells.get(ch.column) or "", "path")
                found = by_path.get(cell, []) if cell else []
                case.items.append(found[0] if len(found) == 1 else None)
                if len(found) != 1 and case.problem is None:
                    case.problem = ("missing_channel" if not found else "ambiguous_channel", c)
            cases.append(case)
    else:
        groups = _groups(items, data.id_type, refs_of)
        wanted = set(labels) | (set() if data.id_type == "path" else set(groups))
        wanted -= conflicted
        unnamed = sorted(r for r in labels if r not in groups)
        member = {i for ref in wanted if ref in groups for i in groups[ref]}
        desc = series_descriptions(items, member)
        patterns = [re.compile(ch.series_description, re.IGNORECASE) for ch in channels]
        for ref in sorted(r for r in wanted if r in groups):
            row = labels.get(ref)
            case = ChannelCase(f"{data.id_type}|{ref}", ref if row else None, row.line if row else 0)
            for c, pat in enumerate(patterns):
                found = [i for i in groups[ref] if pat.search(desc.get(i, ""))]
                case.items.append(found[0] if len(found) == 1 else None)
                if len(found) != 1 and case.problem is None:
                    case.problem = ("missing_channel" if not found else "ambiguous_channel", c)
            cases.append(case)
    used = {i for case in cases for i in case.items if i is not None}
    cases.sort(key=lambda c: c.key)
    return cases, set(range(len(items))) - used, unnamed


def _single(
    array: np.ndarray, meta: dict[str, Any], volume: int | None, where: str, flags: list[str]
) -> np.ndarray:
    """One channel's image as ``(X, Y, Z)`` float32: colour -> luminance, a 4D series -> one volume."""
    a = np.asarray(array)
    if a.ndim == 4 and meta.get("axis4") == "rgb" and a.shape[3] in (3, 4):
        flags.append("colour_channel_as_luminance")
        return np.tensordot(a[..., :3].astype(np.float32), _LUMA, axes=([3], [0]))
    n = a.shape[3] if a.ndim == 4 else 1
    index = volume or 0
    if index >= n:
        raise IngestError(
            f"{where}: data.channels volume {index} requested but the image holds {n} volume(s); expected an "
            "index below that",
            "channel_volume_missing",
        )
    if a.ndim == 4 and volume is None and n > 1:
        flags.append(FOUR_D_FLAG)
    return (a[..., index] if a.ndim == 4 else a).astype(np.float32, copy=False)


def fov_overlap(
    shape: tuple[int, ...], affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray
) -> float:
    """Share of the reference grid's field of view (``ref_shape`` voxels, ``ref_affine``) that the other
    grid covers in world space, measured on up to 24 reference voxel centres per axis (exact for axis-aligned
    grids up to that resolution; oblique grids are handled the same way)."""
    axes = [np.linspace(0, n - 1, min(n, 24)) for n in ref_shape[:3]]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    world = pts @ np.asarray(ref_affine)[:3, :3].T + np.asarray(ref_affine)[:3, 3]
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    vox = world @ inv[:3, :3].T + inv[:3, 3]
    upper = np.asarray(shape[:3], dtype=np.float64) - 0.5
    inside = np.all((vox >= -0.5 - 1e-6) & (vox <= upper + 1e-6), axis=1)
    return float(inside.mean())


def resample_to(
    array: np.ndarray, affine: np.ndarray, ref_shape: tuple[int, ...], ref_affine: np.ndarray
) -> np.ndarray:
    """``array`` (``(X, Y, Z)``, ``affine``) resampled onto the reference grid in world space (MONAI
    ``ResampleToMatch``, trilinear, zeros outside the image)."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    src = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None],
        affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)),
    )
    dst = MetaTensor(
        torch.zeros((1, *ref_shape[:3]), dtype=torch.float32),
        affine=torch.as_tensor(np.asarray(ref_affine, dtype=np.float64)),
    )
    out = ResampleToMatch(mode="bilinear", padding_mode="zeros")(src, dst)
    return np.asarray(out.as_tensor().numpy()[0], dtype=np.float32)


def combine(
    volumes: list[tuple[np.ndarray, dict[str, Any]]], channels: list[Any], case: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The channels of one case on the first channel's grid, as one ``(X, Y, Z, C)`` float32 volume.

    Args:
        volumes: Per channel, its cached voxels and side-car (``affine`` = RAS+ voxel-to-mm).
        channels: The ``data.channels`` entries, in order.
        case: The case as named in messages (pseudonym and CSV line only).

    Returns:
        The array and its public side-car facts (the first channel's, with ``axis4 = "channels"``,
        ``channel_names``, each channel's ``channel_overlap`` and the flags of every channel).

    Raises:
        IngestError: ``channel_grid_mismatch`` (a channel covers under :data:`MIN_OVERLAP` of the first
            channel's field of view) or ``channel_volume_missing`` (a ``volume`` index past the series' end).
    """
    flags: list[str] = []
    ref_affine = np.asarray(volumes[0][1]["affine"], dtype=np.float64)
    planes, overlaps = [], []
    for (array, meta), ch in zip(volumes, channels, strict=True):
        where = f"case {case}: channel {ch.name!r}"
        img = _single(array, meta, ch.volume, where, flags)
        flags.extend(meta.get("flags") or [])
        affine = np.asarray(meta["affine"], dtype=np.float64)
        if not planes:
            planes.append(img)
            overlaps.append(1.0)
            continue
        ref_shape = planes[0].shape
        if img.shape == ref_shape and np.allclose(affine, ref_affine, atol=1e-4):
            planes.append(img)
            overlaps.append(1.0)
            continue
        share = fov_overlap(img.shape, affine, ref_shape, ref_affine)
        if share < MIN_OVERLAP:
            raise IngestError(
                f"{where} covers {share:.0%} of the field of view of channel {channels[0].name!r} in world "
                f"space; expected at least {MIN_OVERLAP:.0%} (channels on different grids are resampled onto "
                "the first channel's, but these barely overlap)",
                "channel_grid_mismatch",
            )
        planes.append(resample_to(img, affine, ref_shape, ref_affine))
        overlaps.append(round(share, 4))
        flags.append("channels_resampled")
    out = np.stack(planes, axis=-1)
    first = volumes[0][1]
    meta = {k: v for k, v in first.items() if k not in _OWN_KEYS}
    meta.update(
        axis4="channels",
        channel_names=[ch.name for ch in channels],
        channel_overlap=overlaps,
        flags=list(dict.fromkeys(flags)),
        affine=ref_affine.tolist(),
        shape=list(out.shape),
        dtype="float32",
    )
    return out, meta


def combined_fingerprint(key: bytes, channels: list[Any], volumes: list[str]) -> str:
    """Keyed fingerprint of a combined volume: the channel volumes (themselves content fingerprints), the
    channel entries and :data:`COMBINE_VERSION`."""
    blob = json.dumps(
        ["channels", [ch.model_dump(mode="json") for ch in channels], volumes, COMBINE_VERSION],
        separators=(",", ":"),
    )
    return hmac.new(key, blob.encode(), hashlib.sha256).hexdigest()[:24]


def build_combined(
    workspace: Path, recipe: dict[str, Any], cache_file: Path, audit: Counter | None = None
) -> dict[str, Any]:
    """Write ``cache_file`` from the channel volumes its recipe names (each verified, and rebuilt from its
    sources when unusable); returns the side-car. Raises IngestError as :func:`combine` does."""
    from pipeline.config.sections import ChannelConfig
    from pipeline.ingest.volume_cache import load_volume, write_volume

    channels = [ChannelConfig(**c) for c in recipe["channels"]]
    volumes = [load_volume(workspace, v, audit) for v in recipe["volumes"]]
    array, meta = combine(volumes, channels, recipe.get("case", "?"))
    return write_volume(cache_file, array, meta)


def run_channel_cases(
    run: Any,
    scan: Any,
    ledger: Any,
    decode_job: Callable[[Any], Any],
    refs_of: Callable[[Any], list[str]],
    unlabelled: Any,
    audit: Counter,
) -> ChannelRun:
    """The Ingest stage with ``data.channels``: select, decode each channel, combine, cache.

    Args:
        run: The stage's run (config, key, cache folder, private folder, ``token``).
        scan: What the scan gave (items, label rows, label problems).
        ledger: Where problems (shared, redacted) and per-file statuses (private) go.
        decode_job: An item -> its :class:`~pipeline.ingest.decode_jobs.DecodeJob` (as without channels).
        refs_of: An item's relative-path references.
        unlabelled: The label row of a case no CSV row names.
        audit: Cache audit counter (volumes rebuilt, by cause).

    Returns:
        The cases as items (key = case key, files = every channel's files, ids = the first channel's), their
        label rows, one job per case naming the combined volume, and the combined side-car or the
        IngestError per case.
    """
    from pipeline.ingest.decode_jobs import DecodeJob, run_jobs
    from pipeline.ingest.deid import ensure_private_dir, pseudonym
    from pipeline.ingest.sources import SourceItem
    from pipeline.ingest.volume_cache import sidecar_meta
    from pipeline.io import write_json

    cfg = run.cfg
    channels = list(cfg.data.channels)
    conflicted = {p.ref for p in scan.label_problems if p.code == "conflicting_duplicate"}
    cases, unused, unnamed = select_cases(cfg.data, scan.items, scan.labels, conflicted, refs_of)
    for ref in unnamed:
        line = scan.labels[ref].line
        ledger.problems.append(
            {
                "code": "label_without_case",
                "row": line,
                "reason": f"labels CSV line {line}: names a case ({cfg.data.id_type}) that is not among the "
                "readable inputs; row ignored",
            }
        )
    for i in sorted(unused):
        for f in scan.items[i].files:
            ledger.files_status.append(
                {"path": f, "file": run.token(f), "status": "unused", "code": "not_a_channel"}
            )
    accepted: list[ChannelCase] = []
    for case in cases:
        cid = pseudonym(case.key, run.key, prefix="C")
        if case.problem is None:
            accepted.append(case)
            continue
        code, c = case.problem
        where = f"case {cid}" + (f" (labels CSV line {case.line})" if case.line else "")
        what = "no image matches" if code == "missing_channel" else "more than one image matches"
        ledger.problems.append(
            {
                "code": code,
                "case_id": cid,
                **({"row": case.line} if case.line else {}),
                "reason": f"{where}: {what} channel {channels[c].name!r} (data.channels[{c}]); expected "
                "exactly one; case left out",
            }
        )
        for i in case.items:
            for f in scan.items[i].files if i is not None else ():
                ledger.files_status.append(
                    {"path": f, "file": run.token(f), "status": "left_out", "code": code}
                )

    needed = sorted({i for case in accepted for i in case.items})
    jobs = {i: decode_job(scan.items[i]) for i in needed}
    recipes = ensure_private_dir(run.private / "cache")
    decoded, n_decoded = run_jobs([jobs[i] for i in needed], cfg.ingest.processes, recipes, audit)
    by_item = dict(zip(needed, decoded, strict=True))

    out = ChannelRun([], {}, [], [], {})
    tally: Counter = Counter()
    workspace = run.private.parent
    from pipeline.progress import track

    for case in track(accepted, len(accepted), "Ingest: combining channels"):
        members = [scan.items[i] for i in case.items]  # type: ignore[index]
        files = tuple(sorted({f for m in members for f in m.files}))
        item = SourceItem(case.key, members[0].kind, files, dict(members[0].ids), {})
        cid = pseudonym(case.key, run.key, prefix="C")
        names = [Path(jobs[i].cache_file).name for i in case.items]  # type: ignore[index]
        cache_file = Path(run.cache_dir) / f"{combined_fingerprint(run.key, channels, names)}.npy"
        failed = next(
            ((c, by_item[i]) for c, i in enumerate(case.items) if isinstance(by_item[i], IngestError)), None
        )
        if failed is not None:
            c, err = failed
            res: Any = IngestError(f"case {cid}: channel {channels[c].name!r}: {err.reason}", err.code)
        else:
            recipe = {
                "combine": True,
                "case": cid,
                "channels": [ch.model_dump(mode="json") for ch in channels],
                "volumes": names,
            }
            res = sidecar_meta(cache_file)
            if res is None:
                try:
                    res = build_combined(workspace, recipe, cache_file, audit)
                    tally["combined"] += 1
                except IngestError as err:
                    res = err
            else:
                tally["reused"] += 1
            if not isinstance(res, IngestError):
                recipe_file = recipes / f"{cache_file.stem}.json"
                if not recipe_file.exists():
                    write_json(recipe_file, recipe, mode=0o600)
                for flag in res.get("flags") or []:
                    if flag in (FOUR_D_FLAG, "channels_resampled", "colour_channel_as_luminance"):
                        tally[flag] += 1
        if isinstance(res, IngestError):  # a per-case problem named by pseudonym and CSV line
            ledger.failed(run, list(files), res, case_id=cid, **({"row": case.line} if case.line else {}))
            continue
        idx = len(out.items)
        out.items.append(item)
        out.matched[idx] = scan.labels.get(case.ref) if case.ref is not None else unlabelled
        out.jobs.append((idx, DecodeJob(item, str(cache_file), jobs[case.items[0]].options)))  # type: ignore[index]
        out.results.append(res)
    out.stats = {
        "names": [ch.name for ch in channels],
        "selected_by": "column" if channels[0].column is not None else "series_description",
        "cases_formed": len(cases),
        "cases_selected": len(accepted),
        "images_not_used": len(unused),
        "channel_volumes_decoded": n_decoded,
        "channel_volumes_reused": len(needed) - n_decoded,
        "combined_volumes_built": tally["combined"],
        "combined_volumes_reused": tally["reused"],
        "cases_resampled": tally["channels_resampled"],
        "cases_4d_first_volume_only": tally[FOUR_D_FLAG],
        "rule": f"one image per channel and case; channels resampled onto the first channel's grid (world "
        f"space); a channel covering under {MIN_OVERLAP:.0%} of its field of view rejects the case "
        "(channel_grid_mismatch); a 4D series gives its first volume unless data.channels sets volume "
        f"({FOUR_D_FLAG})",
    }
    out.n_decoded = n_decoded + tally["combined"]
    out.n_volumes = len(needed) + tally["combined"] + tally["reused"]
    return out


def case_units(
    data: Any, items: list[Any], key: bytes, problems: list[dict[str, Any]]
) -> list[tuple[str, list[Any]]]:
    """The cases of a folder without a labels CSV (``medtl predict``, ``validate``, ``convert``): series
    grouped by ``data.id_type``, each channel's series picked by its SeriesDescription pattern
    (:func:`select_cases`); cases without exactly one series per channel are appended to ``problems``
    (pseudonym, code and channel name only).

    Returns:
        ``(case key, [the channels' items in channel order])`` per usable case.
    """
    from pipeline.ingest.deid import pseudonym

    cases, _unused, _ = select_cases(data, items, {}, set(), lambda item: [])
    units = []
    for case in cases:
        if case.problem is not None:
            problems.append(
                {
                    "case_id": pseudonym(case.key, key, prefix="C"),
                    "code": case.problem[0],
                    "channel": data.channels[case.problem[1]].name,
                }
            )
            continue
        units.append((case.key, [items[i] for i in case.items]))
    return units


def load_case(data: Any, members: list[Any], options: Any, case_id: str) -> Any:
    """One scan, or the channels of one case combined as Ingest combines them (``(X, Y, Z, C)``), as a
    :class:`pipeline.ingest.volume.Volume` whose meta keeps only non-identifying keys."""
    from pipeline.ingest.decode_jobs import check_values
    from pipeline.ingest.sources import load_item
    from pipeline.ingest.volume import Volume

    if len(members) == 1 and not data.channels:
        return load_item(members[0], options)
    vols = [load_item(m, options) for m in members]
    for ch, v in zip(data.channels, vols, strict=True):
        check_values(v.array, f"case {case_id}: channel {ch.name!r}")
    array, meta = combine(
        [(v.array, dict(v.meta, affine=v.affine.tolist())) for v in vols], list(data.channels), case_id
    )
    keep = ("modality", "manufacturer", "flags", "geometry", "source_kind")
    public = {k: v for k, v in meta.items() if k in keep}
    return Volume(array, np.asarray(meta["affine"]), dict(public, axis4="channels"))
