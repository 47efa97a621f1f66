"""Issue 15.7: retry only what can pass by itself, in every worker mode; one-line coded messages.

Each failing task is a small Luigi task (or a StageTask on a planned tiny workspace) run through
:func:`tasks.run.build_with_retries`, the loop ``medtl run`` uses, with 2 retries and a fake sleep. Before the
fix a deterministic non-medtl error (a NaN volume's ValueError) ran three times, and so did a MedtlError
with workers > 1.
"""

from __future__ import annotations

import errno
import pickle
import sqlite3
from pathlib import Path

import luigi
import pytest
from luigi.rpc import RPCError

from pipeline.errors import IngestError
from tasks.base import FAILURES, StageTask, TaskFailure, clear_plan_cache, config_and_plan
from tasks.cli import failure_line
from tasks.run import build_with_retries
from tests.conftest import make_dataset, write_config

KWARGS = {"local_scheduler": True, "log_level": "CRITICAL"}


def _count(folder: Path) -> int:
    return len(list(folder.glob("run-*")))


class Flaky(luigi.Task):
    """Raises ``kind`` on its first ``fail_times`` runs (counted by files, so forked workers count too)."""

    folder = luigi.Parameter()
    kind = luigi.Parameter()
    fail_times = luigi.IntParameter(default=99)

    def output(self):
        return luigi.LocalTarget(str(Path(self.folder) / "done"))

    def run(self):
        n = _count(Path(self.folder))
        (Path(self.folder) / f"run-{n}").write_text("")
        if n < self.fail_times:
            raise _exception(self.kind)
        Path(self.output().path).write_text("ok")


def _exception(kind: str) -> BaseException:
    return {
        "nan_volume": ValueError("array must not contain infs or NaNs"),
        "medtl": IngestError("Ingest: 3 file(s) truncated", code="truncated"),
        "busy": BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
        "sqlite_locked": sqlite3.OperationalError("database is locked"),
        "unpickling": pickle.UnpicklingError(
            "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will "
            "likely succeed, but it can result in arbitrary code execution."
        ),
    }[kind]


def _build(tmp_path: Path, kind: str, workers: int, fail_times: int = 99):
    sleeps: list[float] = []
    FAILURES.clear()
    task = Flaky(folder=str(tmp_path), kind=kind, fail_times=fail_times)
    result, attempts = build_with_retries([task], {**KWARGS, "workers": workers}, 2, 1.0, sleeps.append)
    return result, attempts, sleeps, list(FAILURES)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind, code", [("nan_volume", "internal_error"), ("medtl", "truncated")])
def test_deterministic_failures_run_once(tmp_path: Path, workers: int, kind: str, code: str) -> None:
    result, attempts, sleeps, failures = _build(tmp_path, kind, workers)
    assert attempts == 1 and _count(tmp_path) == 1 and sleeps == []
    assert result.status.name == "FAILED"
    [(family, err)] = failures
    assert family == "Flaky" and err.code == code
    line = failure_line(family, err)
    assert "\n" not in line and f"code {code}" in line
    if kind == "nan_volume":  # the exception's own text may quote inputs: only its type is told
        assert "NaN" not in line and "ValueError" in line and "not retried" in line


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["busy", "sqlite_locked"])
def test_a_busy_file_is_retried_and_passes(tmp_path: Path, workers: int, kind: str) -> None:
    result, attempts, sleeps, failures = _build(tmp_path, kind, workers, fail_times=1)
    assert attempts == 2 and _count(tmp_path) == 2 and sleeps == [1.0]
    assert result.status.name in ("SUCCESS", "SUCCESS_WITH_RETRY") and failures == []


def test_a_busy_file_that_stays_busy_stops_after_the_retries(tmp_path: Path) -> None:
    result, attempts, sleeps, failures = _build(tmp_path, "busy", 1)
    assert attempts == 3 and sleeps == [1.0, 2.0] and result.status.name == "FAILED"
    [(_, err)] = failures
    assert isinstance(err, TaskFailure) and err.transient and err.code == "busy_file"


