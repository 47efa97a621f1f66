"""medtl predict refuses a non-finite, constant or empty image per case (codes ``non_finite``, ``constant``,
``empty``: Ingest's own check on the stored values, before windowing) and scores the rest (issue 15 point 2).

The registered model is replaced by a stand-in scorer (uniform probabilities): what is under test is the
per-case rejection in :func:`pipeline.ops.predict.predict_folder`, not the network."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.ops import predict
from tests.conftest import write_config


class _Scorer:
    """Stands in for a registered model: the tiny config's preprocessing, two classes, no conformal sets."""

    def __init__(self, workspace: Path, model: dict, cfg) -> None:
        from models import get_spec
        from pipeline.augment.preprocess import make_spec

        self.spec = make_spec(cfg.preprocess, get_spec(cfg.model.backbone)).to_dict()
        self.reference = {}
        self.info = {"class_names": ["normal", "lesion"]}
        self.alpha, self.conformal, self.calibrator_info = 0.1, None, {"method": "none"}
        self.scored: list[int] = []

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        assert np.isfinite(x).all()
        p = np.full((len(x), 2), 0.5)
        return {"logits": p, "raw": p, "calibrated": p, "sets": np.ones_like(p, dtype=bool)}


@pytest.fixture(autouse=True)
def fixed_key(monkeypatch) -> None:
    monkeypatch.setenv("MEDTL_TEST_KEY", "medtl-test-key-0123456789abcdef")


def test_bad_images_are_per_case_rejections(tmp_path: Path, monkeypatch) -> None:
    """Today: a NaN scan goes to the network (NaN probabilities) and a blank one is scored as an image."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels.csv").write_text("file,diagnosis\n")
    cfg = load_config(
        write_config(
            tmp_path,
            deid={"key_env": "MEDTL_TEST_KEY"},
            data={"kinds": ["nifti"]},
            runtime={"workspace": str(tmp_path / "ws"), "threads": 1},
        )
    )
    monkeypatch.setattr(predict, "ModelScorer", _Scorer)
    src = tmp_path / "new"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(
            nib.Nifti1Image(rng.normal(100, 10, (32, 32, 1)).astype(np.float32), np.eye(4)),
            src / f"good{i}.nii.gz",
        )
    nan = rng.normal(100, 10, (32, 32, 1)).astype(np.float32)
    nan[3, 4, 0] = np.inf
    nib.save(nib.Nifti1Image(nan, np.eye(4)), src / "inf.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 1), np.float32), np.eye(4)), src / "blank.nii.gz")
    summary = predict.predict_folder(cfg, {"id": 1}, src, tmp_path / "out")
    assert summary["scored"] == 2
    assert sorted(p["code"] for p in summary["problems"]) == ["constant", "non_finite"]
    assert all(p["case_id"].startswith("C") for p in summary["problems"])
    text = json.dumps(summary) + (tmp_path / "out" / "predictions.csv").read_text()
    assert str(src) not in text and "blank" not in text and "inf.nii" not in text
