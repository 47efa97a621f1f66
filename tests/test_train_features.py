"""Training features: gradient accumulation, balanced sampler, schedules, k-fold ensemble, config checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import TrainConfig, load_config
from pipeline.errors import ConfigError
from pipeline.train.data import SplitData, balanced_order, epoch_order, patient_folds
from pipeline.train.epochs import DistInfo, _batches, _scheduler
from pipeline.train.loop import run_finetune
from pipeline.trained.artefact import TrainedModel
from pipeline.trained.nets import FoldEnsemble
from tests.test_train_helpers import make_augment_dir, write_train_config


def test_accumulation_gives_the_same_step_as_one_big_batch(tmp_path: Path) -> None:
    # head-only training with frozen (eval-mode) BatchNorm: micro-batches change nothing but the summation
    aug = make_augment_dir(tmp_path, n=48)
    sds = []
    for acc in (1, 4):
        cfg = load_config(
            write_train_config(
                tmp_path, strategy="partial", trainable_groups=1, epochs=2, batch_size=8, accumulate_steps=acc
            )
        )
        run_finetune(cfg, aug, tmp_path / f"out{acc}", tmp_path / f"work{acc}", progress=False)
        sds.append(torch.load(tmp_path / f"out{acc}" / "model.pt", weights_only=True))
    for k in sds[0]:
        torch.testing.assert_close(sds[0][k], sds[1][k], rtol=1e-4, atol=1e-6)
    assert not torch.equal(sds[0]["classifier.weight"], torch.zeros_like(sds[0]["classifier.weight"]))


def test_batches_shard_over_ranks_and_micro_batches() -> None:
    order = list(range(20))
    steps0 = _batches(order, 8, DistInfo(0, 2), accumulate=2)
    steps1 = _batches(order, 8, DistInfo(1, 2), accumulate=2)
    assert len(steps0) == 2  # the partial last batch is dropped
    flat0 = [i for s in steps0 for m in s for i in m]
    flat1 = [i for s in steps1 for m in s for i in m]
    assert sorted(flat0 + flat1) == list(range(16)) and not set(flat0) & set(flat1)
    assert all(len(m) >= 2 for s in steps0 for m in s)


def test_balanced_sampler_equalises_classes_and_replays() -> None:
    y = np.array([0] * 90 + [1] * 10)
    a = balanced_order(y, seed=3, epoch=0, num_classes=2)
    assert a == balanced_order(y, seed=3, epoch=0, num_classes=2)
    assert a != balanced_order(y, seed=3, epoch=1, num_classes=2)
    share = np.mean([np.mean(y[balanced_order(y, 3, e, 2)] == 1) for e in range(30)])
    assert 0.4 < share < 0.6
    assert sorted(epoch_order(100, 3, 0)) == list(range(100))


@pytest.mark.parametrize("schedule", ["cosine", "onecycle", "constant"])
def test_schedules_peak_at_lr_and_resume_from_state(schedule: str) -> None:
    tc = TrainConfig(schedule=schedule, epochs=5, warmup_epochs=1, lr=0.01)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=tc.lr)
    sched = _scheduler(opt, tc, steps_per_epoch=10)
    lrs = []
    for _ in range(50):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert max(lrs) <= tc.lr * 1.0001 and max(lrs) >= tc.lr * 0.9
    if schedule != "constant":
        assert lrs[-1] < 0.05 * tc.lr
    # a scheduler rebuilt from its state dict continues identically
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=tc.lr)
    s2 = _scheduler(opt2, tc, 10)
    s2.load_state_dict(sched.state_dict())
    assert s2.last_epoch == sched.last_epoch


def test_patient_folds_keep_patients_together_and_stratify() -> None:
    pats = [f"p{i // 2}" for i in range(60)]  # two cases per patient
    y = np.array([int(i // 2 % 3 == 0) for i in range(60)])
    data = SplitData([str(i) for i in range(60)], pats, np.zeros((60, 1, 2, 2), np.float16), y, [{}] * 60)
    fold = patient_folds(data, 3, seed=1)
    for p in set(pats):
        assert len({fold[i] for i in range(60) if pats[i] == p}) == 1
    for k in range(3):
        assert 6 <= np.sum((fold == k) & (y == 1)) <= 8
    with pytest.raises(ValueError, match="folds=40"):
        patient_folds(data, 40, seed=1)


def test_kfold_ensemble_is_loaded_by_the_evaluate_loader(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=48)
    cfg = load_config(write_train_config(tmp_path, strategy="linear_probe", folds=3))
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    assert summary["folds"]["k"] == 3 and len(summary["folds"]["per_fold"]) == 3
    assert 0.0 <= summary["folds"]["out_of_fold_auroc"] <= 1.0
    trained = TrainedModel.load(tmp_path / "out")
    model, info = trained.network, trained.info
    assert isinstance(model, FoldEnsemble) and info["ensemble"]["folds"] == 3
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        mean_p = torch.stack([torch.softmax(m(x), 1) for m in model.members]).mean(0)
        torch.testing.assert_close(torch.softmax(model(x), 1), mean_p)


def test_history_csv_and_summary_are_written(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=48)
    cfg = load_config(
        write_train_config(
            tmp_path,
            strategy="finetune",
            epochs=2,
            sampler="balanced",
            class_weighting="none",
            schedule="onecycle",
        )
    )
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    lines = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,val_loss,val_auroc") and len(lines) == 3
    assert (
        json.loads((tmp_path / "out" / "train_summary.json").read_text())["epochs_run"]
        == summary["epochs_run"]
        == 2
    )


@pytest.mark.parametrize(
    ("train", "match"),
    [
        ({"sampler": "balanced"}, "corrects the imbalance twice"),
        ({"batch_size": 10, "accumulate_steps": 3}, "does not divide"),
        ({"unfreeze_milestones": [3, 2]}, "strictly increasing"),
        ({"strategy": "auto", "folds": 3}, "fixed train.strategy"),
        ({"strategy": "probe"}, "train.strategy"),
    ],
)
def test_bad_train_options_are_refused_with_the_key(tmp_path: Path, train: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(write_train_config(tmp_path, **train))


def test_tensorboard_log_is_published_with_every_epoch(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    aug = make_augment_dir(tmp_path, n=48)
    cfg = load_config(
        write_train_config(tmp_path, strategy="auto", auto_candidates=["linear_probe", "partial"])
    )
    run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    ev = EventAccumulator(str(tmp_path / "out" / "tensorboard" / "partial"))
    ev.Reload()
    assert [s.step for s in ev.Scalars("val_auroc")] == [1, 2]
    assert {"train_loss", "val_loss", "lr"} <= set(ev.Tags()["scalars"])


def test_small_sets_repeat_draws_with_fresh_augmentation(tmp_path: Path) -> None:
    from pipeline.augment.stage import read_index
    from pipeline.augment.transforms import build_train_transform
    from pipeline.config import AugmentConfig
    from pipeline.train.data import AugmentedDataset, load_split, repeated_order

    aug = make_augment_dir(tmp_path, n=20)
    train = load_split(aug, read_index(aug), "train")
    n = len(train)
    order = repeated_order(lambda r: epoch_order(n, 0, 100 + r), n, 3)
    assert sorted(order) == list(range(3 * n))
    ds = AugmentedDataset(train, build_train_transform(AugmentConfig(preset="strong"), 2, 16), seed=0)
    (a, ya), (b, yb) = ds[1], ds[1 + n]
    assert ya == yb and not torch.equal(a, b)
    cfg = load_config(
        write_train_config(tmp_path, strategy="finetune", epochs=1, batch_size=8, min_steps_per_epoch=6)
    )
    summary = run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    assert summary["epochs_run"] == 1
    rows = (tmp_path / "out" / "history.csv").read_text().splitlines()
    assert len(rows) == 2


def test_flip_tta_averages_every_mirror_combination_and_is_reloaded(tmp_path: Path) -> None:
    from pipeline.trained.nets import FlipTTA, tta_axes, with_tta, without_tta

    assert tta_axes("flip", 2) == (3,) and tta_axes("flip_all", 3) == (2, 3, 4) and tta_axes("none", 3) == ()
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 4, 2))
    x = torch.randn(5, 1, 2, 3, 4)
    tta = with_tta(net, "flip_all", 3)
    assert isinstance(tta, FlipTTA) and len(tta.combos) == 8 and without_tta(tta) is net
    flips = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with torch.no_grad():
        want = torch.stack([torch.softmax(net(x.flip(c) if c else x), 1) for c in flips]).mean(0)
        torch.testing.assert_close(torch.softmax(tta(x), 1), want)
        # a mirrored input gives the same TTA output (the set of mirrors is the same)
        torch.testing.assert_close(tta(x.flip(3)), tta(x), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(net(x.flip(3)), net(x))
    assert with_tta(net, "none", 3) is net
    # trained with tta: flip, the saved model comes back wrapped, and model.pt holds the plain network
    aug = make_augment_dir(tmp_path, n=32)
    cfg = load_config(write_train_config(tmp_path, strategy="linear_probe", tta="flip"))
    run_finetune(cfg, aug, tmp_path / "out", tmp_path / "work", progress=False)
    trained = TrainedModel.load(tmp_path / "out")
    model, info = trained.network, trained.info
    assert info["tta"] == "flip" and isinstance(model, FlipTTA) and model.combos == [(), (3,)]
    sd = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert not any(k.startswith("model.") for k in sd)
