"""Nightly operation on a 1,000-case workspace: no-new-data reruns and a 1%-new-cases rerun.

Builds a synthetic export (``--cases`` single-image 2D DICOM files, 32x32 noise with a bright square on
positives, as ``tests/conftest.py``; labels keyed by path), runs ``medtl run`` once with a tiny training
budget (linear probe on EfficientNet-Lite0, 32 px), then times whole ``python -m tasks.cli run CONFIG``
processes (imports included):

* **same night, no new data**: tonight's record exists, Luigi runs nothing;
* **next night, no new data**: simulated by removing tonight's record (the record is the only output whose
  name depends on the date), so RunPipeline runs: retraining policy, monitoring, a new record;
* **1% new cases**: ``--cases // 100`` new patients added; Ingest reruns through its incremental index
  (header reads and volume decodes counted in ``ingest_report.json["incremental"]``), compared with the
  first run. ``ops.retrain.min_new_cases`` is above 1%, so the night ingests and monitors, as configured.

A no-op night is decided from stat calls and the config hash alone: the bench checks (``python -X
importtime``) that it imports none of torch, MONAI, matplotlib or timm. If it takes longer than the 2 s
target, ``python -X importtime`` and cProfile of that rerun are summarised (``--profile`` forces it).

Usage: ``python bench/nightly.py [--cases 1000] [--repeats 3] [--keep DIR] [--json FILE] [--profile]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the project's packages, also when medtl is not pip-installed
TARGET_NOOP_S = 2.0
HEAVY = ("torch", "monai", "matplotlib", "timm")


def _dicom(path: Path, img: np.ndarray, patient_id: str) -> None:
    from pipeline.demo import synthetic_dicom, write_dicom_file

    ds = synthetic_dicom(
        img, "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
        PatientID=patient_id, Modality="CR", Manufacturer="SynthCo", PixelSpacing=[0.5, 0.5],
    )
    write_dicom_file(path, ds)


def _image(rng: np.random.Generator, positive: bool, size: int = 32) -> np.ndarray:
    """Noisy 8-bit image, axes (row, column); positives carry a bright square."""
    img = rng.normal(70, 12, (size, size))
    if positive:
        s = size // 4
        r, c = rng.integers(2, size - s - 2, 2)
        img[r : r + s, c : c + s] += 90
    return np.clip(img, 0, 255).astype(np.uint8)


def add_cases(root: Path, start: int, count: int, rng: np.random.Generator) -> None:
    """Write patients ``start .. start+count-1`` (one DICOM each) and append them to ``labels.csv``."""
    rows = []
    for i in range(start, start + count):
        label = int(i % 3 == 0)
        rel = f"p{i:05d}/img.dcm"
        _dicom(root / "images" / rel, _image(rng, bool(label)), f"P{i:05d}")
        rows.append((rel, "lesion" if label else "normal"))
    labels = root / "labels.csv"
    new = not labels.exists()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if new:
        w.writerow(["file", "diagnosis"])
    w.writerows(rows)
    with open(labels, "a") as fh:
        fh.write(buf.getvalue())


def write_config(root: Path, min_new_cases: int) -> Path:
    import yaml

    cfg = {
        "name": "nightly-bench",
        "task": {
            "kind": "binary",
            "classes": {"normal": "normal", "lesion": "lesion"},
            "positive_class": "lesion",
        },
        "data": {
            "source": "images",
            "labels_csv": "labels.csv",
            "id_column": "file",
            "id_type": "path",
            "label_column": "diagnosis",
        },
        "split": {"val": 0.15, "calibration": 0.15, "test": 0.25},
        "preprocess": {"spatial_dims": 2, "image_size": 32},
        "augment": {"preview": 4},
        "model": {"backbone": "efficientnet_lite0", "pretrained": True},
        "train": {"strategy": "linear_probe", "epochs": 1, "batch_size": 64},
        "evaluate": {"n_bootstrap": 200, "min_subgroup": 5},
        "runtime": {"workspace": "ws", "threads": 2},
        "ops": {
            "retries": 0,
            "retrain": {"min_new_cases": min_new_cases},
            "promotion": {"min_auroc": 0.0, "min_holdout_cases": 20},
        },
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def medtl(args: list[str], python_flags: tuple[str, ...] = ()) -> tuple[float, subprocess.CompletedProcess]:
    """Run ``python [flags] -m tasks.cli ARGS`` from the repository root; return (wall s, result)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t = time.perf_counter()
    res = subprocess.run(
        [sys.executable, *python_flags, "-m", "tasks.cli", *args],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return time.perf_counter() - t, res


def _run(config: Path, what: str) -> float:
    secs, res = medtl(["run", str(config)])
    if res.returncode != 0:
        raise SystemExit(f"{what}: medtl run exited {res.returncode}\n{res.stderr[-3000:]}")
    return secs


def files_state(ws: Path) -> dict[str, int]:
    return {str(p.relative_to(ws)): p.stat().st_mtime_ns for p in ws.rglob("*") if p.is_file()}


def ingest_counts(ws: Path) -> list[dict]:
    """``incremental`` block of every Ingest folder, oldest first."""
    out = []
    for d in sorted((ws / "ingest").iterdir(), key=lambda p: p.stat().st_mtime):
        rep = d / "ingest_report.json"
        if d.name.startswith(".") or not rep.is_file():
            continue
        inc = json.loads(rep.read_text()).get("incremental", {})
        out.append({"folder": d.name, **inc})
    return out


def heavy_imports(config: Path) -> list[str]:
    """Which of :data:`HEAVY` a no-op ``medtl run`` imports (it should import none)."""
    _, res = medtl(["run", str(config)], ("-X", "importtime"))
    names = {m.group(1).split(".")[0] for m in re.finditer(r"import time:.*\|\s*(\S+)$", res.stderr, re.M)}
    return [h for h in HEAVY if h in names]


def import_profile(config: Path, top: int = 12) -> list[tuple[str, float]]:
    """Cumulative import time (s) of the slowest top-level packages in a no-op ``medtl run``."""
    _, res = medtl(["run", str(config)], ("-X", "importtime"))
    per_pkg: dict[str, float] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if m and len(m.group(3)) <= 1:  # top-level imports only (cumulative covers their children)
            pkg = m.group(4).split(".")[0]
            per_pkg[pkg] = per_pkg.get(pkg, 0.0) + int(m.group(2)) / 1e6
    return sorted(per_pkg.items(), key=lambda kv: -kv[1])[:top]


def cprofile(config: Path, top: int = 15) -> list[tuple[str, float]]:
    """Cumulative time of the slowest medtl/luigi functions in a no-op ``medtl run`` (cProfile)."""
    out = Path(tempfile.mkdtemp()) / "noop.prof"
    medtl(["run", str(config)], ("-m", "cProfile", "-o", str(out)))
    st = pstats.Stats(str(out))
    rows = []
    for (file, line, fn), (_, _, _, ct, _) in st.stats.items():  # type: ignore[attr-defined]
        if any(k in file for k in ("/pipeline/", "/tasks/", "/models/", "luigi/")):
            rows.append((f"{Path(file).parent.name}/{Path(file).name}:{line} {fn}", ct))
    shutil.rmtree(out.parent, ignore_errors=True)
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3, help="timed no-op reruns of each kind")
    ap.add_argument("--keep", default=None, help="build the workspace here and keep it")
    ap.add_argument("--json", default=None, help="write the figures here")
    ap.add_argument("--profile", action="store_true", help="profile the no-op rerun even when under target")
    args = ap.parse_args(argv)

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medtl-nightly-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n_new = max(1, args.cases // 100)
    config = write_config(root, min_new_cases=n_new + 1)
    ws = root / "ws"
    res: dict = {
        "cases": args.cases,
        "new_cases": n_new,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), python {platform.python_version()}",
        "command": "python bench/nightly.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    t = time.perf_counter()
    add_cases(root, 0, args.cases, rng)
    print(f"built {args.cases} DICOM files in {time.perf_counter() - t:.1f} s under {root}", flush=True)

    res["first_run_s"] = _run(config, "first run")
    print(
        f"first run (ingest, augment, linear probe, evaluate, promote): {res['first_run_s']:.1f} s",
        flush=True,
    )

    before = files_state(ws)
    same = [_run(config, "same-night rerun") for _ in range(args.repeats)]
    res["same_night_noop_s"] = same
    res["same_night_wrote_nothing"] = files_state(ws) == before
    res["same_night_heavy_imports"] = heavy_imports(config)
    print(
        f"same night, no new data: {', '.join(f'{s:.2f}' for s in same)} s; heavy imports: "
        f"{res['same_night_heavy_imports'] or 'none'}",
        flush=True,
    )

    nxt = []
    for _ in range(args.repeats):
        for rec in (ws / "runs").glob("*.json"):
            rec.unlink()  # what differs on the next night: tonight's record does not exist yet
        nxt.append(_run(config, "next-night rerun"))
    res["next_night_no_new_data_s"] = nxt
    print(f"next night, no new data: {', '.join(f'{s:.2f}' for s in nxt)} s", flush=True)

    add_cases(root, args.cases, n_new, rng)
    res["one_percent_s"] = _run(config, "1% new cases")
    counts = ingest_counts(ws)
    first, last = counts[0], counts[-1]
    res["ingest_first"], res["ingest_one_percent"] = first, last
    rec = max((ws / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    res["one_percent_record_retrain"] = json.loads(rec.read_text())["retrain"]
    print(f"1% new cases ({n_new}): {res['one_percent_s']:.1f} s", flush=True)

    keys = (
        "headers_read",
        "volumes_decoded",
        "volumes_reused",
        "scan_seconds",
        "decode_seconds",
        "total_seconds",
    )
    print("\n| measure | first run | 1% new | ratio |\n|---|---|---|---|")
    ratios = {}
    for k in keys:
        a, b = first.get(k), last.get(k)
        ratio = (b / a) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else None
        ratios[k] = ratio
        print(f"| ingest {k} | {a} | {b} | {'' if ratio is None else f'{ratio:.3f}'} |")
    res["ingest_ratios"] = ratios
    print(
        f"| whole night, wall s | {res['first_run_s']:.1f} | {res['one_percent_s']:.1f} | "
        f"{res['one_percent_s'] / res['first_run_s']:.3f} |"
    )
    print(
        f"| no-op night (same / next night), wall s | | {min(same):.2f} / {min(nxt):.2f} | "
        f"target <= {TARGET_NOOP_S:.0f} s (same night) |"
    )

    if args.profile or min(same) > TARGET_NOOP_S:
        res["import_profile_s"] = import_profile(config)
        res["cprofile_cumulative_s"] = cprofile(config)
        print("\nslowest top-level imports of a no-op run (s):")
        for name, s in res["import_profile_s"]:
            print(f"  {name:<24} {s:.2f}")
        print("cProfile, cumulative s (medtl, luigi):")
        for name, s in res["cprofile_cumulative_s"]:
            print(f"  {s:7.2f}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
