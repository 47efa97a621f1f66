"""Series grouping of DICOM header records, as dcm2niix does.

Grouping keys: StudyInstanceUID (0020,000D), SeriesInstanceUID (0020,000E), SeriesNumber (0020,0011),
EchoNumbers (0018,0086), ImageType (0008,0008), Rows (0028,0010), Columns (0028,0011), Modality (0008,0060)
and ImageOrientationPatient (0020,0037) within :data:`IOP_TOL`; repeated SOPInstanceUID (0008,0018) copies
are split apart; slices of another size inside a series' slab are rejected (``mixed_sizes``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from pipeline.ingest.dicom_header import HeaderRecord

IOP_TOL = 1e-3  # max abs difference of ImageOrientationPatient cosines within one series


def _iop_close(a: tuple[float, ...] | None, b: tuple[float, ...] | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) <= IOP_TOL


def _normal(iop: tuple[float, ...]) -> np.ndarray:
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    n = np.cross(row, col)
    return n / (np.linalg.norm(n) or 1.0)


def item_key(parts: list[Any]) -> str:
    """A stable, non-identifying key: sha256 over the grouping keys and file set, 16 hex characters."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _split_duplicates(group: list[HeaderRecord]) -> list[list[HeaderRecord]]:
    """Copies of the same images (repeated SOPInstanceUID (0008,0018), e.g. an export holding the same
    series in several transfer syntaxes) are split by folder, then by TransferSyntaxUID, then one file each,
    so a copy never becomes a fake 4D volume."""
    uids = [r.sop_uid for r in group if r.sop_uid]
    if len(uids) == len(set(uids)):
        return [group]
    out: list[list[HeaderRecord]] = []
    for keyf in (lambda r: os.path.dirname(r.path), lambda r: r.transfer_syntax):
        sub: dict[str, list[HeaderRecord]] = {}
        for r in group:
            sub.setdefault(keyf(r), []).append(r)
        if len(sub) > 1:
            for g in sub.values():
                out.extend(_split_duplicates(g))
            return out
    return [[r] for r in group]


def group_series(records: list[HeaderRecord]) -> tuple[list[list[HeaderRecord]], list[tuple[str, str, str]]]:
    """Split header records into series/volumes as dcm2niix does.

    Files share a group when StudyInstanceUID, SeriesInstanceUID, SeriesNumber, EchoNumbers, ImageType,
    Rows/Columns and Modality agree and ImageOrientationPatient agrees within 1e-3. Groups that differ only
    in Rows/Columns whose slices interleave (lie inside the other group's slab) are a broken series: the
    smaller group's files are rejected with code ``mixed_sizes``.

    Returns:
        (groups, rejected) where each group is a list of records sorted by path and rejected holds
        ``(path, code, reason)``.
    """
    by_key: dict[tuple, list[list[HeaderRecord]]] = {}
    for rec in sorted(records, key=lambda r: r.path):
        clusters = by_key.setdefault(rec.group_key, [])
        for cluster in clusters:
            if _iop_close(cluster[0].iop, rec.iop):
                cluster.append(rec)
                break
        else:
            clusters.append([rec])
    groups = []
    for clusters in by_key.values():
        for c in clusters:
            groups.extend(_split_duplicates(c))

    # mixed sizes inside one series: same key except Rows/Columns (indices 5, 6)
    rejected: list[tuple[str, str, str]] = []
    family: dict[tuple, list[list[HeaderRecord]]] = {}
    for g in groups:
        k = g[0].group_key
        fam_key = k[:5] + k[7:]
        family.setdefault(fam_key, []).append(g)
    drop: set[int] = set()
    for fam in family.values():
        if len(fam) < 2:
            continue
        fam = sorted(fam, key=lambda g: (-len(g), g[0].path))
        main = fam[0]
        if main[0].iop is None or any(r.position is None for r in main):
            continue
        n = _normal(main[0].iop)
        proj = [float(np.dot(r.position, n)) for r in main]
        lo, hi = min(proj), max(proj)
        for other in fam[1:]:
            if other[0].iop is None or not _iop_close(other[0].iop, main[0].iop):
                continue
            op = [float(np.dot(r.position, n)) for r in other if r.position is not None]
            if op and all(lo - 1e-3 <= p <= hi + 1e-3 for p in op) and len(other) < len(main):
                drop.add(id(other))
                for r in other:
                    rejected.append(
                        (
                            r.path,
                            "mixed_sizes",
                            f"{r.path}: Rows (0028,0010) x Columns (0028,0011) = {r.rows} x {r.columns} inside "
                            f"a series whose other {len(main)} slices are {main[0].rows} x {main[0].columns} "
                            "(same SeriesInstanceUID (0020,000E), slice within the series' slab); expected one "
                            "image size per series",
                        )
                    )
    groups = [g for g in groups if id(g) not in drop]
    groups.sort(key=lambda g: g[0].path)
    return groups, rejected


