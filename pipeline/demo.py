"""The demo: bundled BreastMNIST images written as DICOM files plus a labels CSV, and a config.

The pixels are real breast ultrasound (MedMNIST v2, CC BY 4.0; see ``pipeline/data/README.md``); the DICOM
wrapper is synthetic: one made-up patient per image, Modality US, 8-bit MONOCHROME2. The demo says so when
it writes them. Writing is idempotent: an existing demo folder is reused untouched, so a second
``medtl demo`` is a no-op run.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import write_bytes, write_text

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
CONFIG_TEMPLATE = DATA_DIR / "breastmnist_demo.yaml"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
OFFICIAL_SPLITS = {"train": "train", "val": "val", "test": "test"}


def synthetic_dicom(img: np.ndarray, sop_class_uid: str, uid_seed: str | None = None, **tags: Any):
    """A single-frame MONOCHROME2 DICOM dataset around ``img`` (rows, columns), with ``tags`` set last.

    The demo, the tests and the benchmarks build their DICOM files here. The pixel module follows the
    array's dtype (uint8: 8 bits; uint16/int16: 16 bits, signed for int16); ``tags`` (pydicom keywords)
    may override any of it. UIDs are random, or derived from ``uid_seed`` so files are reproducible.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    def uid(kind: str) -> str:
        return generate_uid(entropy_srcs=["medtl-demo", kind, uid_seed]) if uid_seed else generate_uid()

    img = np.ascontiguousarray(img)
    if img.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"synthetic_dicom: img dtype {img.dtype}; expected uint8, uint16 or int16")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    bits = img.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = int(img.dtype == np.int16)
    ds.PixelData = img.tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom_file(path: Path, ds: Any) -> None:
    """Write a dataset from :func:`synthetic_dicom` to ``path`` (atomically, folders created)."""
    from pydicom.filewriter import dcmwrite

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    write_bytes(path, buf.getvalue())


def withhold_labels(rows: list[dict[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """The scarce-label setting: a stratified share ``fraction`` of the train rows and of the val rows keeps
    its label (per class at least one, in a seeded hash order of ``path``); the other train/val rows get an
    empty label cell (unlabelled cases). Test rows keep theirs. Returns new row dicts (``path``, ``label``,
    ``split``, ...); ``bench/medmnist.py --label-fraction`` uses the same rule."""
    import hashlib

    out = [dict(r) for r in rows]
    for split in ("train", "val"):
        for label in sorted({str(r["label"]) for r in out if r["split"] == split}):
            group = [r for r in out if r["split"] == split and str(r["label"]) == label]
            group.sort(key=lambda r: hashlib.sha256(f"{seed}:{r['path']}".encode()).digest())
            keep = max(1, int(np.ceil(fraction * len(group))))
            for r in group[keep:]:
                r["label"] = ""
    return out


def labels_name(label_fraction: float | None) -> str:
    """``labels.csv`` (every label), or ``labels_f<F>.csv`` for the scarce-label demo."""
    return "labels.csv" if label_fraction is None else f"labels_f{label_fraction:g}.csv"


def write_demo_data(
    folder: Path, npz: Path = DATA_DIR / "breastmnist.npz", label_fraction: float | None = None
) -> int:
    """Write BreastMNIST as ``folder/dicom/<split>/<patient>.dcm`` and ``folder/labels.csv`` (with
    ``label_fraction``: ``folder/labels_f<F>.csv``, most train/val labels withheld, :func:`withhold_labels`).

    Returns:
        The number of images written (0 when the folder was already complete; images another demo wrote
        into the same folder are reused).
    """
    labels_csv = folder / labels_name(label_fraction)
    if labels_csv.exists():
        return 0
    data = np.load(npz)
    rows, written = [], 0
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            patient = f"BMN-{split}-{i:04d}"
            rel = f"{split}/{patient}.dcm"
            rows.append({"path": rel, "label": int(lab), "split": OFFICIAL_SPLITS[split]})
            if (folder / "dicom" / rel).is_file():  # the other demo's images, same content
                continue
            ds = synthetic_dicom(
                np.asarray(img, dtype=np.uint8), US_IMAGE_STORAGE, uid_seed=patient, PatientID=patient,
                PatientName=f"Demo^{patient}", Modality="US", BurnedInAnnotation="NO",
                Manufacturer="MedMNIST (synthetic DICOM wrapper)",
            )
            write_dicom_file(folder / "dicom" / rel, ds)
            written += 1
    if label_fraction is not None:
        rows = withhold_labels(rows, label_fraction)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "label", "split"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(labels_csv, buf.getvalue())
    return written


def demo_config_text(label_fraction: float | None = None, epochs: int | None = None) -> str:
    """The demo's config: the bundled template, or with ``label_fraction`` the scarce-label demo (most
    train/val labels withheld; the unlabelled cases feed semi-supervised training, ``medtl suggest`` ranks
    them; ``configs/example_scarce_labels.yaml`` is the same config with paths for the repository)."""
    import yaml

    if not CONFIG_TEMPLATE.is_file():
        raise FileNotFoundError(f"demo config template {CONFIG_TEMPLATE} is missing; reinstall medtl")
    text = CONFIG_TEMPLATE.read_text()
    if epochs is None and label_fraction is None:
        return text
    cfg = yaml.safe_load(text)
    if epochs is not None:
        cfg["train"]["epochs"] = int(epochs)
    if label_fraction is not None:
        cfg["name"] = "breastmnist-scarce-demo"
        cfg["data"]["labels_csv"] = labels_name(label_fraction)
        cfg["train"]["semi_supervised"] = "auto"
        cfg["report"]["title"] += f" ({label_fraction:.0%} of the train/val labels)"
    return yaml.safe_dump(cfg, sort_keys=False)


def prepare_demo(workspace: Path, epochs: int | None = None, label_fraction: float | None = None) -> Path:
    """Create the demo workspace (data + config) if needed and return the config path.

    ``label_fraction`` (0 < F < 1): the scarce-label demo: the labels CSV keeps a stratified share F of the
    train and val labels, the other images are unlabelled cases.
    """
    if label_fraction is not None and not 0.0 < label_fraction < 1.0:
        raise ValueError(f"demo --label-fraction: {label_fraction}; expected a share between 0 and 1")
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    n = write_demo_data(workspace, label_fraction=label_fraction)
    labels = workspace / labels_name(label_fraction)
    if n:
        kept = "" if label_fraction is None else f" ({label_fraction:.0%} of the train/val labels kept)"
        print(
            f"medtl demo: wrote {n} BreastMNIST images (real breast ultrasound, MedMNIST v2, CC BY 4.0) as "
            f"DICOM files with synthetic patient headers to {workspace / 'dicom'}, and labels to {labels}{kept}"
        )
    else:
        print(f"medtl demo: reusing the demo data in {workspace}")
    config = workspace / ("breastmnist_demo.yaml" if label_fraction is None else "breastmnist_scarce_demo.yaml")
    text = demo_config_text(label_fraction, epochs)
    if not config.exists() or config.read_text() != text:
        write_text(config, text)  # unchanged configs keep their mtime
    print(f"medtl demo: config {config}")
    return config
