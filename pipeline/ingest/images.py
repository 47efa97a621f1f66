"""2D images (PNG, JPEG; grey or RGB) as :class:`Volume` s.

Axis order: PIL's ``(row, column[, channel])`` pixels are transposed to ``(i, j, 1[, c])`` =
``(column, row, 1[, channel])``. Such files carry no patient geometry: the affine is an explicit
pixel-spacing-1 affine ``diag(-1, -1, 1, 1)`` (the same convention as DICOM images without geometry, read
as an axial LPS plane) and ``meta["geometry"] = "none"``. Photos and screenshots may hold burned-in text,
so every 2D image is flagged ``needs_pixel_review``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from pipeline.errors import IngestError
from pipeline.ingest.volume import Volume

NO_GEOMETRY_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _open(path: str) -> Any:
    from PIL import Image

    try:
        size = os.path.getsize(path)
    except OSError as err:
        raise IngestError(
            f"{path}: cannot read file ({err}); expected a PNG/JPEG image", "unreadable"
        ) from err
    if size == 0:
        raise IngestError(f"{path}: file is empty (0 bytes); expected a PNG/JPEG image", "empty")
    try:
        return Image.open(path)
    except Exception as err:  # noqa: BLE001
        raise IngestError(
            f"{path}: not readable as PNG/JPEG ({type(err).__name__}: {err})", "bad_image"
        ) from err


def image_header(path: str) -> dict[str, Any]:
    """Size and mode of an image without decoding it."""
    with _open(path) as im:
        return {
            "shape_guess": [im.width, im.height, 1],
            "mode": im.mode,
            "format": im.format,
            "n_files": 1,
            "modality": None,
        }


def read_image(path: str | os.PathLike[str]) -> Volume:
    """Read a PNG/JPEG into a :class:`Volume` of shape ``(X, Y, 1)`` (grey) or ``(X, Y, 1, 3)`` (RGB).

    Palette and alpha images are converted to RGB; 16-bit grey PNGs keep 16 bits.
    """
    path = os.fspath(path)
    with _open(path) as im:
        try:
            im.load()
        except Exception as err:  # noqa: BLE001
            raise IngestError(
                f"{path}: image data truncated or corrupt ({type(err).__name__}: {err})", "truncated"
            ) from err
        mode = im.mode
        if mode in ("L", "I;16", "I;16B", "I", "F", "1"):
            arr = np.asarray(im.convert("L") if mode == "1" else im)
            if mode.startswith("I;16"):
                arr = arr.astype(np.uint16)
            grey = True
        elif mode == "LA":
            arr, grey = np.asarray(im.convert("L")), True
        else:
            arr, grey = np.asarray(im.convert("RGB")), False
    if grey:
        data = arr.T[:, :, None]
        axis4 = None
        photometric = "MONOCHROME2"
    else:
        data = arr.transpose(1, 0, 2)[:, :, None, :]
        axis4 = "rgb"
        photometric = "RGB"
    meta = {
        "modality": None,
        "source_kind": "image",
        "photometric": photometric,
        "bits_stored": int(data.dtype.itemsize * 8),
        "n_files": 1,
        "axis4": axis4,
        "geometry": "none",
        "dtype": str(data.dtype),
        "flags": ["needs_pixel_review", "no_patient_geometry"],
    }
    return Volume(np.ascontiguousarray(data), NO_GEOMETRY_AFFINE.copy(), meta, {})
