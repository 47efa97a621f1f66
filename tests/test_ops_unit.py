"""Fast unit tests of the run lock and the champion/challenger rule (no training)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import PromotionPolicy
from pipeline.ops.lock import LockHeld, RunLock, read_holder
from pipeline.ops.promotion import compare, first_model_check, holdout_mask


def test_lock_names_live_holder_and_is_removed_on_release(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; sys.path.insert(0, '.');"
         "from pipeline.ops.lock import RunLock;"
         f"l = RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and "since" in msg and "user" in msg
    finally:
        holder.kill()
        holder.wait()
    # the killed holder left its lock file behind: it is stale and recovered
    lock_file = tmp_path / "ops" / "run.lock"
    assert read_holder(lock_file)["pid"] == holder.pid
    lock = RunLock(tmp_path).acquire()
    assert lock.recovered["pid"] == holder.pid
    assert read_holder(lock_file)["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()


def test_stale_lock_from_dead_pid_is_recovered(tmp_path: Path) -> None:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "run.lock").write_text(json.dumps({"pid": p.pid, "host": "x", "since": "2020-01-01"}))
    with RunLock(tmp_path) as lock:
        assert lock.recovered["pid"] == p.pid


def _scores(rng: np.random.Generator, y: np.ndarray, signal: float) -> np.ndarray:
    s = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, len(y)))))
    return np.column_stack([1 - s, s])


def test_random_challenger_never_promoted_and_identical_one_is() -> None:
    policy = PromotionPolicy(n_bootstrap=300)
    for seed in range(30):
        rng = np.random.default_rng(seed)
        y = (rng.random(80) < 0.4).astype(int)
        champ = _scores(rng, y, 2.0)
        shuffled = _scores(rng, rng.permutation(y), 2.0)  # trained on shuffled labels: no signal for y
        for method in ("delong", "bootstrap"):
            res = compare(y, champ, shuffled, np.arange(80).astype(str), policy.model_copy(update={"method": method}), 1, seed)
            assert not res["promote"], (seed, method, res)
        same = compare(y, champ, champ.copy(), np.arange(80).astype(str), policy, 1, seed)
        assert same["promote"] and same["auroc_difference"] == 0


def test_worse_calibration_blocks_promotion() -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(2, 3, 400)  # a perfectly calibrated champion: y ~ Bernoulli(p)
    y = (rng.random(400) < p).astype(int)
    logit = np.log(p / (1 - p))
    sharp = 1 / (1 + np.exp(-8 * logit))  # same ranking, overconfident
    champ, over = np.column_stack([1 - p, p]), np.column_stack([1 - sharp, sharp])
    res = compare(y, champ, over, np.arange(400).astype(str), PromotionPolicy(), 1)
    assert abs(res["auroc_difference"]) < 1e-9 and not res["promote"]
    assert any("Brier" in r for r in res["reasons"])


def test_first_model_needs_auroc_above_floor() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(100) < 0.5).astype(int)
    pats = np.arange(100).astype(str)
    assert first_model_check(y, _scores(rng, y, 2.0), pats, PromotionPolicy(), 1)["promote"]
    assert not first_model_check(y, _scores(rng, rng.permutation(y), 2.0), pats, PromotionPolicy(), 1)["promote"]


def test_holdout_is_stable_and_keyed() -> None:
    pats = np.array([f"P{i:04d}" for i in range(400)])
    m1 = holdout_mask(pats, b"k" * 32, 0.5)
    m2 = holdout_mask(np.concatenate([pats, ["Pnew1", "Pnew2"]]), b"k" * 32, 0.5)
    assert np.array_equal(m1, m2[:400]) and 0.4 < m1.mean() < 0.6
    assert not np.array_equal(m1, holdout_mask(pats, b"j" * 32, 0.5))


def test_clustered_patients_use_the_cluster_bootstrap_not_delong() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.4).astype(int)
    champ, chall = _scores(rng, y, 2.0), _scores(rng, y, 2.0)
    single = compare(y, champ, chall, np.arange(120).astype(str), PromotionPolicy(n_bootstrap=200), 1)
    assert single["method"] == "delong" and "method_note" not in single
    patients = np.array([f"p{i // 3}" for i in range(120)])  # three cases per patient
    res = compare(y, champ, chall, patients, PromotionPolicy(n_bootstrap=200), 1)
    assert res["method"] == "bootstrap" and "cluster" in res["method_note"] and res["p_value"] is None


def test_promotion_compares_on_the_cases_both_models_could_score() -> None:
    """A case one model could not score (its cached volume lost) is left out of both, never a crash."""
    from pipeline.ops.promotion import Scored, _common_cases

    def scored(cases: list[str], seed: int) -> Scored:
        rng = np.random.default_rng(seed)
        p = rng.dirichlet([1, 1], len(cases))
        y = np.array([int(c[1:]) % 2 for c in cases])
        return Scored(
            raw={"test": p}, calibrated={"test": p}, logits={"test": np.log(p)}, y={"test": y},
            patients={"test": np.array(cases)}, cases={"test": np.array(cases)}, calibrator={},
        )

    a = scored([f"c{i}" for i in range(10)], 0)
    b = scored([f"c{i}" for i in range(10) if i != 3][::-1], 1)  # one lost, another order
    a2, b2 = _common_cases(a, b)
    assert a2.cases["test"].tolist() == b2.cases["test"].tolist() and "c3" not in a2.cases["test"]
    assert len(a2.y["test"]) == 9 and np.array_equal(a2.y["test"], b2.y["test"])


def test_gc_removes_an_unreferenced_volume_with_its_private_recipe(tmp_path: Path) -> None:
    from pipeline.config import RetentionPolicy
    from pipeline.ops.gc import plan_gc

    vols = tmp_path / "cache" / "volumes"
    vols.mkdir(parents=True)
    (tmp_path / "private" / "cache").mkdir(parents=True)
    for stem in ("old", "fresh"):
        (vols / f"{stem}.npy").write_bytes(b"x")
        (vols / f"{stem}.json").write_text("{}")
        (tmp_path / "private" / "cache" / f"{stem}.json").write_text("{}")
    past = time.time() - 400 * 86400
    for f in ("old.npy", "old.json"):
        os.utime(vols / f, (past, past))
    plan = plan_gc(tmp_path, RetentionPolicy())
    assert set(plan["remove"]) == {"cache/volumes/old.npy", "cache/volumes/old.json", "private/cache/old.json"}
