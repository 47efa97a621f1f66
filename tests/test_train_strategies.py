"""Strategies: linear probe in the head, partial/gradual trainable sets, auto selection, BN re-estimation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_config
from pipeline.train.loop import run_finetune
from pipeline.train.strategies import (
    CHEAPEST_FIRST,
    pick_candidate,
    probe_head_weights,
    reestimate_bn,
    setup_trainable,
)
from pipeline.train.validation import val_score
from pipeline.trained.artefact import TrainedModel
from pipeline.trained.scorer import predict_logits
from tests.test_train_helpers import make_augment_dir, write_train_config


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path, make_augment_dir(tmp_path, n=48)


def _val(aug: Path):
    from pipeline.augment.stage import read_index
    from pipeline.train.data import load_split

    return load_split(aug, read_index(aug), "val")


@pytest.mark.parametrize("k", [2, 4])
def test_probe_head_reproduces_sklearn_probabilities(rng: np.random.Generator, k: int) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    f = rng.normal(size=(120, 7)) * rng.uniform(0.5, 5, 7) + rng.normal(size=7)
    y = rng.integers(0, k, 120)
    f[:, 0] += y
    sc = StandardScaler().fit(f)
    clf = LogisticRegression(C=0.5, max_iter=2000).fit(sc.transform(f), y)
    w, b = probe_head_weights(clf, sc.mean_, sc.scale_, k)
    p_head = torch.softmax(torch.from_numpy(f @ w.T + b), 1).numpy()
    np.testing.assert_allclose(p_head, clf.predict_proba(sc.transform(f)), atol=1e-9)


def test_linear_probe_model_pt_gives_the_probe_scores(project) -> None:
    root, aug = project
    cfg = load_config(write_train_config(root, strategy="linear_probe"))
    initial = {k: v.clone() for k, v in _fresh_state(cfg).items()}
    summary = run_finetune(cfg, aug, root / "out", root / "work", progress=False)
    assert summary["strategy"] == "linear_probe" and summary["probe"]["C"] in cfg.train.probe_c
    model = TrainedModel.load(root / "out").network
    val = _val(aug)
    probs = torch.softmax(torch.from_numpy(predict_logits(model, val.x, torch.device("cpu"))), 1).numpy()
    assert val_score(val.y, probs, cfg.task.positive_index) == pytest.approx(
        summary["best_val_auroc"], abs=1e-9
    )
    # the backbone is untouched: only the classifier changed
    sd = model.state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], initial[k])}
    assert changed == {"classifier.weight", "classifier.bias"}


def _fresh_state(cfg) -> dict[str, torch.Tensor]:
    from pipeline.train.network import build_model

    return build_model(cfg, 2, seed=cfg.train.seed).state_dict()


def test_partial_trains_only_the_last_groups(project) -> None:
    from models import param_groups

    root, aug = project
    cfg = load_config(write_train_config(root, strategy="partial", trainable_groups=2, epochs=1))
    from pipeline.train.network import build_model

    ref = build_model(cfg, 2, seed=0)
    run_finetune(cfg, aug, root / "out", root / "work", progress=False)
    model = TrainedModel.load(root / "out").network
    groups_ref, groups_new = param_groups(ref), param_groups(model)
    for i, (a, b) in enumerate(zip(groups_ref, groups_new, strict=True)):
        same = all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
        assert same == (i < len(groups_ref) - 2), f"group {i}"
    # frozen BatchNorm layers kept their pretrained running statistics
    bn_ref = [m for m in ref.modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn_new = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    assert torch.equal(bn_ref.running_mean, bn_new.running_mean)


def test_gradual_unfreezes_on_schedule(project) -> None:
    from models import param_groups

    root, aug = project
    cfg = load_config(write_train_config(root, strategy="gradual", unfreeze_milestones=[1, 2]))
    from pipeline.train.network import build_model

    model = build_model(cfg, 2, seed=0)
    schedule = setup_trainable(model, "gradual", cfg.train)
    n = len(param_groups(model))
    assert [schedule.n_trainable(e, n) for e in range(4)] == [1, 2, 3, 3]
    trainable = [all(p.requires_grad for p in g) for g in param_groups(model)]
    assert trainable == [False] * (n - 1) + [True]


def test_auto_records_every_candidate_and_picks_the_best(project) -> None:
    root, aug = project
    cfg = load_config(
        write_train_config(
            root, strategy="auto", auto_candidates=["finetune", "linear_probe"], auto_tolerance=0.0, epochs=2
        )
    )
    summary = run_finetune(cfg, aug, root / "out", root / "work", progress=False)
    sel = summary["strategy_selection"]
    names = [c["strategy"] for c in sel["candidates"]]
    assert names == ["linear_probe", "finetune"]  # cheapest first
    scores = {c["strategy"]: c["val_auroc"] for c in sel["candidates"]}
    assert sel["chosen"] == max(scores, key=scores.get) == summary["strategy"]
    assert summary["best_val_auroc"] == scores[sel["chosen"]]
    assert sel["chosen"] in sel["reason"]
    on_disk = json.loads((root / "out" / "train_summary.json").read_text())
    assert on_disk["strategy_selection"] == sel
    info = json.loads((root / "out" / "model_info.json").read_text())
    assert info["strategy"] == sel["chosen"]


def test_pick_candidate_prefers_cheaper_within_tolerance() -> None:
    chosen, reason = pick_candidate({"finetune": 0.90, "linear_probe": 0.897}, tolerance=0.005)
    assert chosen == "linear_probe" and "within auto_tolerance" in reason
    chosen, _ = pick_candidate({"finetune": 0.90, "linear_probe": 0.89}, tolerance=0.005)
    assert chosen == "finetune"
    chosen, _ = pick_candidate({"finetune": float("nan"), "partial": 0.6}, tolerance=0.0)
    assert chosen == "partial"
    assert list(CHEAPEST_FIRST)[0] == "linear_probe"


def test_bn_reestimate_matches_target_statistics(rng: np.random.Generator) -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    x = (rng.normal(5.0, 2.0, size=(50, 1, 4, 4))).astype(np.float32)
    n = reestimate_bn(net, x, torch.device("cpu"), batch_size=10)
    assert n == 1 and not net.training
    bn = net[1]
    np.testing.assert_allclose(bn.running_mean.numpy(), [x.mean()] * 3, rtol=1e-4)
    # cumulative average of per-batch unbiased variances ~ total variance for iid batches
    assert abs(float(bn.running_var[0]) - x.var()) < 0.3 * x.var()
    assert bn.momentum == 0.1  # restored


def test_scratch_differs_from_pretrained_start(project) -> None:
    root, aug = project
    cfg = load_config(write_train_config(root, strategy="scratch", epochs=1))
    summary = run_finetune(cfg, aug, root / "out", root / "work", progress=False)
    assert summary["pretrained"] is False and summary["weights"] is None


def test_probe_init_and_ema(project) -> None:
    root, aug = project
    cfg = load_config(write_train_config(root, strategy="finetune", epochs=2, probe_init=True, ema_decay=0.5))
    summary = run_finetune(cfg, aug, root / "out", root / "work", progress=False)
    assert summary["probe_init"]["C"] in cfg.train.probe_c and summary["ema_decay"] == 0.5
    # the saved weights are the EMA weights that were validated
    model = TrainedModel.load(root / "out").network
    val = _val(aug)
    probs = torch.softmax(torch.from_numpy(predict_logits(model, val.x, torch.device("cpu"))), 1).numpy()
    assert val_score(val.y, probs, cfg.task.positive_index) == pytest.approx(
        summary["best_val_auroc"], abs=1e-9
    )


def test_probe_head_does_not_blow_up_nearly_constant_features(rng: np.random.Generator) -> None:
    """A nearly dead feature (std 1e-5) must not get a huge folded weight (LP-FT starts from this head)."""
    from pipeline.config import TrainConfig
    from pipeline.train.strategies import fit_linear_probe

    class Feats(torch.nn.Module):  # the "backbone": its features are the input itself
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward_features(self, x):
            return x

        def forward_head(self, x, pre_logits=False):
            return x if pre_logits else self.fc(x)

        def forward(self, x):
            return self.fc(x)

        def get_classifier(self):
            return self.fc

    y = rng.integers(0, 2, 200)
    x = rng.normal(size=(200, 4))
    x[:, 0] += 1.5 * y
    x[:, 3] = 1e-5 * rng.normal(size=200)  # nearly dead channel
    m = Feats()
    tc = TrainConfig(probe_c=(10.0,))
    fit_linear_probe(m, x[:150], y[:150], x[150:], y[150:], tc, 2, 1, torch.device("cpu"))
    w = m.fc.weight.detach().abs()
    assert w[:, 3].max() < 10 * w[:, 0].max()
    # the head still reproduces a sensible probe on ordinary features
    with torch.no_grad():
        p = torch.softmax(m(torch.from_numpy(x[150:]).float()), 1)[:, 1].numpy()
    assert np.corrcoef(p, x[150:, 0])[0, 1] > 0.8


def test_mixup_blends_inputs_and_targets_alike() -> None:
    """The blended loss equals the loss on blended soft targets (weighted, summed CE is linear in them)."""
    from pipeline.train.epochs import mixup

    torch.manual_seed(3)
    x = torch.arange(24, dtype=torch.float32).reshape(6, 1, 2, 2)
    y = torch.tensor([0, 1, 1, 0, 2, 2])
    mixed, partner, lam = mixup(x, y, 0.4)
    assert 0.0 < lam < 1.0
    # each row is lam * itself + (1 - lam) * the row whose label is its partner's
    torch.manual_seed(3)
    lam2 = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert lam2 == lam and torch.equal(partner, y[perm])
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    logits = torch.randn(6, 3)
    w = torch.tensor([0.5, 1.0, 2.0])
    ce = nn.CrossEntropyLoss(weight=w, reduction="sum")
    blended = lam * ce(logits, y) + (1 - lam) * ce(logits, partner)
    soft = lam * nn.functional.one_hot(y, 3).float() + (1 - lam) * nn.functional.one_hot(partner, 3).float()
    torch.testing.assert_close(blended, ce(logits, soft))


def test_mixup_trains_and_leaves_old_digests_alone(project) -> None:
    import hashlib

    root, aug = project
    plain = load_config(write_train_config(root, strategy="finetune", epochs=1))
    # a field added later is hashed only when set: mixup_alpha 0 keeps the digest of configs without it
    dumped = plain.train.model_dump(mode="json")
    for f in ("device", "amp", "mixup_alpha"):
        dumped.pop(f)
    blob = json.dumps({"train": dumped}, sort_keys=True, separators=(",", ":")).encode()
    assert plain.hashed("train") == hashlib.sha256(blob).hexdigest()[:12]
    mixed = load_config(write_train_config(root, strategy="finetune", epochs=1, mixup_alpha=0.4))
    assert mixed.hashed("train") != plain.hashed("train")
    a = run_finetune(plain, aug, root / "out0", root / "work0", progress=False)
    b = run_finetune(mixed, aug, root / "out1", root / "work1", progress=False)
    assert a["mixup_alpha"] == 0.0 and b["mixup_alpha"] == 0.4
    wa = TrainedModel.load(root / "out0").network.state_dict()
    wb = TrainedModel.load(root / "out1").network.state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa if wa[k].is_floating_point())
