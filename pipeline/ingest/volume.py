"""The in-memory image record every reader returns.

Axis order (the contract every stage codes against): ``array`` has its spatial axes first in NIfTI voxel
order ``(i, j, k)``; for DICOM that is ``(column, row, slice)``, i.e. the transpose of pydicom's
``pixel_array`` ``(row, column)`` layout. An optional 4th axis holds time/echo volumes of a 4D series or
the colour channels of an RGB image; ``meta["axis4"]`` says which (``"time"``, ``"echo"``, ``"rgb"``) and
is ``None`` for 3D volumes. 2D images and single-frame DICOM have ``k = 1`` (shape ``(X, Y, 1)``).

``affine`` maps voxel indices ``(i, j, k, 1)`` to RAS+ millimetres, as nibabel expects. It is never an
implicit identity: images without geometry (PNG/JPEG) carry an explicit pixel-spacing-1 affine and
``meta["geometry"] = "none"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Keys allowed in :attr:`Volume.meta` (non-identifying facts only; safe to publish).
META_KEYS = (
    "modality",
    "manufacturer",
    "manufacturer_model",
    "body_part",
    "sex",
    "age_years",
    "spacing",
    "orientation",
    "shape",
    "photometric",
    "bits_stored",
    "transfer_syntax",
    "n_files",
    "gantry_tilt_deg",
    "flags",
    "axis4",
    "geometry",
    "source_kind",
    "slice_gaps_mm",
    "dtype",
    "measured_tilt_deg",
    "sform_code",
    "qform_code",
)

#: Keys allowed in :attr:`Volume.ids` (identifying; PRIVATE, never written to shared outputs).
ID_KEYS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "AccessionNumber")


@dataclass
class Volume:
    """An image with its geometry, public facts and private identifiers.

    Attributes:
        array: Voxels, shape ``(X, Y, Z)`` or ``(X, Y, Z, T/C)`` in NIfTI voxel order (see module doc).
            CT is in Hounsfield units (modality LUT applied).
        affine: ``(4, 4)`` float64, voxel ``(i, j, k)`` to RAS+ millimetres.
        meta: Non-identifying facts (keys in :data:`META_KEYS`), safe to publish.
        ids: Identifying keys (keys in :data:`ID_KEYS`), PRIVATE; empty for NIfTI and 2D images.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict, repr=False)  # never shown in logs/tracebacks

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise ValueError(f"Volume.affine has shape {self.affine.shape}; expected (4, 4)")
        if not np.all(np.isfinite(self.affine)):
            raise ValueError(f"Volume.affine has non-finite values: {self.affine.tolist()}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError(
                f"Volume.affine is singular: {self.affine.tolist()}; expected an invertible 3x3 part"
            )
        if not np.allclose(self.affine[3], [0, 0, 0, 1]):
            raise ValueError(f"Volume.affine last row is {self.affine[3].tolist()}; expected [0, 0, 0, 1]")
        if self.array.ndim not in (3, 4):
            raise ValueError(
                f"Volume.array has {self.array.ndim} dimensions (shape {self.array.shape}); expected 3 "
                "(X, Y, Z) or 4 (X, Y, Z, T/C)"
            )
        bad = set(self.ids) - set(ID_KEYS)
        if bad:
            raise ValueError(f"Volume.ids has unexpected keys {sorted(bad)}; allowed: {list(ID_KEYS)}")
        self.meta.setdefault("flags", [])
        self.meta.setdefault("axis4", None)
        self.meta["shape"] = tuple(int(s) for s in self.array.shape)
        self.meta["spacing"] = tuple(round(s, 6) for s in self.spacing)
        self.meta["orientation"] = "".join(self.orientation)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along ``(i, j, k)`` (column norms of the affine)."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Axis codes of ``(i, j, k)`` such as ``("L", "P", "S")`` (``nibabel.aff2axcodes``)."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))  # type: ignore[return-value]
