"""Find the imaging inputs under a folder and load them one unit at a time.

:func:`scan_sources` walks a tree, reads only headers (DICOM without pixels, NIfTI headers, image sizes),
groups DICOM files into series/volumes as dcm2niix does and returns picklable :class:`SourceItem` s plus
a :class:`Rejected` entry for every file it cannot use. :func:`load_item` decodes one item into a
:class:`~pipeline.ingest.volume.Volume`; callers run it in a process pool. The source tree is only ever
opened read-only.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import IngestError
from pipeline.ingest.volume import Volume

KINDS = ("dicom", "nifti", "image")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Files never tried as images (side-cars, docs, archives); reported with code ``skipped``.
SKIP_SUFFIXES = (
    ".json",
    ".txt",
    ".md",
    ".csv",
    ".tsv",
    ".xml",
    ".html",
    ".htm",
    ".pdf",
    ".py",
    ".yaml",
    ".yml",
    ".bval",
    ".bvec",
    ".zip",
    ".tar",
    ".tgz",
    ".sh",
    ".log",
    ".ini",
    ".cfg",
    ".rst",
)
SKIP_NAMES = ("LICENSE", "LICENSE.txt", "README", "NOTICE", "COPYING", ".DS_Store", "Thumbs.db")


@dataclass(frozen=True)
class SourceItem:
    """One assembled unit: a DICOM series/volume, one NIfTI file or one 2D image (picklable).

    Attributes:
        key: Stable non-identifying id within the dataset (sha256 over grouping keys + file set), no PHI.
        kind: ``"dicom"``, ``"nifti"`` or ``"image"``.
        files: Absolute source paths, sorted (PRIVATE: never written to shared outputs).
        ids: Identifying keys as :attr:`Volume.ids` (PRIVATE).
        header: Non-identifying facts known without decoding pixels (modality, manufacturer, n_files,
            shape guess ...).
    """

    key: str
    kind: str
    files: tuple[str, ...] = field(repr=False)
    ids: dict = field(default_factory=dict, hash=False, compare=True, repr=False)
    header: dict = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True)
class Rejected:
    """A file that cannot be used, with a human-readable reason and a short stable code.

    Codes: ``empty``, ``not_dicom``, ``dicomdir``, ``no_pixel_data``, ``truncated``,
    ``unsupported_transfer_syntax``, ``mixed_sizes``, ``bad_mosaic``, ``bad_nifti``, ``bad_image``,
    ``skipped``, ``unreadable``; from the walk: ``hidden``, ``symlink_not_followed``, ``broken_symlink``,
    ``unreadable_folder``, ``not_regular``, ``kind_not_selected``.
    """

    path: str
    reason: str
    code: str


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load_item` treats irregular geometry.

    Attributes:
        tilt: ``"correct"`` resamples a gantry-tilted CT onto an orthogonal grid (flag ``tilt_corrected``);
            ``"refuse"`` raises IngestError code ``gantry_tilt``.
        uneven_spacing: ``"resample"`` resamples unevenly spaced slices to equal gaps (flag
            ``resampled_uneven_slices``); ``"refuse"`` raises IngestError code ``uneven_spacing``.
    """

    tilt: str = "correct"
    uneven_spacing: str = "resample"

    def __post_init__(self) -> None:
        if self.tilt not in ("correct", "refuse"):
            raise ValueError(f"LoadOptions.tilt = {self.tilt!r}; expected 'correct' or 'refuse'")
        if self.uneven_spacing not in ("resample", "refuse"):
            raise ValueError(
                f"LoadOptions.uneven_spacing = {self.uneven_spacing!r}; expected 'resample' or 'refuse'"
            )


def _kind_of(path: str) -> str | None:
    low = path.lower()
    name = os.path.basename(path)
    if low.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if low.endswith(IMAGE_SUFFIXES):
        return "image"
    if name in SKIP_NAMES or name.startswith(".") or low.endswith(SKIP_SUFFIXES) or low.endswith(".gz"):
        return None
    return "dicom"


#: How the scan treats symbolic links (stated in the ingest report's ``inputs``).
SYMLINK_POLICY = (
    "a symlink to a file is followed (read as the file it points to); a symlink to a folder is not "
    "followed (code symlink_not_followed); a broken one is reported (code broken_symlink)"
)


