"""Incremental Ingest on a 1,000-file workspace, and .npy vs NIfTI volume-cache load time.

Builds a synthetic export in a temporary folder (900 single-image CR DICOM files 256x256 + 10 axial CT
series of 10 slices 256x256 = 1,000 files, 910 cases, labels keyed by path), then times ``run_ingest``:

* cold: empty workspace (every header read, every volume decoded);
* no-op: same data, fresh stage folder (what a nightly run with no new data does when the stage reruns,
  e.g. after a labels edit); also the Luigi-side cost of deciding nothing changed (``plan_stages``);
* touch 10%: mtimes change, bytes do not (content hash decides; nothing re-read or decoded);
* change 1%: 10 files get new pixels (10 headers read, 10 volumes decoded);
* vanish: 5 files deleted (reported).

Then loads the same volumes from .npy (plain and memory-mapped) and from NIfTI (.nii, .nii.gz).
Usage: ``python bench/ingest_incremental.py [--processes 2] [--files 1000]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write(
    path: Path,
    img: np.ndarray,
    pid: str,
    modality: str,
    series_uid: str,
    study_uid: str,
    z: float | None = None,
    instance: int = 1,
) -> None:
    from pydicom.uid import CTImageStorage

    from pipeline.demo import synthetic_dicom, write_dicom_file

    geometry = {}
    if z is not None:
        geometry = dict(
            ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[-90.0, -90.0, z],
            SliceThickness=2.5, RescaleSlope=1, RescaleIntercept=-1024,
        )
    ds = synthetic_dicom(
        img.astype(np.uint16), CTImageStorage if modality == "CT" else "1.2.840.10008.5.1.4.1.1.1",
        StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, PatientID=pid, Modality=modality,
        InstanceNumber=instance, PixelSpacing=[0.7, 0.7], BitsStored=12, HighBit=11, **geometry,
    )
    write_dicom_file(path, ds)


def build(root: Path, n_files: int, rng: np.random.Generator) -> list[Path]:
    from pydicom.uid import generate_uid

    n_series, per_series = 10, 10
    n_single = n_files - n_series * per_series
    rows, files = [], []
    for i in range(n_single):
        rel = f"cr/p{i:04d}/img.dcm"
        _write(
            root / "src" / rel,
            rng.integers(0, 4000, (256, 256)),
            f"P{i:04d}",
            "CR",
            generate_uid(),
            generate_uid(),
        )
        rows.append((rel, i % 2))
        files.append(root / "src" / rel)
    for s in range(n_series):
        study, series = generate_uid(), generate_uid()
        for k in range(per_series):
            rel = f"ct/s{s:02d}/slice{k:02d}.dcm"
            _write(
                root / "src" / rel,
                rng.integers(0, 2000, (256, 256)),
                f"CT{s:02d}",
                "CT",
                series,
                study,
                z=2.5 * k,
                instance=k + 1,
            )
            files.append(root / "src" / rel)
        rows.append((f"ct/s{s:02d}", s % 2))
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return files


def config(root: Path, processes: int):
    import yaml

    from pipeline.config import load_config

    cfg = {
        "name": "bench",
        "task": {"kind": "binary", "classes": {"0": "neg", "1": "pos"}, "positive_class": "pos"},
        "data": {"source": "src", "labels_csv": "labels.csv"},
        "ingest": {"processes": processes},
        "runtime": {"workspace": "ws"},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    return load_config(root / "config.yaml")


def timed_ingest(cfg, ws: Path, name: str) -> tuple[float, dict]:
    from pipeline.ingest.stage import run_ingest

    out = ws / "ingest" / name
    out.mkdir(parents=True)
    t = time.perf_counter()
    report = run_ingest(cfg, out, ws)
    return time.perf_counter() - t, report["incremental"]


def cache_load(ws: Path, n: int = 20) -> list[tuple[str, str, float]]:
    """Median load time of the same volumes from .npy, mmap .npy, .nii and .nii.gz."""
    import nibabel as nib

    vols = sorted((ws / "cache" / "volumes").glob("*.npy"), key=lambda p: -p.stat().st_size)
    big = vols[0]  # a CT series (256x256x10)
    small = vols[-1]  # a CR image (256x256x1)
    tmp = Path(tempfile.mkdtemp())
    out = []
    for label, src in (("CT 256x256x10 int16", big), ("CR 256x256x1", small)):
        arr = np.load(src)
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp / "v.nii")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp / "v.nii.gz")

        def best(fn) -> float:
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t)
            return float(np.median(ts))

        out.append((label, ".npy", best(lambda s=src: np.load(s))))
        out.append((label, ".npy mmap + copy", best(lambda s=src: np.array(np.load(s, mmap_mode="r")))))
        out.append((label, ".nii", best(lambda: np.asanyarray(nib.load(tmp / "v.nii").dataobj))))
        out.append((label, ".nii.gz", best(lambda: np.asanyarray(nib.load(tmp / "v.nii.gz").dataobj))))
    shutil.rmtree(tmp)
    return out


def scan_threads(root: Path, workers_list: tuple[int, ...] = (1, 2, 4)) -> list[tuple[int, float]]:
    """Cold header scan (no index) of the whole tree with 1, 2, 4 threads."""
    from pipeline.ingest.sources import scan_sources

    out = []
    for w in workers_list:
        t = time.perf_counter()
        scan_sources(root / "src", workers=w)
        out.append((w, time.perf_counter() - t))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--keep", default=None, help="build the data here and keep it")
    args = ap.parse_args(argv)
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pipeline").setLevel(logging.ERROR)
    from pipeline.workspace import plan_stages

    root = Path(args.keep or tempfile.mkdtemp(prefix="medtl-inc-"))
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    files = build(root, args.files, rng)
    print(f"built {len(files)} files in {time.perf_counter() - t:.1f} s under {root}")
    cfg = config(root, args.processes)
    ws = root / "ws"
    rows = []

    def step(name: str, note: str) -> dict:
        secs, inc = timed_ingest(cfg, ws, name)
        rows.append((note, secs, inc))
        return inc

    cold = step("cold", "cold (empty workspace)")
    step("noop", "no-op rerun")
    plan_stages(cfg)  # first call imports the model registry (torch, timm): not a per-run data cost
    t = time.perf_counter()
    plan_stages(cfg)
    t_plan = time.perf_counter() - t
    for f in files[::10]:
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    step("touch", "touch 10% (mtime only)")
    changed = files[5 : 5 + len(files) // 100 * 10 : 10][: len(files) // 100]
    for f in changed:
        import pydicom

        ds = pydicom.dcmread(f)
        ds.PixelData = rng.integers(0, 4000, (ds.Rows, ds.Columns)).astype(np.uint16).tobytes()
        ds.save_as(f)
    one = step("change1", f"change 1% ({len(changed)} files' pixels)")
    for f in files[1:50:10]:
        f.unlink()
    step("vanish", "5 files deleted")

    print("\n| step | wall s | headers read | volumes decoded / reused | decode s | vanished |")
    print("|---|---|---|---|---|---|")
    for note, secs, inc in rows:
        print(
            f"| {note} | {secs:.2f} | {inc['headers_read']} | {inc['volumes_decoded']} / {inc['volumes_reused']} "
            f"| {inc['decode_seconds']:.2f} | {inc['vanished']} |"
        )
    print(
        f"\nLuigi-side no-op check (plan_stages, imports warm: stat {len(files)} files, hash config): "
        f"{t_plan * 1000:.0f} ms"
    )
    print(
        f"1% change: decode work {one['volumes_decoded']}/{cold['volumes_decoded']} volumes = "
        f"{100 * one['volumes_decoded'] / cold['volumes_decoded']:.1f}% of cold; decode time "
        f"{one['decode_seconds']:.2f} s vs {cold['decode_seconds']:.2f} s "
        f"({100 * one['decode_seconds'] / max(cold['decode_seconds'], 1e-9):.1f}%)"
    )

    print("\n| volume | format | median load ms |")
    print("|---|---|---|")
    for label, fmt, secs in cache_load(ws):
        print(f"| {label} | {fmt} | {secs * 1000:.2f} |")

    print("\n| header scan threads (cold, no index) | seconds | files/s |")
    print("|---|---|---|")
    n_left = len(list((root / "src").rglob("*.dcm")))
    for w, secs in scan_threads(root):
        print(f"| {w} | {secs:.2f} | {n_left / secs:.0f} |")
    print(json.dumps({"root": str(root)}))
    if not args.keep:
        shutil.rmtree(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
