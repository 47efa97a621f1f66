"""Time medtl's DICOM series reader against its peers on the same series, and check their geometry.

Peers: dcm2niix (CLI, time includes writing an uncompressed .nii and reading it back), SimpleITK
``ImageSeriesReader``, MONAI ``LoadImage(reader="PydicomReader")`` and dicom2nifti. For each series and
tool: best-of-N wall time, files/s, the ratio to medtl, and whether the geometry is right:

* with a trusted reference NIfTI (dcm2niix/dicom2nifti output, see ``ingest_reference.py``): same shape
  and voxels after reorienting both to canonical, and affine corners within 1e-3 mm;
* for the tilted, unevenly spaced CT: world-consistency with the source slices (sampling the volume at the
  first slice's voxel positions returns that slice) - an affine ignoring the tilt fails.

Usage::

    python bench/ingest_speed.py [--root DIR] [--repeat 3] [--json out.json] [--markdown out.md]

Needs ``pip install SimpleITK dicom2nifti`` and ``apt-get install dcm2niix``; a missing peer is reported
as "not installed" in its column.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest_reference import canonical, compare_arrays, corner_error_mm, load_reference, source_consistency  # noqa: E402

DEFAULT_ROOT = "/work/shared/data/dicom"
D2N = "dicom2nifti_tests/tests/data"
SERIES = [
    (
        "GE EPI 4D (150 files)",
        "dcm_qa_nih/In/20180918GE/mr_0004",
        "dcm_qa_nih/Ref/DCM2NIIX_regression_test_4.nii",
    ),
    ("Siemens mosaic 4D", "dcm_qa_nih/In/20180918Si/mr_0003", "dcm_qa_nih/Ref/EPI_PE=AP_3.nii"),
    ("GE CT tilt+uneven (28)", "dcm_qa_ct/In/GE", None),
    (
        "Siemens anatomical (4)",
        f"{D2N}/siemens/anatomical/001",
        f"{D2N}/siemens/anatomical/001_ground_truth.nii.gz",
    ),
    (
        "Philips enhanced (1x8)",
        f"{D2N}/philips_enhanced/anatomical/001",
        f"{D2N}/philips_enhanced/anatomical/001_ground_truth.nii.gz",
    ),
]
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".dcm"))


def read_medtl(folder: str) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.ingest.sources import load_dicom

    v = load_dicom(_files(folder))
    return v.array, v.affine


def read_dcm2niix(folder: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    exe = shutil.which("dcm2niix")
    if not exe:
        raise RuntimeError("not installed")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([exe, "-z", "n", "-f", "%s", "-o", tmp, folder], check=True, capture_output=True)
        outs = sorted(p for p in Path(tmp).glob("*.nii") if "Tilt" not in p.name and "Eq" not in p.name)
        if not outs:
            raise RuntimeError("no output")
        img = nib.load(outs[0])
        return np.asanyarray(img.dataobj).copy(), img.affine


def read_sitk(folder: str) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(folder)
    reader.SetFileNames(names)
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img)  # (z, y, x)
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])
    d = np.array(img.GetDirection()).reshape(img.GetDimension(), img.GetDimension())[:3, :3]
    aff = np.eye(4)
    aff[:3, :3] = d @ np.diag(img.GetSpacing()[:3])
    aff[:3, 3] = img.GetOrigin()[:3]
    return arr, LPS_TO_RAS @ aff


def read_monai(folder: str) -> tuple[np.ndarray, np.ndarray]:
    from monai.transforms import LoadImage

    img = LoadImage(reader="PydicomReader", image_only=True)(folder)
    return np.asarray(img), np.asarray(img.affine, dtype=float)


def read_dicom2nifti(folder: str) -> tuple[np.ndarray, np.ndarray]:
    import dicom2nifti
    import dicom2nifti.settings as settings

    settings.disable_validate_slice_increment()
    with tempfile.TemporaryDirectory() as tmp:
        res = dicom2nifti.dicom_series_to_nifti(folder, os.path.join(tmp, "x.nii"), reorient_nifti=False)
        img = res["NII"]
        return np.asanyarray(img.dataobj).copy(), img.affine


TOOLS = {
    "medtl": read_medtl,
    "dcm2niix": read_dcm2niix,
    "SimpleITK": read_sitk,
    "MONAI": read_monai,
    "dicom2nifti": read_dicom2nifti,
}


def geometry_ok(arr: np.ndarray, aff: np.ndarray, root: str, folder: str, ref_rel: str | None) -> str:
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if ref_rel is None:
        per = source_consistency(arr if arr.ndim == 3 else arr[..., 0], aff, _files(folder))
        return (
            "right"
            if per[0] < 1.0 and float(np.mean(per)) < 40
            else f"WRONG (world |diff| {np.mean(per):.0f})"
        )
    ref, ref_aff = load_reference(os.path.join(root, ref_rel))
    a, aa = canonical(arr, aff)
    b, ba = canonical(ref, ref_aff)
    if a.shape != b.shape:
        return f"WRONG shape {a.shape}"
    eq, _ = compare_arrays(a, b)
    err = corner_error_mm(aa, ba, a.shape)
    if err > 1e-3:
        return f"WRONG affine ({err:.2f} mm)"
    return "right" if eq else "right geometry, voxels differ"


def run(root: str, repeat: int) -> list[dict]:
    rows = []
    for label, rel, ref in SERIES:
        folder = os.path.join(root, rel)
        n_files = len(_files(folder))
        base = None
        for tool, fn in TOOLS.items():
            row = {"series": label, "tool": tool, "files": n_files}
            try:
                best = float("inf")
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    arr, aff = fn(folder)
                    best = min(best, time.perf_counter() - t0)
                row["seconds"] = round(best, 4)
                row["files_per_s"] = round(n_files / best, 1)
                row["geometry"] = geometry_ok(arr, aff, root, folder, ref)
                if tool == "medtl":
                    base = best
                row["ratio_to_medtl"] = round(best / base, 2) if base else None
            except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
                row.update(
                    {
                        "seconds": None,
                        "files_per_s": None,
                        "ratio_to_medtl": None,
                        "geometry": f"failed: {type(err).__name__}: {str(err)[:80]}",
                    }
                )
            rows.append(row)
    return rows


def to_markdown(rows: list[dict]) -> str:
    out = "| series | tool | files | s (best) | files/s | time / medtl | geometry |\n|---|---|---|---|---|---|---|\n"
    for r in rows:
        out += (
            f"| {r['series']} | {r['tool']} | {r['files']} | {r['seconds']} | {r['files_per_s']} | "
            f"{r['ratio_to_medtl']} | {r['geometry']} |\n"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=DEFAULT_ROOT)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import logging

        logging.disable(logging.WARNING)
        rows = run(args.root, args.repeat)
    md = to_markdown(rows)
    print(md)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