def _classify(entry: os.DirEntry, out: list[str], dirs: list[str], rejected: list[Rejected]) -> str:
    """Sort one folder entry: a file to read (``out``), a folder to walk (``dirs``) or a rejection.
    Returns its census category."""
    p = os.path.abspath(entry.path)
    try:
        if entry.name.startswith("."):
            what = "folder" if entry.is_dir(follow_symlinks=False) else "file"
            rejected.append(Rejected(p, f"{p}: hidden {what}, not read (names starting with '.')", "hidden"))
            return f"hidden_{what}"
        if entry.is_symlink():
            if entry.is_dir():
                rejected.append(
                    Rejected(p, f"{p}: symlink to a folder, not followed; expected a real folder",
                             "symlink_not_followed")
                )
                return "symlink_not_followed"
            if entry.is_file():
                out.append(p)
                return "symlink_followed"
            rejected.append(Rejected(p, f"{p}: broken symlink (its target does not exist)", "broken_symlink"))
            return "broken_symlink"
        if entry.is_dir(follow_symlinks=False):
            dirs.append(p)
            return "folder"
        if entry.is_file(follow_symlinks=False):
            out.append(p)
            return "regular_file"
    except OSError as err:
        rejected.append(Rejected(p, f"{p}: cannot be examined ({err.strerror}); expected a readable entry",
                                 "unreadable"))
        return "unreadable"
    rejected.append(
        Rejected(p, f"{p}: not a regular file (a pipe, socket or device); expected files and folders",
                 "not_regular")
    )
    return "not_regular"


def _walk(root: str, rejected: list[Rejected], census: Counter) -> list[str]:
    """Every file to read under ``root``, in ``os.walk`` top-down order (sorted names). Every other entry
    (hidden, symlink not followed, broken symlink, not a regular file, folder that cannot be listed) is
    added to ``rejected`` with a code, and every entry is counted in ``census`` by category: nothing under
    ``root`` is dropped silently (os.walk drops unreadable folders and non-regular files without a word)."""
    out: list[str] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as err:
            p = os.path.abspath(folder)
            if folder == root:
                raise IngestError(f"{p}: input folder cannot be listed ({err.strerror}); expected a readable "
                                  "folder", "unreadable_folder") from err
            census["folder"] -= 1
            census["unreadable_folder"] += 1
            rejected.append(Rejected(p, f"{p}: folder cannot be listed ({err.strerror}); its contents are "
                                     "not counted; expected a readable folder", "unreadable_folder"))
            continue
        dirs: list[str] = []
        for e in entries:
            census[_classify(e, out, dirs, rejected)] += 1
        stack.extend(reversed(dirs))
    return out


def _census(census: Counter, n_rejected_by_code: Counter) -> dict[str, Any]:
    """The public account of the entries under the source (counts and codes only)."""
    cats = {k: v for k, v in sorted(census.items()) if v}
    return {
        "entries": sum(cats.values()),
        "by_category": cats,
        "rejected_by_code": dict(sorted(n_rejected_by_code.items())),
        "symlinks": SYMLINK_POLICY,
        "not_descended": "hidden folders and folders that cannot be listed: their contents are not counted",
    }


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def _encode_result(kind: str, res: Any) -> dict[str, Any]:
    """JSON form of one file's scan result (for the incremental index)."""
    if isinstance(res, Rejected):
        return {"t": "rejected", "code": res.code, "reason": res.reason}
    if kind == "dicom":
        from dataclasses import asdict

        return {"t": "dicom", "rec": asdict(res)}
    return {"t": kind, "header": res}


def _decode_result(path: str, data: dict[str, Any]) -> Any:
    from pipeline.ingest.dicom import HeaderRecord

    t = data["t"]
    if t == "rejected":
        return Rejected(path, data["reason"], data["code"])
    if t == "dicom":
        rec = dict(data["rec"])
        for k in ("group_key", "order_key", "iop", "position"):
            rec[k] = _tuplify(rec[k])
        return HeaderRecord(**rec)
    return data["header"]


def probe_file(path: str, kind: str) -> Any:
    """Read one file's header (no pixels).

    Returns:
        A :class:`~pipeline.ingest.dicom.HeaderRecord` (DICOM), a header-facts dict (NIfTI/image) or a
        :class:`Rejected`.
    """
    from pipeline.ingest import dicom as dcm

    if kind == "dicom":
        res = dcm.read_header(path)
        return Rejected(path, res[1], res[0]) if isinstance(res, tuple) else res
    try:
        if kind == "nifti":
            from pipeline.ingest.nifti import nifti_header

            return nifti_header(path)
        from pipeline.ingest.images import image_header

        return image_header(path)
    except IngestError as err:
        return Rejected(path, err.reason, err.code)


