"""Which cases to label next: the ranking strategies and ``medtl suggest``'s private list."""

from __future__ import annotations

import csv
import json
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.active.rank import STRATEGIES, rank_candidates


def test_uncertainty_strategies_rank_the_most_uncertain_first() -> None:
    probs = np.array([[0.99, 0.01], [0.5, 0.5], [0.8, 0.2], [0.55, 0.45], [0.95, 0.05]])
    f = np.eye(5)
    for s in ("entropy", "margin"):
        assert rank_candidates(s, 3, probs, f, np.zeros((0, 5)), np.zeros(0)).tolist() == [1, 3, 2]


def test_typicality_covers_the_clusters_the_labelled_set_misses() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10
    feats = np.vstack([c + rng.normal(0, 0.3, (40, 3)) for c in centres])  # three clusters
    labelled = centres[:1] + rng.normal(0, 0.3, (5, 3))  # cluster 0 already labelled
    probs = np.full((120, 2), 0.5)
    for strategy in ("typiclust", "coreset", "probcover"):
        picked = rank_candidates(strategy, 2, probs, feats, labelled, np.zeros(5), seed=0)
        assert all(int(i) // 40 in (1, 2) for i in picked), strategy  # never the covered cluster
    picked = rank_candidates("coreset", 2, probs, feats, labelled, np.zeros(5), seed=0)
    assert sorted(int(i) // 40 for i in picked) == [1, 2]  # k-centre: one case of each uncovered cluster


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_returns_distinct_valid_indices(strategy: str) -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet([1, 1, 1], 60)
    picked = rank_candidates(strategy, 8, probs, rng.normal(size=(60, 6)), rng.normal(size=(10, 6)),
                             rng.integers(0, 3, 10), seed=2)
    assert len(picked) == 8 and len(set(picked.tolist())) == 8 and picked.min() >= 0 and picked.max() < 60
    assert rank_candidates(strategy, 100, probs[:5], rng.normal(size=(5, 6)), np.zeros((0, 6)), np.zeros(0)).size == 5
    with pytest.raises(ValueError, match="expected one of"):
        rank_candidates("magic", 1, probs, probs, probs, np.zeros(60))


def test_suggest_writes_the_labellers_list_privately(tmp_path: Path) -> None:
    from pipeline.active.suggest import suggest_cases
    from pipeline.augment.stage import read_index
    from pipeline.config import load_config
    from pipeline.errors import MedtlError
    from pipeline.train.loop import run_finetune
    from tests.test_train_helpers import make_augment_dir, write_train_config

    aug = make_augment_dir(tmp_path, n=30, unlabelled=12)
    rows = read_index(aug)
    # one unlabelled case of a patient who has a validation case: never suggested
    val_patient = next(r["patient_id"] for r in rows if r["split"] == "val")
    with open(aug / "index.csv", "a") as fh:
        fh.write(f"unl_val,{val_patient},unlabelled,\n")
    np.save(aug / "tensors" / "unl_val.npy", np.zeros((1, 16, 16), np.float16))
    cfg = load_config(write_train_config(tmp_path, strategy="linear_probe", semi_supervised="off"))
    run_finetune(cfg, aug, tmp_path / "finetune", tmp_path / "work", progress=False)
    ingest = tmp_path / "ingest" / "abc"
    priv = tmp_path / "ws" / "private" / "ingest" / "abc"
    priv.mkdir(parents=True)
    (priv / "source_map.csv").write_text(
        "case_id,files\n" + "".join(f"unl{i:03d},/data/PATIENT_NAME_{i}/img.dcm\n" for i in range(12))
    )
    plan = SimpleNamespace(
        workspace=tmp_path / "ws", augment=aug, finetune=tmp_path / "finetune", evaluate=tmp_path / "none",
        ingest=ingest,
    )
    summary = suggest_cases(cfg, plan, 5)
    assert summary["suggested"] == 5 and summary["candidates"] == 12
    assert summary["unlabelled_of_held_out_patients"] == 1 and "unl_val" not in summary["case_ids"]
    assert summary["list"].startswith("private/suggest/") and not summary["calibrated"]
    listed = tmp_path / "ws" / summary["list"]
    assert stat.S_IMODE(listed.stat().st_mode) == 0o600
    rows = list(csv.DictReader(listed.open()))
    assert [r["case_id"] for r in rows] == summary["case_ids"]
    assert all("PATIENT_NAME" in r["source_files"] for r in rows)  # the labeller needs the files...
    shared = json.dumps(summary) + "".join(p.read_text() for p in (tmp_path / "ws" / "suggest").glob("*.json"))
    assert "PATIENT_NAME" not in shared and "/data/" not in shared  # ...shared outputs never see them
    with pytest.raises(MedtlError, match="positive"):
        suggest_cases(cfg, plan, 0)


def test_scarce_label_demo_and_example_config(tmp_path: Path) -> None:
    """`medtl demo --label-fraction 0.1` writes the bundled images with 10% of the train and val labels
    kept (stratified, test labels all kept), and configs/example_scarce_labels.yaml is the same run: every
    result-changing section hashes the same once its paths point at that workspace."""
    import yaml

    from pipeline.config import load_config
    from pipeline.demo import prepare_demo

    ws = tmp_path / "medtl-scarce"
    config = prepare_demo(ws, label_fraction=0.1)
    with open(ws / "labels_f0.1.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 780 and len(list((ws / "dicom").rglob("*.dcm"))) == 780
    for split, n in (("train", 546), ("val", 78), ("test", 156)):
        part = [r for r in rows if r["split"] == split]
        labelled = [r for r in part if r["label"] != ""]
        assert len(part) == n
        if split == "test":
            assert len(labelled) == n
        else:  # about 10% per class, at least one of each
            assert abs(len(labelled) - 0.1 * n) <= 2 and {r["label"] for r in labelled} == {"0", "1"}
    root = Path(__file__).resolve().parents[1]
    example = yaml.safe_load((root / "configs" / "example_scarce_labels.yaml").read_text())
    example["data"].update(source=str(ws / "dicom"), labels_csv=str(ws / "labels_f0.1.csv"))
    example["runtime"]["workspace"] = str(ws)
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(example))
    a, b = load_config(config), load_config(tmp_path / "example.yaml")
    sections = ("task", "data", "split", "preprocess", "augment", "model", "train", "evaluate", "report")
    assert a.hashed(*sections) == b.hashed(*sections)
    assert a.train.semi_supervised == "auto" and b.runtime.workspace == a.runtime.workspace
