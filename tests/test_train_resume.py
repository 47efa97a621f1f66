"""A training subprocess SIGKILLed mid-epoch resumes and ends with an uninterrupted run's weights."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.worker import REPO_ROOT, write_job
from tests.test_train_helpers import make_augment_dir, write_train_config

pytestmark = pytest.mark.slow


def _worker(job: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.train.worker", "--job", str(job)],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _epochs_done(history: Path) -> list[dict[str, str]]:
    if not history.exists():
        return []
    with open(history, newline="") as fh:
        return list(csv.DictReader(fh))


def test_sigkill_mid_epoch_then_resume_gives_identical_weights(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=120, size=24)
    # dropout, augmentation, mixup draws, cosine schedule, AdamW and EMA state all have to replay exactly
    cfg = load_config(
        write_train_config(
            tmp_path, strategy="finetune", epochs=4, batch_size=4, size=24, ema_decay=0.9, mixup_alpha=0.4
        )
    )

    ref = _worker(write_job(cfg, aug, tmp_path / "ref_out", tmp_path / "ref_work"))
    assert ref.wait(timeout=400) == 0, ref.stderr.read()[-2000:]

    job = write_job(cfg, aug, tmp_path / "out", tmp_path / "work")
    proc = _worker(job)
    history = tmp_path / "work" / "history.csv"
    deadline = time.monotonic() + 400
    while not _epochs_done(history) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    done = _epochs_done(history)
    assert done and proc.poll() is None, "the first epoch did not finish while the worker ran"
    time.sleep(0.5 * float(done[0]["seconds"]))  # about half-way through the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_after = len(_epochs_done(history))
    assert 1 <= killed_after < cfg.train.epochs
    assert not (tmp_path / "out" / "model.pt").exists()

    resumed = _worker(job)
    assert resumed.wait(timeout=400) == 0, resumed.stderr.read()[-2000:]
    import json

    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["resumed_after_epoch"] == killed_after
    a = torch.load(tmp_path / "ref_out" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last_ref = torch.load(tmp_path / "ref_work" / "last.pt", weights_only=True)
    last = torch.load(tmp_path / "work" / "last.pt", weights_only=True)
    for k in last_ref["model"]:
        assert torch.equal(last_ref["model"][k], last["model"][k]), k
