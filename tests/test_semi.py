"""Semi-supervised self-training: pseudo-label selection, leakage rules, the harm guard, and a real run."""

from __future__ import annotations

import json
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
    s_good = y * 1.5 + rng.normal(0, 1, 300)
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
        write_train_config(
            tmp_path, strategy="partial", trainable_groups=1, folds=2, epochs=2, ssl_threshold=0.5
        )
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
    off = load_config(
        write_train_config(tmp_path, strategy="partial", trainable_groups=1, epochs=1, semi_supervised="off")
    )
    s2 = run_finetune(off, aug, tmp_path / "out2", tmp_path / "work2", progress=False)
    assert s2["semi_supervised"]["method"] == "off" and s2["semi_supervised"]["harm_guard"] is None


# --- Mean Teacher -------------------------------------------------------------------------------------


def test_ema_teacher_update_known_answer_on_a_one_parameter_net() -> None:
    import torch
    from torch import nn

    from pipeline.train.epochs import ema_model

    student = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = ema_model(student, 0.9)
    expected = []
    for w in (1.0, 2.0, 3.0):  # the first update copies, then t <- 0.9 t + 0.1 w
        with torch.no_grad():
            student.weight.fill_(w)
        teacher.update_parameters(student)
        expected.append(float(teacher.module.weight.detach()))
    np.testing.assert_allclose(expected, [1.0, 0.9 * 1.0 + 0.1 * 2.0, 0.9 * 1.1 + 0.1 * 3.0], rtol=1e-6)
    assert float(student.weight.detach()) == 3.0  # the student is untouched by its teacher


def _unlabelled(n: int = 10, size: int = 16, seed: int = 0):
    from pipeline.train.data import SplitData

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, 1, size, size)).astype(np.float16)
    ids = [f"u{i}" for i in range(n)]
    return SplitData(ids, ids, x, np.full(n, -1, np.int64), [{} for _ in ids])


def test_consistency_sends_no_gradient_to_the_teacher_and_matches_the_formula() -> None:
    import torch
    from torch import nn

    from pipeline.train.epochs import ema_model
    from pipeline.train.mean_teacher import Consistency

    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 2))
    teacher = ema_model(student, 0.99)
    teacher.update_parameters(student)
    with torch.no_grad():  # the student moves away from its teacher
        student[1].weight.add_(0.05 * torch.randn_like(student[1].weight))
    c = Consistency(_unlabelled(), seed=0, epochs=2, weight=3.0)
    x1, (x2, scale) = next(iter(c.batches(1, [[4, 4]], None)))  # no transform: the views are the case
    assert scale == pytest.approx(c.weight_at(2 / 4) / 8) and x1.shape == (4, 1, 16, 16)
    torch.testing.assert_close(x1, x2)
    logits = student(x1)
    loss = c.loss(logits, (x2, scale), teacher.module)
    p_s = torch.softmax(logits, 1)
    p_t = torch.softmax(teacher.module(x2), 1)
    want = float((scale * ((p_s - p_t) ** 2).mean(1).sum()).detach())
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    assert float(loss.detach()) > 0
    loss.backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert float(student[1].weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="EMA teacher"):
        c.loss(logits, (x2, scale), None)


