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

import numpy as np

from pipeline.io import write_bytes, write_text

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
CONFIG_TEMPLATE = DATA_DIR / "breastmnist_demo.yaml"
US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
OFFICIAL_SPLITS = {"train": "train", "val": "val", "test": "test"}


def _dicom_bytes(img: np.ndarray, patient: str, index: int) -> bytes:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import dcmwrite
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    uid = lambda kind: generate_uid(entropy_srcs=["medtl-demo", kind, patient])  # noqa: E731
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = US_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = US_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientID = patient
    ds.PatientName = f"Demo^{patient}"
    ds.Modality = "US"
    ds.Manufacturer = "MedMNIST (synthetic DICOM wrapper)"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(img, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_demo_data(folder: Path, npz: Path = DATA_DIR / "breastmnist.npz") -> int:
    """Write BreastMNIST as ``folder/dicom/<split>/<patient>.dcm`` and ``folder/labels.csv``.

    Returns:
        The number of images written (0 when the folder was already complete).
    """
    labels_csv = folder / "labels.csv"
    if labels_csv.exists():
        return 0
    data = np.load(npz)
    rows = []
    for split in ("train", "val", "test"):
        images, labels = data[f"{split}_images"], data[f"{split}_labels"].reshape(-1)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            patient = f"BMN-{split}-{i:04d}"
            rel = f"{split}/{patient}.dcm"
            write_bytes(folder / "dicom" / rel, _dicom_bytes(img, patient, i))
            rows.append({"path": rel, "label": int(lab), "split": OFFICIAL_SPLITS[split]})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["path", "label", "split"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text(labels_csv, buf.getvalue())
    return len(rows)


def prepare_demo(workspace: Path, epochs: int | None = None) -> Path:
    """Create the demo workspace (data + config) if needed and return the config path."""
    import yaml

    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    n = write_demo_data(workspace)
    if n:
        print(
            f"medtl demo: wrote {n} BreastMNIST images (real breast ultrasound, MedMNIST v2, CC BY 4.0) as "
            f"DICOM files with synthetic patient headers to {workspace / 'dicom'}, and labels to "
            f"{workspace / 'labels.csv'}"
        )
    else:
        print(f"medtl demo: reusing the demo data in {workspace}")
    config = workspace / "breastmnist_demo.yaml"
    if not CONFIG_TEMPLATE.is_file():
        raise FileNotFoundError(f"demo config template {CONFIG_TEMPLATE} is missing; reinstall medtl")
    text = CONFIG_TEMPLATE.read_text()
    if epochs is not None:
        cfg = yaml.safe_load(text)
        cfg["train"]["epochs"] = int(epochs)
        text = yaml.safe_dump(cfg, sort_keys=False)
    if not config.exists() or config.read_text() != text:
        write_text(config, text)  # unchanged configs keep their mtime
    print(f"medtl demo: config {config}")
    return config