def scan_sources(
    root: str | os.PathLike[str],
    kinds: tuple[str, ...] = KINDS,
    workers: int = 1,
    index: Any = None,
    census: dict[str, Any] | None = None,
) -> tuple[list[SourceItem], list[Rejected]]:
    """Walk ``root`` recursively and return the usable units and the rejected files.

    DICOM files are read header-only (``stop_before_pixels``), with or without the DICM preamble, and
    grouped into series as dcm2niix does (see :func:`pipeline.ingest.dicom.group_series`); DICOMDIR files
    are reported with code ``dicomdir``. Nothing under ``root`` is modified.

    Args:
        root: Folder (or single file) to scan.
        kinds: Subset of ``("dicom", "nifti", "image")`` to look for.
        workers: Threads used to read the headers that are not in ``index`` (I/O bound: helps on network
            shares and cold caches); 1 reads sequentially.
        index: Optional :class:`pipeline.ingest.index.SourceIndex`: files whose fingerprint is unchanged
            reuse their cached header instead of being opened; the others are read and stored. The
            caller calls ``index.finish()`` afterwards.
        census: Optional dict filled with the account of every entry under ``root`` (counts per category:
            regular files, hidden files and folders, symlinks followed or not, broken symlinks, folders
            that cannot be listed, non-regular files; rejections per code; the symlink policy).

    Every entry is accounted for: each one not assembled into an item is in ``rejected`` with a code
    (``hidden``, ``symlink_not_followed``, ``broken_symlink``, ``unreadable_folder``, ``not_regular``,
    ``skipped``, ``kind_not_selected``, or a reader's code).

    Returns:
        ``(items, rejected)``, both in a deterministic order (by kind, then path).
    """
    from pipeline.ingest import dicom as dcm

    root = os.fspath(root)
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"scan_sources: kinds {sorted(bad)} unknown; expected a subset of {KINDS}")
    if not os.path.exists(root):
        raise IngestError(
            f"{root}: input folder does not exist; expected a folder of DICOM/NIfTI/images", "missing"
        )
    rejected: list[Rejected] = []
    tally: Counter = Counter()
    if os.path.isfile(root):
        paths = [os.path.abspath(root)]
        tally["regular_file"] += 1
    else:
        paths = _walk(root, rejected, tally)
    todo: list[tuple[str, str]] = []
    for p in paths:
        kind = _kind_of(p)
        if kind is None:
            reason = f"{p}: skipped (side-car/document file name, not an image)"
            rejected.append(Rejected(p, reason, "skipped"))
        elif kind in kinds:
            todo.append((p, kind))
        else:
            rejected.append(Rejected(p, f"{p}: a {kind} file; data.kinds does not include {kind}",
                                     "kind_not_selected"))

    results: dict[str, Any] = {}
    misses: list[tuple[str, str]] = []
    for p, kind in todo:
        try:
            cached = index.lookup(p) if index is not None else None
        except OSError as err:  # vanished or unreadable between the walk and now
            results[p] = Rejected(p, f"{p}: cannot read file ({err}); expected a readable file", "unreadable")
            continue
        if cached is not None:
            results[p] = _decode_result(p, cached)
        else:
            misses.append((p, kind))
    if workers > 1 and len(misses) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as ex:
            fresh = list(ex.map(lambda pk: probe_file(*pk), misses))
    else:
        fresh = [probe_file(p, k) for p, k in misses]
    for (p, kind), res in zip(misses, fresh, strict=True):
        results[p] = res
        if index is not None:
            try:
                index.store(p, _encode_result(kind, res))
            except OSError:
                pass  # gone since it was read: the next scan reports it

    items: list[SourceItem] = []
    records = []
    for p, kind in todo:
        if p not in results:
            continue
        res = results[p]
        if isinstance(res, Rejected):
            rejected.append(res)
        elif kind == "dicom":
            records.append(res)
        else:
            items.append(SourceItem(dcm.item_key([kind, os.path.relpath(p, root)]), kind, (p,), {}, res))

    if records:
        groups, rej = dcm.group_series(records)
        rejected.extend(Rejected(p, reason, code) for p, code, reason in rej)
        base = root if os.path.isdir(root) else os.path.dirname(root)
        for g in groups:
            files = tuple(sorted(r.path for r in g))
            first = g[0]
            header = {k: v for k, v in first.facts.items() if k != "flags"}
            header["flags"] = list(first.facts.get("flags", []))
            header["n_files"] = len(files)
            header["mosaic"] = first.is_mosaic
            header["enhanced"] = first.is_enhanced
            header["shape_guess"] = _shape_guess(g)
            key = dcm.item_key(
                ["dicom", first.group_key, first.iop, [os.path.relpath(f, base) for f in files]]
            )
            items.append(SourceItem(key, "dicom", files, dict(first.ids), header))
    items.sort(key=lambda it: (KINDS.index(it.kind), it.files[0]))
    rejected.sort(key=lambda r: r.path)
    if census is not None:
        census.update(_census(tally, Counter(r.code for r in rejected)))
    return items, rejected