def test_unlabelled_views_are_two_augmentations_of_the_same_cases_and_ranks_do_not_overlap() -> None:
    from pipeline.augment.transforms import build_train_transform
    from pipeline.config.sections import AugmentConfig
    from pipeline.train.epochs import DistInfo
    from pipeline.train.mean_teacher import RAMPUP_SHARE, Consistency

    u = _unlabelled(n=12)
    c = Consistency(u, seed=0, epochs=3, weight=1.0)
    steps = c.micro_batches(0, [[2, 2], [2, 2], [2, 2], [2, 2]])  # 16 > 12 cases: a second pass
    for step in steps:
        for m in step:
            v1, v2 = m[: len(m) // 2], m[len(m) // 2 :]
            assert [i % 12 for i in v1] == [i % 12 for i in v2] and not set(v1) & set(v2)
    flat = [i for step in steps for m in step for i in m[: len(m) // 2]]
    assert len(set(flat)) == 16 and set(i % 12 for i in flat) == set(range(12))  # each view its own seed
    assert steps == c.micro_batches(0, [[2, 2]] * 4) and steps != c.micro_batches(1, [[2, 2]] * 4)
    r0 = Consistency(u, 0, 3, 1.0, DistInfo(0, 2)).micro_batches(0, [[3]])
    r1 = Consistency(u, 0, 3, 1.0, DistInfo(1, 2)).micro_batches(0, [[3]])
    assert not {i % 12 for i in r0[0][0]} & {i % 12 for i in r1[0][0]}
    transform = build_train_transform(AugmentConfig(), 2, 16)
    x1, (x2, _) = next(iter(c.batches(0, [[4]], transform)))
    assert not np.allclose(x1.numpy(), x2.numpy())  # independent random augmentations
    # sigmoid ramp-up: ~exp(-5) at the start, full weight once RAMPUP_SHARE of the steps are done
    assert c.weight_at(0.0) == pytest.approx(np.exp(-5.0)) and c.weight_at(RAMPUP_SHARE) == 1.0
    assert c.weight_at(0.1) < c.weight_at(0.2) < c.weight_at(0.3) < 1.0 == c.weight_at(0.9)


def test_mean_teacher_is_refused_for_multilabel_tasks(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError
    from pipeline.train.validation import multilabel_refusals, multilabel_training
    from tests.test_multilabel import _ml_config, _NullLog, make_multilabel_dataset

    make_multilabel_dataset(tmp_path, n=4)
    cfg = load_config(_ml_config(tmp_path, train={"semi_supervised": "mean_teacher"}))
    assert [f for f, _ in multilabel_refusals(cfg)] == ["train.semi_supervised"]
    with pytest.raises(ConfigError, match="train.semi_supervised") as err:
        multilabel_training(cfg, _NullLog())
    assert err.value.code == "multilabel_unsupported"
    assert method_for("mean_teacher", 3) == "mean_teacher" and method_for("auto", 3) == "pseudo_label"


def _add_held_out(aug: Path) -> tuple[set[str], set[str]]:
    """Calibration and test cases, and an unlabelled case of a test patient, appended to the index."""
    import csv

    with open(aug / "index.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    held, leak = set(), {"unl_test_patient"}
    extra = []
    for i, split in enumerate(["calibration"] * 4 + ["test"] * 4):
        cid = f"held{i}"
        np.save(aug / "tensors" / f"{cid}.npy", np.zeros((1, 16, 16), np.float16))
        extra.append({"case_id": cid, "patient_id": f"h{i}", "split": split, "label_index": i % 2})
        held.add(cid)
    np.save(aug / "tensors" / "unl_test_patient.npy", np.zeros((1, 16, 16), np.float16))
    extra.append(
        {"case_id": "unl_test_patient", "patient_id": "h7", "split": "unlabelled", "label_index": ""}
    )
    with open(aug / "index.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows + extra)
    return held, leak


def test_mean_teacher_single_model_end_to_end_never_sees_held_out_cases(tmp_path: Path, monkeypatch) -> None:
    import torch

    from pipeline.train import data as data_mod

    aug = make_augment_dir(tmp_path, n=40, unlabelled=30)
    held, leak = _add_held_out(aug)
    seen: set[str] = set()
    original = data_mod.AugmentedDataset.__getitem__

    def recording(self, i):
        seen.add(self.data.case_ids[i % len(self.data)])
        return original(self, i)

    monkeypatch.setattr(data_mod.AugmentedDataset, "__getitem__", recording)
    cfg = load_config(
        write_train_config(
            tmp_path,
            strategy="partial",
            trainable_groups=1,
            epochs=2,
            semi_supervised="mean_teacher",
            ssl_consistency_weight=5.0,
        )
    )
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    semi = summary["semi_supervised"]
    assert semi["method"] == "mean_teacher" and semi["unlabelled_available"] == 30
    assert semi["unlabelled_left_out"] == 1
    (info,) = semi["per_fold"]
    assert info["fold"] is None and info["unlabelled_used"] == 30
    assert info["consistency_weight"] == 5.0 and info["ema_decay"] == 0.99
    assert not seen & (held | leak)  # calibration, test and leaking cases never reach training
    assert {c for c in seen if c.startswith("unl")} == {f"unl{i:03d}" for i in range(30)}
    g = semi["harm_guard"]
    assert g["ci"][0] <= g["difference"] <= g["ci"][1] and semi["used"] == g["use_semi_supervised"]
    # the kept student is the EMA teacher: best.pt holds the teacher's weights, not the raw student's
    semi_dir = tmp_path / "work" / "semi"
    result = json.loads((semi_dir / "result.json").read_text())
    best = torch.load(semi_dir / "best.pt", weights_only=True)
    last = torch.load(semi_dir / "last.pt", weights_only=True)
    trained = [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, best[k])]
    assert trained  # the student moved away from the kept weights
    if result["best_epoch"] == result["epochs_run"]:
        for k, v in best.items():
            torch.testing.assert_close(v, last["ema"][f"module.{k}"])
    TrainedModel.load(tmp_path / "out")


@pytest.mark.slow
def test_mean_teacher_kfold_run_and_the_harm_guard_decides(tmp_path: Path, monkeypatch) -> None:
    from pipeline.train import loop

    aug = make_augment_dir(tmp_path, n=40, unlabelled=60)
    cfg = load_config(
        write_train_config(
            tmp_path,
            strategy="partial",
            trainable_groups=1,
            folds=2,
            epochs=2,
            semi_supervised="mean_teacher",
        )
    )
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    semi = summary["semi_supervised"]
    assert semi["method"] == "mean_teacher" and [f["fold"] for f in semi["per_fold"]] == [0, 1]
    assert all(0 < f["unlabelled_used"] <= 60 for f in semi["per_fold"])
    g = semi["harm_guard"]
    kept = g["auroc_semi_supervised"] if g["use_semi_supervised"] else g["auroc_supervised"]
    assert summary["folds"]["out_of_fold_auroc"] == pytest.approx(kept)
    TrainedModel.load(tmp_path / "out")
    # the same trained folds (resumed from the work folder), the guard deciding each way
    for harmful in (True, False):

        def forced(*args, _h=harmful, **kwargs):
            return dict(harm_guard(*args, **kwargs), use_semi_supervised=not _h)

        monkeypatch.setattr(loop, "harm_guard", forced)
        s = run_finetune(cfg, aug, tmp_path / f"out{harmful}", tmp_path / "work", progress=False)
        g2 = s["semi_supervised"]["harm_guard"]
        want = g2["auroc_supervised"] if harmful else g2["auroc_semi_supervised"]
        assert (
            s["folds"]["out_of_fold_auroc"] == pytest.approx(want) and s["semi_supervised"]["used"] != harmful
        )


def test_report_describes_mean_teacher_not_pseudo_labels() -> None:
    from tests.test_report_scarce import _render

    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.2, 200), 0.01, 0.99)
    guard = harm_guard(y, np.column_stack([1 - p, p]), np.column_stack([1 - p, p]), list(range(200)), 1, 200)
    fold = {"unlabelled_used": 120, "consistency_weight": 50.0, "ema_decay": 0.99}
    per_fold = [dict(fold, fold=0), dict(fold, fold=1, unlabelled_used=118)]
    semi = {"method": "mean_teacher", "unlabelled_available": 300, "used": True, "harm_guard": guard}
    html = _render({"unlabelled": {"cases": 300}}, {"semi_supervised": dict(semi, per_fold=per_fold)})
    assert "pseudo-label" not in html and "(mean_teacher)" in html and "no evidence of harm" in html
    assert "EMA decay 0.990" in html and "weight 50.0" in html and "up to 120 unlabelled" in html
    assert "The EMA teacher (the model kept) was compared with the supervised model" in html
