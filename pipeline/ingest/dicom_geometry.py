"""Assemble decoded DICOM slices into a volume with a correct RAS+ affine.

Steps (as dcm2niix does them):

1. Sort slices by ImagePositionPatient (0020,0032) projected on the slice normal
   ``n = row_cosines x column_cosines`` from ImageOrientationPatient (0020,0037) - never by InstanceNumber.
2. Slices that share a position form a 4D series (time/echo on axis 4), ordered within each position by
   AcquisitionNumber (0020,0012), TemporalPositionIdentifier (0020,0100), InstanceNumber (0020,0013) (or
   the frame's TemporalPositionIndex for enhanced files). Every position must hold the same count.
3. Gaps between positions: equal within 0.5 % (min 0.01 mm) -> regular; some gaps an integer multiple
   (2x, 3x...) of the others -> a missing slice (refused, code ``missing_slice``); otherwise uneven
   spacing (resampled to an equidistant grid, or refused with code ``uneven_spacing``).
4. Gantry tilt: when the step between slice origins is not parallel to ``n`` (CT with GantryDetectorTilt
   (0018,1120) != 0) the voxel grid is sheared; it is resampled onto an orthogonal grid (each slice shifted
   in-plane by its offset, as dcm2niix's tilt correction) or refused (code ``gantry_tilt``).

Axis order: input slices are pydicom ``(row, column)`` planes; the output array is ``(column, row,
slice[, volume])`` = NIfTI ``(i, j, k[, t])``, and the affine maps it to RAS+ mm:
``LPS = [row_cos * dc, col_cos * dr, n * dz] @ (i, j, k) + origin`` with ``dc, dr`` = PixelSpacing
(0028,0030) [1], [0], then ``RAS = diag(-1, -1, 1) @ LPS``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.dicom_pixels import Slice
from pipeline.ingest.dicom_values import usable_spacing

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
POS_TOL = 0.01  # mm: positions closer than this are "the same slice position"
TILT_TOL_DEG = 0.01
MAX_UPSAMPLE = 4  # uneven-spacing resampling never makes more than 4x the slices


@dataclass
class Assembled:
    """Result of :func:`assemble_slices`: ``array`` in ``(i, j, k[, t])`` order and its RAS+ affine."""

    array: np.ndarray
    affine: np.ndarray
    flags: list[str] = field(default_factory=list)
    axis4: str | None = None
    slice_gaps_mm: list[float] | None = None
    geometry: str = "dicom"
    tilt_deg: float = 0.0


def _gap_kind(gaps: np.ndarray) -> tuple[str, float]:
    """Classify slice gaps: ('even' | 'missing' | 'uneven', reference gap)."""
    if gaps.size == 0:
        return "even", 0.0
    g = float(np.median(gaps))
    tol = max(POS_TOL, 0.005 * g)
    if np.all(np.abs(gaps - g) <= tol):
        return "even", g
    base = float(np.min(gaps))
    tol_b = max(POS_TOL, 0.005 * base)
    ratios = gaps / base
    if base > POS_TOL and np.all(
        np.abs(gaps - np.round(ratios) * base) <= tol_b * np.maximum(1, np.round(ratios))
    ):
        if np.sum(np.round(ratios) == 1) >= gaps.size / 2:
            return "missing", base
    return "uneven", g


def _stack(planes: list[np.ndarray]) -> np.ndarray:
    dtypes = {p.dtype for p in planes}
    if len(dtypes) > 1:
        planes = [p.astype(np.result_type(*dtypes)) for p in planes]
    return np.stack(planes, axis=-1)  # (rows, cols, k)


def _narrow(arr: np.ndarray) -> np.ndarray:
    """Store integer data in the smallest signed/unsigned type that holds it (int32 -> int16 for CT)."""
    if arr.dtype.kind not in "iu" or arr.size == 0:
        return arr
    lo, hi = int(arr.min()), int(arr.max())
    for dt in (np.uint8, np.int16, np.uint16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return arr.astype(dt, copy=False)
    return arr


def orientation_ok(iop: Any) -> bool:
    """ImageOrientationPatient (0020,0037) spans a plane: neither cosine vector is (near) zero-length and
    they are not parallel, so the slice normal ``row x column`` exists."""
    if iop is None:
        return False
    v = np.asarray(iop, dtype=float)
    row_n, col_n = float(np.linalg.norm(v[:3])), float(np.linalg.norm(v[3:]))
    if not (row_n > 1e-3 and col_n > 1e-3):
        return False
    return float(np.linalg.norm(np.cross(v[:3], v[3:]))) > 1e-3 * row_n * col_n


def _degenerate_orientation(where: str) -> IngestError:
    # no value from the file in the message: the field and what was expected suffice
    return IngestError(
        f"{where}: ImageOrientationPatient (0020,0037) is degenerate (a zero-length cosine vector, or the "
        "two vectors parallel); expected two orthogonal unit vectors",
        "degenerate_geometry",
    )


def _bad_spacing(where: str) -> IngestError:
    return IngestError(
        f"{where}: PixelSpacing (0028,0030) is zero or negative; expected the in-plane spacing in mm (> 0)",
        "missing_geometry",
    )


def no_geometry_affine(pixel_spacing: tuple[float, float] | None) -> np.ndarray:
    """Explicit affine for images without patient geometry: ``i`` = column (spacing PixelSpacing[1]),
    ``j`` = row (spacing PixelSpacing[0]), read as an axial LPS plane (IOP = 1,0,0,0,1,0), i.e.
    RAS ``diag(-dc, -dr, 1)``. Spacing 1 when unknown."""
    dr, dc = pixel_spacing if pixel_spacing else (1.0, 1.0)
    return np.diag([-float(dc), -float(dr), 1.0, 1.0])


def assemble_slices(
    slices: list[Slice], where: str, tilt: str = "correct", uneven: str = "resample"
) -> Assembled:
    """Sort, check and stack slices into a volume (see module docstring).

    Args:
        slices: Decoded slices of one series (any order).
        where: Text naming the series in error messages (e.g. first file path and file count).
        tilt: ``"correct"`` to resample a gantry-tilted stack onto an orthogonal grid, ``"refuse"`` to raise.
        uneven: ``"resample"`` to resample uneven slice spacing equidistantly, ``"refuse"`` to raise.

    Raises:
        IngestError: codes ``mixed_sizes``, ``missing_geometry`` (PixelSpacing missing, zero or negative
            with patient geometry), ``degenerate_geometry`` (ImageOrientationPatient without a plane),
            ``missing_slice``, ``uneven_spacing``, ``gantry_tilt``, ``inconsistent_geometry``.
    """
    if not slices:
        raise IngestError(f"{where}: no image planes decoded; expected at least one", "empty")
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) > 1:
        raise IngestError(
            f"{where}: planes of different sizes {sorted(shapes)} (Rows (0028,0010) x Columns (0028,0011)) in "
            "one series; expected one size",
            "mixed_sizes",
        )
    shape = slices[0].pixels.shape
    rgb = len(shape) == 3
    flags: list[str] = []

    has_geom = all(s.position is not None and s.iop is not None for s in slices)
    if not has_geom:
        # 2D image(s) without patient geometry (CR, DX, US, SC, or cine): explicit spacing-only affine.
        # A zero/negative PixelSpacing (e.g. "0\\0" on CR) is the stated fallback: unit spacing, flagged.
        ps0 = slices[0].pixel_spacing
        if ps0 is not None and not usable_spacing(ps0):
            flags.append("assumed_unit_pixel_spacing")
            ps0 = None
        affine = no_geometry_affine(ps0)
        planes = [s.pixels for s in slices]
        if rgb:
            if len(planes) > 1:
                raise IngestError(
                    f"{where}: {len(planes)} RGB frames; expected one RGB frame (RGB cine is not supported)",
                    "unsupported_layout",
                )
            arr = planes[0].transpose(1, 0, 2)[:, :, None, :]
            return Assembled(arr, affine, flags + ["no_patient_geometry"], "rgb", None, "pixel_spacing_only")
        arr = _stack(planes).transpose(1, 0, 2)  # (cols, rows, n)
        if arr.shape[2] > 1:
            arr = arr[:, :, None, :]  # frames without positions are time, not slices
            return Assembled(
                _narrow(arr), affine, flags + ["no_patient_geometry"], "time", None, "pixel_spacing_only"
            )
        return Assembled(
            _narrow(arr), affine, flags + ["no_patient_geometry"], None, None, "pixel_spacing_only"
        )

    if not all(orientation_ok(s.iop) for s in slices):
        raise _degenerate_orientation(where)
    if rgb:
        if len(slices) > 1:
            raise IngestError(
                f"{where}: multi-slice RGB series; expected greyscale slices", "unsupported_layout"
            )
        s = slices[0]
        iop = np.asarray(s.iop)
        aff = _lps_affine(iop, s.pixel_spacing, s.position, _single_thickness(s), where)
        return Assembled(s.pixels.transpose(1, 0, 2)[:, :, None, :], LPS_TO_RAS @ aff, flags, "rgb")

    iop0 = np.asarray(slices[0].iop, dtype=float)
    for s in slices:
        if np.max(np.abs(np.asarray(s.iop) - iop0)) > 1e-3:
            raise IngestError(
                f"{where}: ImageOrientationPatient (0020,0037) differs between planes ({list(s.iop)} vs "
                f"{iop0.tolist()}); expected one orientation per series",
                "inconsistent_geometry",
            )
        if s.pixel_spacing is None:
            raise IngestError(
                f"{where}: PixelSpacing (0028,0030) missing; expected the in-plane spacing in mm",
                "missing_geometry",
            )
        if not usable_spacing(s.pixel_spacing):
            raise _bad_spacing(where)
    row_c, col_c = iop0[:3], iop0[3:]
    normal = np.cross(row_c, col_c)
    normal /= np.linalg.norm(normal)
    proj = np.array([float(np.dot(s.position, normal)) for s in slices])
    order = np.argsort(proj, kind="stable")
    # cluster positions
    clusters: list[list[int]] = []
    for idx in order:
        if clusters and abs(proj[idx] - proj[clusters[-1][0]]) <= POS_TOL:
            clusters[-1].append(int(idx))
        else:
            clusters.append([int(idx)])
    counts = {len(c) for c in clusters}
    if len(counts) > 1:
        expected = max(len(c) for c in clusters)
        short = [(round(float(proj[c[0]]), 3), len(c)) for c in clusters if len(c) != expected][:5]
        raise IngestError(
            f"{where}: 4D series with {len(clusters)} slice positions but unequal images per position "
            f"(position mm, count: {short}; expected {expected} each): a slice of some volume is missing",
            "missing_slice",
        )
    n_vol = counts.pop()
    for c in clusters:
        c.sort(key=lambda i: slices[i].order_key)
    positions = np.array([np.asarray(slices[c[0]].position, dtype=float) for c in clusters])
    d = np.array([proj[c[0]] for c in clusters])
    gaps = np.diff(d)
    kind, g = _gap_kind(gaps)

    if kind == "missing":
        bad = [
            (round(float(d[i]), 3), round(float(gaps[i]), 3))
            for i in range(gaps.size)
            if abs(gaps[i] - g) > max(POS_TOL, 0.005 * g)
        ]
        raise IngestError(
            f"{where}: slice gap(s) {[b[1] for b in bad]} mm after position(s) {[b[0] for b in bad]} mm along the "
            f"slice normal are whole multiples of the regular gap {g:.4f} mm (ImagePositionPatient (0020,0032)): "
            "slice(s) missing; expected evenly spaced slices",
            "missing_slice",
        )
    # tilt: angle between the inter-slice step and the normal
    tilt_deg = 0.0
    if len(clusters) > 1:
        step = positions[-1] - positions[0]
        along = float(np.dot(step, normal))
        inplane = step - along * normal
        tilt_deg = math.degrees(math.atan2(float(np.linalg.norm(inplane)), abs(along)))
    tilted = tilt_deg > TILT_TOL_DEG
    if tilted and tilt == "refuse":
        raise IngestError(
            f"{where}: gantry tilt of {tilt_deg:.2f} deg (slice origins ImagePositionPatient (0020,0032) step "
            "off the slice normal; GantryDetectorTilt (0018,1120)); expected no tilt (LoadOptions.tilt='refuse')",
            "gantry_tilt",
        )
    if kind == "uneven" and uneven == "refuse":
        raise IngestError(
            f"{where}: uneven slice spacing, gaps {sorted(set(np.round(gaps, 3).tolist()))} mm along the normal "
            "(ImagePositionPatient (0020,0032)); expected equal gaps (LoadOptions.uneven_spacing='refuse')",
            "uneven_spacing",
        )

    ps = slices[0].pixel_spacing
    dr, dc = float(ps[0]), float(ps[1])
    vols = []
    for v in range(n_vol):
        vols.append(_stack([slices[c[v]].pixels for c in clusters]).transpose(1, 0, 2))  # (cols, rows, k)
    gaps_list = [round(float(x), 4) for x in gaps.tolist()]

    if len(clusters) == 1:
        s0 = slices[clusters[0][0]]
        if not (s0.spacing_between or s0.thickness):
            flags.append("assumed_slice_thickness_1mm")
        dz = _single_thickness(s0)
        aff = _lps_affine(iop0, ps, positions[0], dz, where)
        arr = vols[0] if n_vol == 1 else np.stack(vols, axis=-1)
        return Assembled(_narrow(arr), LPS_TO_RAS @ aff, flags, "time" if n_vol > 1 else None, gaps_list)

    if not tilted and kind == "even":
        step = (positions[-1] - positions[0]) / (len(clusters) - 1)
        aff = np.eye(4)
        aff[:3, 0] = row_c * dc
        aff[:3, 1] = col_c * dr
        aff[:3, 2] = step
        aff[:3, 3] = positions[0]
        arr = vols[0] if n_vol == 1 else np.stack(vols, axis=-1)
        return Assembled(
            _narrow(arr), LPS_TO_RAS @ aff, flags, "time" if n_vol > 1 else None, gaps_list, tilt_deg=0.0
        )

    # resample onto an orthogonal, equidistant grid
    if kind == "uneven":
        n_out_min = int(round((d[-1] - d[0]) / float(np.min(gaps)))) + 1
        n_out = min(n_out_min, MAX_UPSAMPLE * len(clusters))
        dz = (d[-1] - d[0]) / (n_out - 1)
        flags.append("resampled_uneven_slices")
    else:
        n_out = len(clusters)
        dz = (d[-1] - d[0]) / (n_out - 1)
    if tilted:
        flags.append("tilt_corrected")
    out_vols, aff = resample_orthogonal(vols, positions, d, row_c, col_c, normal, dc, dr, n_out, dz)
    arr = out_vols[0] if n_vol == 1 else np.stack(out_vols, axis=-1)
    return Assembled(
        arr, LPS_TO_RAS @ aff, flags, "time" if n_vol > 1 else None, gaps_list, tilt_deg=tilt_deg
    )


def _single_thickness(s: Slice) -> float:
    return float(s.spacing_between or s.thickness or 1.0)


def _lps_affine(iop: np.ndarray, ps: Any, pos: Any, dz: float, where: str) -> np.ndarray:
    if ps is None:
        raise IngestError(
            f"{where}: PixelSpacing (0028,0030) missing; expected in-plane spacing", "missing_geometry"
        )
    if not usable_spacing(ps):
        raise _bad_spacing(where)
    if not orientation_ok(iop):
        raise _degenerate_orientation(where)
    iop = np.asarray(iop, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    normal /= np.linalg.norm(normal)
    aff = np.eye(4)
    aff[:3, 0] = iop[:3] * float(ps[1])
    aff[:3, 1] = iop[3:] * float(ps[0])
    aff[:3, 2] = normal * dz
    aff[:3, 3] = np.asarray(pos, dtype=float)
    return aff


def _shift2d(src: np.ndarray, oi: float, oj: float, nx: int, ny: int, fill: float) -> np.ndarray:
    """``out[x, y] = src[x + oi, y + oj]`` with bilinear interpolation, ``fill`` outside; shape (nx, ny)."""
    i0, j0 = int(math.floor(oi + 1e-9)), int(math.floor(oj + 1e-9))
    fi, fj = oi - i0, oj - j0
    fi = 0.0 if fi < 1e-6 else fi
    fj = 0.0 if fj < 1e-6 else fj
    X, Y = src.shape
    pl_i, pr_i = max(0, -i0), max(0, i0 + nx + 1 - X)
    pl_j, pr_j = max(0, -j0), max(0, j0 + ny + 1 - Y)
    P = (
        np.pad(src, ((pl_i, pr_i), (pl_j, pr_j)), constant_values=fill)
        if (pl_i or pr_i or pl_j or pr_j)
        else src
    )
    a, b = i0 + pl_i, j0 + pl_j
    out = P[a : a + nx, b : b + ny].astype(np.float32, copy=True)
    if fi:
        out *= 1 - fi
        out += fi * P[a + 1 : a + 1 + nx, b : b + ny]
    if fj:
        right = P[a : a + nx, b + 1 : b + 1 + ny].astype(np.float32)
        if fi:
            right *= 1 - fi
            right += fi * P[a + 1 : a + 1 + nx, b + 1 : b + 1 + ny]
        out *= 1 - fj
        out += fj * right
    return out


def resample_orthogonal(
    vols: list[np.ndarray],
    positions: np.ndarray,
    d: np.ndarray,
    row_c: np.ndarray,
    col_c: np.ndarray,
    normal: np.ndarray,
    dc: float,
    dr: float,
    n_out: int,
    dz: float,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Resample sheared and/or unevenly spaced slices onto an orthogonal equidistant grid (linear).

    Each source slice ``k`` (array ``(cols, rows)``) has origin ``positions[k]`` (LPS) and lies at
    ``d[k]`` along ``normal``. Output slice ``t`` lies at ``d[0] + t * dz``; it blends the two nearest
    source slices, each shifted in-plane by its origin's offset (in voxels) from the output grid origin.

    Returns:
        (list of output volumes ``(X', Y', n_out)``, LPS affine of the output grid).
    """
    rel = positions - positions[0]
    u = rel @ row_c / dc  # in-plane offsets in voxels along i (columns)
    v = rel @ col_c / dr  # along j (rows)
    u0, v0 = float(np.floor(u.min() + 1e-6)), float(np.floor(v.min() + 1e-6))
    nx = vols[0].shape[0] + int(math.ceil(u.max() - u0 - 1e-6))
    ny = vols[0].shape[1] + int(math.ceil(v.max() - v0 - 1e-6))
    origin = positions[0] + u0 * dc * row_c + v0 * dr * col_c
    aff = np.eye(4)
    aff[:3, 0] = row_c * dc
    aff[:3, 1] = col_c * dr
    aff[:3, 2] = normal * dz
    aff[:3, 3] = origin
    src_idx = np.arange(len(d), dtype=float)
    out_vols = []
    for vol in vols:
        src = vol.astype(np.float32)
        fill = float(src.min())
        out = np.empty((nx, ny, n_out), dtype=np.float32)
        cache: dict[int, np.ndarray] = {}

        def shifted(k: int, cache=cache, src=src, fill=fill) -> np.ndarray:
            if k not in cache:
                # output voxel (i', j') <- source (i' + u0 - u_k, j' + v0 - v_k), bilinear
                cache[k] = _shift2d(src[:, :, k], u0 - u[k], v0 - v[k], nx, ny, fill)
            return cache[k]

        for t in range(n_out):
            kc = float(np.interp(d[0] + t * dz, d, src_idx))
            k0 = int(math.floor(kc + 1e-6))
            k0 = min(k0, len(d) - 1)
            w = kc - k0
            if w <= 1e-6 or k0 == len(d) - 1:
                out[:, :, t] = shifted(k0)
            else:
                plane = out[:, :, t]
                np.multiply(shifted(k0), 1 - w, out=plane)
                plane += w * shifted(k0 + 1)
            for k in [k for k in cache if k < k0]:
                del cache[k]
        if vol.dtype.kind in "iu":
            np.rint(out, out=out)
            lo, hi = float(out.min()), float(out.max())
            for dt in (np.int16, np.int32):
                if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
                    out = out.astype(dt)
                    break
        out_vols.append(out)
    return out_vols, aff