def test_lost_scheduler_connection_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = luigi.build
    calls = []

    def build(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RPCError("Errors (3 attempts) when connecting to remote scheduler 'http://luigid:8082'")
        return real_build(*args, **kwargs)

    monkeypatch.setattr(luigi, "build", build)
    result, attempts, sleeps, failures = _build(tmp_path, "busy", 1, fail_times=0)
    assert attempts == 2 and sleeps == [1.0] and failures == []
    assert result.status.name == "SUCCESS"


def test_scheduler_never_reachable_is_told_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(*args, **kwargs):
        raise RPCError("Errors (3 attempts) when connecting to remote scheduler 'http://luigid:8082'")

    monkeypatch.setattr(luigi, "build", build)
    result, attempts, sleeps, failures = _build(tmp_path, "busy", 1)
    assert result is None and attempts == 3
    [(family, err)] = failures
    assert err.code == "scheduler_unreachable" and "luigid" not in failure_line(family, err)


def test_unpickling_error_never_suggests_weights_only_false(tmp_path: Path) -> None:
    _, attempts, _, failures = _build(tmp_path, "unpickling", 2)
    [(family, err)] = failures
    line = failure_line(family, err)
    assert attempts == 1 and err.code == "unsafe_checkpoint"
    assert "weights_only=False" not in line and "False" not in line and "weights_only=True" in line


# ------------------------------------------------------------------- failures of a stage on a real plan
@pytest.fixture
def planned(tmp_path: Path):
    make_dataset(tmp_path, n_patients=8)
    config = write_config(tmp_path, model={"pretrained": False})
    clear_plan_cache()
    cfg, plan = config_and_plan(str(config))
    yield str(config), plan
    clear_plan_cache()


def _stage_task(stage_name: str, exc: BaseException):
    class Failing(StageTask):
        stage = stage_name

        def run(self):
            raise exc

    Failing.__name__ = f"Failing{stage_name.title()}"
    return Failing


def _run_stage(config: str, stage: str, exc: BaseException, workers: int = 1):
    FAILURES.clear()
    task = _stage_task(stage, exc)(config=config)
    result, attempts = build_with_retries([task], {**KWARGS, "workers": workers}, 2, 1.0, lambda s: None)
    [(family, err)] = list(FAILURES)
    return attempts, failure_line(family, err), err


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_names_the_folder_and_how_much_is_needed(planned, workers: int) -> None:
    config, plan = planned
    earlier = plan.finetune.parent / "0123456789ab"
    earlier.mkdir(parents=True)
    (earlier / "model.pt").write_bytes(b"\0" * 3_000_000)
    full = OSError(errno.ENOSPC, "No space left on device")
    attempts, line, err = _run_stage(config, "finetune", full, workers)
    assert attempts == 1 and err.code == "disk_full" and "\n" not in line
    assert str(plan.finetune.parent) in line and "MB free" in line
    assert "about 3 MB needed" in line and "medtl gc" in line


def test_promised_summary_that_was_never_written_is_said_so(planned) -> None:
    config, plan = planned
    promise = IngestError(
        "Ingest: no case could be ingested from 3 input(s) under data.source (0 usable label row(s)). "
        "Reasons: truncated x3. See the ingestion summary in the workspace's private/ folder.",
        code="nothing_ingested",
    )
    attempts, line, err = _run_stage(config, "ingest", promise)
    assert attempts == 1 and err.code == "nothing_ingested" and isinstance(err, IngestError)
    assert "See the ingestion summary" not in line and "was not written" in line and "medtl convert" in line
    assert "truncated x3" in line and "\n" not in line
    # When the file exists, the message is left as raised.
    summary = plan.private / "ingest" / plan.ingest.name / "files.json"
    summary.parent.mkdir(parents=True)
    summary.write_text("{}")
    _, line, _ = _run_stage(config, "ingest", promise)
    assert "See the ingestion summary" in line