def _shape_guess(group: list[Any]) -> list[int]:
    r = group[0]
    if r.is_mosaic:
        n = int(r.facts.get("n_mosaic", 1))
        import math

        m = int(math.ceil(math.sqrt(n)))
        return [r.columns // m, r.rows // m, n] + ([len(group)] if len(group) > 1 else [])
    if r.is_enhanced or r.n_frames > 1:
        return [r.columns, r.rows, r.n_frames]
    return [r.columns, r.rows, len(group)]


def load_item(item: SourceItem, options: LoadOptions | None = None) -> Volume:
    """Decode one item into a :class:`Volume` (axis order ``(i, j, k[, t/c])``, RAS+ affine).

    Raises:
        IngestError: the item cannot be read or its geometry is refused; ``reason`` names the file, the
            DICOM field (keyword and tag), the value and what was expected.
    """
    options = options or LoadOptions()
    if item.kind == "dicom":
        return load_dicom(list(item.files), options)
    if item.kind == "nifti":
        from pipeline.ingest.nifti import read_nifti

        return read_nifti(item.files[0])
    if item.kind == "image":
        from pipeline.ingest.images import read_image

        return read_image(item.files[0])
    raise IngestError(
        f"SourceItem {item.key}: kind {item.kind!r} unknown; expected one of {KINDS}", "unknown_kind"
    )


def load_dicom(files: list[str], options: LoadOptions | None = None) -> Volume:
    """Decode and assemble one DICOM series/volume (the files of one :class:`SourceItem`).

    Pixel values: stored values (BitsStored (0028,0101) masked, signed per PixelRepresentation
    (0028,0103)) through the modality LUT (RescaleSlope (0028,1053) / RescaleIntercept (0028,1052) or
    ModalityLUTSequence (0028,3000)), so CT is in HU. Integer results are kept integer (int16 for CT).
    """
    from pipeline.ingest import dicom as dcm
    from pipeline.ingest.dicom_geometry import assemble_slices

    options = options or LoadOptions()
    files = sorted(files)
    slices = []
    ds0 = None
    for f in files:
        s, ds = dcm.decode_file(f)  # one read per file: header checks happen there too
        slices.extend(s)
        if ds0 is None:
            ds0 = ds
    where = files[0] if len(files) == 1 else f"series of {len(files)} files starting {files[0]}"
    asm = assemble_slices(slices, where, tilt=options.tilt, uneven=options.uneven_spacing)
    meta = dcm.public_facts(ds0)
    meta["flags"] = list(dict.fromkeys(meta["flags"] + asm.flags))
    if (meta.get("photometric") or "").upper() == "MONOCHROME1":
        meta["flags"].append("inverted_monochrome1")
    meta["n_files"] = len(files)
    meta["axis4"] = asm.axis4
    meta["geometry"] = asm.geometry
    meta["source_kind"] = "dicom"
    meta["measured_tilt_deg"] = round(asm.tilt_deg, 4)
    if asm.slice_gaps_mm:
        gaps = sorted(set(round(g, 3) for g in asm.slice_gaps_mm))
        meta["slice_gaps_mm"] = gaps[:20]
    meta["dtype"] = str(asm.array.dtype)
    return Volume(asm.array, asm.affine, meta, dcm.private_ids(ds0))


def item_to_dict(item: SourceItem) -> dict[str, Any]:
    """A JSON-ready dict of an item (PRIVATE: holds source paths and ids)."""
    return {
        "key": item.key,
        "kind": item.kind,
        "files": list(item.files),
        "ids": dict(item.ids),
        "header": dict(item.header),
    }


__all__ = ["SourceItem", "Rejected", "LoadOptions", "scan_sources", "probe_file", "load_item", "load_dicom"]
