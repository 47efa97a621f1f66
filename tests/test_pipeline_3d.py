"""A 3D NIfTI cohort end to end: anisotropic voxels, two storage orientations, the physical-space
preprocessing, a compact 3D ResNet, Evaluate and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _write_cohort(root: Path, n: int = 48) -> None:
    import nibabel as nib

    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    lines = ["file,diagnosis"]
    spacing = (1.0, 1.0, 2.5)
    for i in range(n):
        lesion = i % 2 == 1
        vol = rng.normal(100, 10, (24, 24, 10)).astype(np.float32)
        if lesion:
            vol[8:16, 8:16, 3:7] += 80
        affine = np.diag([*spacing, 1.0])
        if i % 3 == 0:  # stored with the first two axes reversed (as a DICOM-derived LPS export would be)
            vol = vol[::-1, ::-1, :].copy()
            affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
            affine[:3, 3] = [23 * spacing[0], 23 * spacing[1], 0]
        nib.save(nib.Nifti1Image(vol, affine), root / "images" / f"vol_{i:03d}.nii.gz")
        lines.append(f"vol_{i:03d}.nii.gz,{'lesion' if lesion else 'normal'}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")


def test_nifti_cohort_trains_in_physical_space(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.trained.artefact import TrainedModel
    from pipeline.workspace import plan_stages
    from tasks.cli import run_pipeline
    from tests.conftest import write_config

    _write_cohort(tmp_path)
    config = write_config(
        tmp_path,
        data={"source": "images", "labels_csv": "labels.csv", "id_column": "file", "id_type": "path",
              "label_column": "diagnosis", "kinds": ["nifti"]},
        preprocess={"spatial_dims": 3, "image_size": 16},
        model={"backbone": "resnet10_3d_compact", "pretrained": False},
        train={"strategy": "scratch", "epochs": 2, "batch_size": 8, "lr": 0.003, "patience": 5},
        evaluate={"n_bootstrap": 200, "min_subgroup": 5, "explain_cases": 1},
    )
    assert run_pipeline(config) == 0
    plan = plan_stages(load_config(config))
    spec = json.loads((plan.augment / "transform_spec.json").read_text())["deterministic"]
    assert spec["target_spacing"] == [1.0, 1.0, 2.5]  # the training cases' median, recorded once
    recorded = json.loads((plan.workspace / "cache" / "target_spacing.json").read_text())
    assert recorded["spacing"] == [1.0, 1.0, 2.5]
    model = TrainedModel.load(plan.finetune)
    assert model.preprocessing["target_spacing"] == [1.0, 1.0, 2.5] and model.input_shape == (1, 16, 16, 16)
    metrics = json.loads((plan.evaluate / "metrics.json").read_text())
    assert metrics["splits"]["test"]["cases"] > 0
    assert (plan.evaluate / "report.html").is_file() and (plan.evaluate / "report.pdf").is_file()
