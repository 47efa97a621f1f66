"""Shared fixtures: seeds, and small synthetic datasets with known content and planted PHI."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

torch.set_num_threads(2)

#: Identifiers planted in synthetic DICOM headers and file names; no output outside private/ may hold them.
PHI_NAME = "Doe^Johnathan"
PHI_ID_PREFIX = "MRN77"
PHI_PATH_WORD = "Johnathan_Doe_scan"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


def square_image(rng: np.random.Generator, positive: bool, size: int = 32) -> np.ndarray:
    """Noisy 8-bit image; positives carry a bright square at a random place (a learnable signal)."""
    img = rng.normal(70, 12, (size, size))
    if positive:
        s = size // 4
        r, c = rng.integers(2, size - s - 2, 2)
        img[r : r + s, c : c + s] += 90
    return np.clip(img, 0, 255).astype(np.uint8)


def write_dicom(path: Path, img: np.ndarray, patient_id: str, instance: int = 1) -> None:
    """A Secondary Capture CR image with identifiers planted in every identifying tag."""
    from pipeline.demo import synthetic_dicom, write_dicom_file

    ds = synthetic_dicom(
        img, "1.2.840.10008.5.1.4.1.1.7",
        PatientID=patient_id, PatientName=PHI_NAME, PatientBirthDate="19230101",
        AccessionNumber=f"ACC{patient_id}", InstitutionName="St Planted Hospital",
        ReferringPhysicianName="Who^Doctor", StudyDate="20240229", Modality="CR",
        PatientSex="F" if instance % 2 else "M", PatientAge="054Y", Manufacturer="SynthCo",
        ImageComments="free text about Johnathan Doe", InstanceNumber=instance, PixelSpacing=[0.5, 0.5],
    )
    write_dicom_file(path, ds)


def make_dataset(root: Path, n_patients: int = 60, seed: int = 0) -> Path:
    """A folder of single-image DICOM files (square = positive) and labels.csv keyed by path."""
    r = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        pid = f"{PHI_ID_PREFIX}{i:04d}"
        label = int(i % 3 == 0)  # one third positive
        rel = f"{PHI_PATH_WORD}_{i:04d}/img.dcm"
        write_dicom(root / "images" / rel, square_image(r, bool(label)), pid, instance=i + 1)
        rows.append({"file": rel, "diagnosis": "lesion" if label else "normal"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["file", "diagnosis"], lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (root / "labels.csv").write_text(buf.getvalue())
    return root


def write_config(root: Path, **overrides) -> Path:
    """A config for :func:`make_dataset` data, tiny and fast; nested overrides merged in."""
    cfg = {
        "name": "tiny",
        "task": {"kind": "binary", "classes": {"normal": "normal", "lesion": "lesion"}, "positive_class": "lesion"},
        "data": {"source": "images", "labels_csv": "labels.csv", "id_column": "file", "id_type": "path",
                 "label_column": "diagnosis"},
        "split": {"val": 0.2, "calibration": 0.2, "test": 0.25},
        "preprocess": {"spatial_dims": 2, "image_size": 32},
        "augment": {"preview": 4},
        "model": {"backbone": "efficientnet_lite0", "pretrained": True},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.003, "patience": 5},
        "evaluate": {"n_bootstrap": 200, "min_subgroup": 5},
        "runtime": {"workspace": "ws", "threads": 2},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    write_fixed_key(root / str(cfg.get("runtime", {}).get("workspace", "ws")))
    return path


def write_fixed_key(workspace: Path) -> None:
    """A fixed pseudonymisation key in ``workspace/private`` (as ingestion writes it: 0700 folder, 0600
    file), so hashed splits, and the tiny models trained on them, are the same on every test run."""
    from pipeline.ingest.deid import KEY_FILE, ensure_private_dir
    from pipeline.io import write_text

    key = ensure_private_dir(workspace / "private") / KEY_FILE
    if not key.exists():
        write_text(key, "medtl-fixed-test-key-" + "0123456789abcdef" * 3 + "\n", mode=0o600)


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A config path for a 60-patient synthetic DICOM dataset with planted PHI."""
    make_dataset(tmp_path)
    return write_config(tmp_path)
