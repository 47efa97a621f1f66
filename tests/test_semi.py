"""Semi-supervised self-training: pseudo-label selection, leakage rules, the harm guard, and a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.train.loop import run_finetune
from pipeline.train.semi import align, harm_guard, load_unlabelled, method_for, select_pseudo_labels
from pipeline.trained.artefact import TrainedModel
from tests.test_train_helpers import make_augment_dir, write_train_config


def test_distribution_alignment_restores_the_prior() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.beta(2, 5, 1000)  # a teacher biased towards class 0 (mean p1 ~ 0.29)
    probs = np.column_stack([1 - p1, p1])
    q = align(probs, np.array([0.5, 0.5]))
    np.testing.assert_allclose(q.sum(1), 1.0)
    assert abs(q[:, 1].mean() - 0.5) < 0.05 < abs(p1.mean() - 0.5)
    assert np.all(np.argsort(q[:, 1]) == np.argsort(p1))  # ranking kept


def test_pseudo_labels_respect_threshold_and_class_quota() -> None:
    probs = np.array([[0.99, 0.01], [0.97, 0.03], [0.6, 0.4], [0.02, 0.98], [0.05, 0.95], [0.2, 0.8]])
    pl = select_pseudo_labels(probs, np.array([0.5, 0.5]), threshold=0.9, max_total=2)
    assert sorted(pl.labels.tolist()) == [0, 1]  # one per class (quota), the most confident each
    assert set(pl.index.tolist()) == {0, 3}
    none = select_pseudo_labels(probs, np.array([0.5, 0.5]), threshold=0.999, max_total=10)
    assert len(none.index) == 0


def test_unlabelled_cases_of_held_out_patients_are_never_used(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=20, unlabelled=6)
    from pipeline.augment.stage import read_index

    rows = read_index(aug)
    test_patient = next(r["patient_id"] for r in rows if r["split"] == "val")
    rows.append({"case_id": "unl_leak", "patient_id": test_patient, "split": "unlabelled", "label_index": ""})
    np.save(aug / "tensors" / "unl_leak.npy", np.zeros((1, 16, 16), np.float16))
    u, left_out = load_unlabelled(aug, rows)
    assert len(u) == 6 and left_out == 1 and "unl_leak" not in u.case_ids
    assert (u.y == -1).all()
    assert method_for("auto", 6) == "pseudo_label" and method_for("auto", 0) is None
    assert method_for("off", 6) is None


def test_harm_guard_falls_back_only_on_evidence_of_harm() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    s_good = (y * 1.5 + rng.normal(0, 1, 300))
    s_bad = rng.normal(0, 1, 300)
    to_p = lambda s: np.column_stack([1 - 1 / (1 + np.exp(-s)), 1 / (1 + np.exp(-s))])  # noqa: E731
    pats = [f"p{i}" for i in range(300)]
    harm = harm_guard(y, to_p(s_good), to_p(s_bad), pats, 1, n_bootstrap=500)
    assert not harm["use_semi_supervised"] and harm["ci"][1] < 0 and "fell back" in harm["decision"]
    same = harm_guard(y, to_p(s_good), to_p(s_good + rng.normal(0, 0.01, 300)), pats, 1, n_bootstrap=500)
    assert same["use_semi_supervised"] and same["ci"][0] <= 0 <= same["ci"][1]


@pytest.mark.slow
def test_kfold_run_with_unlabelled_cases_trains_students(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=40, unlabelled=80)
    cfg = load_config(
        write_train_config(tmp_path, strategy="partial", trainable_groups=1, folds=2, epochs=2, ssl_threshold=0.5)
    )
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    semi = summary["semi_supervised"]
    assert semi["method"] == "pseudo_label" and semi["unlabelled_available"] == 80
    assert len(semi["per_fold"]) == 2 and all(f["pseudo_labelled"] > 0 for f in semi["per_fold"])
    g = semi["harm_guard"]
    assert g["ci"][0] <= g["difference"] <= g["ci"][1] and semi["used"] == g["use_semi_supervised"]
    # every pseudo-labelled count is bounded by the labelled count of its fold
    assert all(f["pseudo_labelled"] <= 40 for f in semi["per_fold"])
    TrainedModel.load(tmp_path / "out")  # the artefact is whole
    off = load_config(write_train_config(tmp_path, strategy="partial", trainable_groups=1, epochs=1, semi_supervised="off"))
    s2 = run_finetune(off, aug, tmp_path / "out2", tmp_path / "work2", progress=False)
    assert s2["semi_supervised"]["method"] == "off" and s2["semi_supervised"]["harm_guard"] is None
