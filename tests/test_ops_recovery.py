"""Recovery trials: `medtl run` killed (SIGKILL) mid-ingest, -augment, -epoch, -report reruns to completion.

The run is a real ``python -m tasks.cli run CONFIG`` subprocess on the tiny synthetic DICOM dataset of
``tests/conftest.py``, in its own process group; each trial polls the workspace until the stage is in
progress (its temporary folder ``.<digest>.tmp-*``, or for FineTune the per-epoch checkpoint
``finetune/<digest>.work/last.pt``) and kills the whole group with SIGKILL (a power cut or an OOM kill of
the service's cgroup). The trials are chained: the rerun after one kill is the run that the next trial kills
at a later point, and a last rerun must finish. Between kills and at the end the test checks that nothing
Luigi takes as complete is partial, that the stale lock is taken over, that FineTune resumed from its last
checkpoint (each epoch in ``history.csv`` exactly once), and that no manual clean-up was needed.

Set ``MEDTL_RECOVERY_OUT=FILE`` to write the trial table as JSON (used for BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import make_dataset, write_config

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Files every published stage folder must hold (a folder Luigi takes as complete).
STAGE_FILES = {
    "ingest": ["manifest.csv", "ingest_report.json"],
    "augment": ["index.csv", "transform_spec.json", "preview.png"],
    "finetune": ["model.pt", "model_info.json", "history.csv", "train_summary.json"],
    "evaluate": ["metrics.json", "predictions.csv", "report.html", "report.pdf", "model_card.md"],
}
EPOCHS = 4


def _start(config: Path, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen(
        [sys.executable, "-m", "tasks.cli", "run", str(config)],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes every child with it
    )


def _tmp_dirs(ws: Path, stage: str) -> list[Path]:
    return [p for p in (ws / stage).glob(".*.tmp-*") if p.is_dir()] if (ws / stage).is_dir() else []


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _published(ws: Path, stage: str) -> list[Path]:
    d = ws / stage
    if not d.is_dir():
        return []
    return [
        p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".work")
    ]


def _check_published_complete(ws: Path) -> dict[str, int]:
    """Every stage folder Luigi would take as complete holds all its files, and they parse."""
    counts = {}
    for stage, files in STAGE_FILES.items():
        folders = _published(ws, stage)
        counts[stage] = len(folders)
        for folder in folders:
            for f in files:
                assert (folder / f).is_file() and (folder / f).stat().st_size > 0, (
                    f"{stage}/{folder.name} is published but {f} is missing or empty"
                )
            if stage == "ingest":
                json.loads((folder / "ingest_report.json").read_text())
                assert _csv_rows(folder / "manifest.csv")
            if stage == "augment":
                rows = _csv_rows(folder / "index.csv")
                assert rows and all((folder / "tensors" / f"{r['case_id']}.npy").is_file() for r in rows)
            if stage == "finetune":
                json.loads((folder / "train_summary.json").read_text())
            if stage == "evaluate":
                metrics = json.loads((folder / "metrics.json").read_text())
                assert "evaluation" in metrics and "headline" in metrics
                assert (folder / "report.pdf").read_bytes()[:5] == b"%PDF-"
                assert "</html>" in (folder / "report.html").read_text()
    return counts


def _wait_for(proc: subprocess.Popen, probe: Callable[[], bool], what: str, timeout: float = 600.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if probe():
            return time.monotonic() - t0
        if proc.poll() is not None:
            break
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"the run ended (rc {proc.returncode}) or timed out before reaching {what}")


def _kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # the group is gone (no orphaned decoder or loader process keeps the workspace lock)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes of the killed group {proc.pid} survive")


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_at_each_stage_then_rerun_completes(tmp_path: Path) -> None:
    make_dataset(tmp_path, n_patients=60)
    config = write_config(
        tmp_path,
        train={"strategy": "finetune", "epochs": EPOCHS, "patience": EPOCHS, "batch_size": 16, "lr": 0.003},
        ops={"retries": 0, "promotion": {"min_auroc": 0.0, "min_holdout_cases": 5}},
    )
    ws = tmp_path / "ws"
    work_history: dict[str, list] = {}

    def mid_epoch() -> bool:
        for last in (ws / "finetune").glob("*.work/last.pt") if (ws / "finetune").is_dir() else []:
            rows = _csv_rows(last.parent / "history.csv")
            if rows and _tmp_dirs(ws, "finetune"):
                time.sleep(0.5 * float(rows[0]["seconds"]))  # about half-way through the next epoch
                work_history["rows"] = _csv_rows(last.parent / "history.csv")
                return True
        return False

    def mid_report() -> bool:
        return any((d / "metrics.json").is_file() for d in _tmp_dirs(ws, "evaluate"))

    trials: list[tuple[str, str, Callable[[], bool]]] = [
        ("mid-ingest", "ingest/.<digest>.tmp-* exists", lambda: bool(_tmp_dirs(ws, "ingest"))),
        ("mid-augment", "augment/.<digest>.tmp-* exists", lambda: bool(_tmp_dirs(ws, "augment"))),
        ("mid-epoch", "finetune/<digest>.work/last.pt exists + half an epoch", mid_epoch),
        ("mid-report", "evaluate/.<digest>.tmp-*/metrics.json exists (report rendering)", mid_report),
    ]
    outcome: list[dict] = []
    previous_pid = None
    for i, (name, probe_text, probe) in enumerate(trials):
        log = tmp_path / f"attempt{i}.log"
        t0 = time.monotonic()
        proc = _start(config, log)
        waited = _wait_for(proc, probe, name)
        _kill(proc)
        text = log.read_text(errors="replace")
        if previous_pid is not None:  # this run took over the lock of the run killed before it
            assert "Recovered a stale workspace lock" in text and f"pid {previous_pid}" in text, text[-3000:]
        lock = json.loads((ws / "ops" / "run.lock").read_text())
        assert lock["pid"] == proc.pid  # the killed run's lock file stays behind (stale)
        stage = {
            "mid-ingest": "ingest",
            "mid-augment": "augment",
            "mid-epoch": "finetune",
            "mid-report": "evaluate",
        }[name]
        assert _tmp_dirs(ws, stage), f"{name}: no temporary folder left, so the kill missed the stage"
        assert not _published(ws, stage), f"{name}: the killed stage published a folder"
        counts = _check_published_complete(ws)
        outcome.append(
            {
                "kill_point": name,
                "detected_by": probe_text,
                "killed_after_s": round(waited, 1),
                "attempt_s": round(time.monotonic() - t0, 1),
                "published_before_kill": counts,
                "leftover_tmp": len(_tmp_dirs(ws, stage)),
            }
        )
        previous_pid = proc.pid

    epochs_at_kill = len(work_history["rows"])
    assert 1 <= epochs_at_kill < EPOCHS, epochs_at_kill

    log = tmp_path / "final.log"
    t0 = time.monotonic()
    final = _start(config, log)
    rc = final.wait(timeout=900)
    final_s = time.monotonic() - t0
    text = log.read_text(errors="replace")
    assert rc == 0, text[-4000:]
    assert "Recovered a stale workspace lock" in text and f"pid {previous_pid}" in text
    assert not (ws / "ops" / "run.lock").exists(), "the lock must be released at the end"

    counts = _check_published_complete(ws)
    assert counts == {"ingest": 1, "augment": 1, "finetune": 1, "evaluate": 1}, counts
    ft = _published(ws, "finetune")[0]
    summary = json.loads((ft / "train_summary.json").read_text())
    assert summary["resumed_after_epoch"] == epochs_at_kill  # from the last checkpoint, not from scratch
    epochs = [int(r["epoch"]) for r in _csv_rows(ft / "history.csv")]
    assert epochs == list(range(1, EPOCHS + 1)), epochs  # every epoch exactly once
    # the history of the epochs done before the kill is carried over unchanged
    for before, after in zip(work_history["rows"], _csv_rows(ft / "history.csv"), strict=False):
        assert before["train_loss"] == after["train_loss"] and before["val_auroc"] == after["val_auroc"]
    assert not (ws / "finetune" / f"{ft.name}.work").exists()  # work folder removed after publishing

    # The nightly record exists and points to the stage folders used; the model went through Promote.
    (record_file,) = (ws / "runs").glob("*.json")
    record = json.loads(record_file.read_text())
    for stage, rel in record["stages"].items():
        assert (ws / rel).is_dir() and not Path(rel).name.startswith("."), (stage, rel)
    # Promoted or not depends on this tiny model's quality (a first model needs an AUROC bound above
    # min_auroc on a handful of holdout cases); what matters here is that Promote ran and decided once.
    decided = record["promotion"]
    assert decided is not None and isinstance(decided["promoted"], bool)

    # Registry: the final run succeeded and recorded the recovered lock; the killed runs are not left
    # "running" forever (they are marked interrupted once the next run holds the lock).
    con = sqlite3.connect(ws / "ops" / "registry.sqlite")
    runs = con.execute("SELECT status, summary FROM runs ORDER BY id").fetchall()
    con.close()
    assert [s for s, _ in runs] == ["interrupted"] * len(trials) + ["success"], runs
    assert json.loads(runs[-1][1])["recovered_lock"]["pid"] == previous_pid
    models = con_models(ws)
    assert len(models) == 1 and models[0] == ("champion" if decided["promoted"] else "rejected")

    # Promote killed after the registry recorded its decision but before the decision file was written:
    # the rerun reuses the recorded decision (no second look at the locked holdout).
    from pipeline.config import load_config
    from pipeline.ops.nightly import register_and_decide
    from pipeline.ops.registry import Registry
    from pipeline.workspace import plan_stages

    reg = Registry(ws)
    n_decisions, uses = len(reg.decisions()), reg.holdout_uses()
    cfg = load_config(config)
    again = register_and_decide(cfg, plan_stages(cfg))
    assert again["promoted"] == decided["promoted"] and again["model_id"] == decided["model_id"]
    assert len(reg.decisions()) == n_decisions and reg.holdout_uses() == uses

    # A further rerun is a no-op; gc removes the leftover temporary folders.
    assert (
        subprocess.run(
            [sys.executable, "-m", "tasks.cli", "run", str(config)],
            cwd=str(REPO_ROOT),
            env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
            capture_output=True,
            timeout=300,
        ).returncode
        == 0
    )
    leftovers = sum(len(_tmp_dirs(ws, s)) for s in STAGE_FILES)
    assert leftovers >= len(trials)  # each killed stage left its temporary folder (ignored by the runs)
    gc = subprocess.run(
        [sys.executable, "-m", "tasks.cli", "gc", str(config)],
        cwd=str(REPO_ROOT),
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gc.returncode == 0, gc.stderr
    assert sum(len(_tmp_dirs(ws, s)) for s in STAGE_FILES) == 0
    _check_published_complete(ws)

    for row in outcome:
        row["rerun"] = "exit 0" if row is outcome[-1] else "passed the stage; killed at the next point"
    outcome.append(
        {
            "kill_point": "final rerun",
            "rc": rc,
            "seconds": round(final_s, 1),
            "resumed_after_epoch": epochs_at_kill,
            "epochs_in_history": epochs,
        }
    )
    print(json.dumps(outcome, indent=1))
    if os.environ.get("MEDTL_RECOVERY_OUT"):
        Path(os.environ["MEDTL_RECOVERY_OUT"]).write_text(json.dumps(outcome, indent=1))


def con_models(ws: Path) -> list[str]:
    con = sqlite3.connect(ws / "ops" / "registry.sqlite")
    try:
        return [s for (s,) in con.execute("SELECT status FROM models ORDER BY id")]
    finally:
        con.close()


_FORKING_HOLDER = """
import multiprocessing as mp, os, sys, time
sys.path.insert(0, '.')
from pipeline.ops.lock import RunLock

def sleeper():
    print(os.getpid(), flush=True)  # the child is running (past the fork hooks)
    time.sleep(120)  # an orphaned pool worker: never notices its parent died

if __name__ == '__main__':
    RunLock(sys.argv[1]).acquire()
    child = mp.get_context('fork').Process(target=sleeper)
    child.start()
    time.sleep(120)
"""


def test_lock_dies_with_its_process_not_with_forked_children(tmp_path: Path) -> None:
    """A run SIGKILLed while a forked worker of it lives on must not keep the workspace locked."""
    from pipeline.ops.lock import RunLock

    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKING_HOLDER, str(tmp_path)],
        cwd=str(REPO_ROOT),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        child = int(holder.stdout.readline())
        holder.kill()  # the main process only, as the OOM killer or `kill -9 PID` would
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child is still alive (orphaned) ...
        with RunLock(tmp_path) as lock:  # ... and yet the lock is recovered
            assert lock.recovered["pid"] == holder.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
