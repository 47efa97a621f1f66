"""The nightly chain against a real luigid on a loopback port with two workers; history read back."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_dataset, write_config

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_run_with_luigid_two_workers(tmp_path: Path) -> None:
    from pipeline.ops.registry import Registry

    luigid = Path(sys.executable).with_name("luigid")
    assert luigid.is_file(), f"luigid not found beside {sys.executable}"
    port = _free_port()
    state = tmp_path / "luigid"
    state.mkdir()
    proc = subprocess.Popen(
        [str(luigid), "--address", "127.0.0.1", "--port", str(port), "--state-path", str(state / "state.pickle"),
         "--logdir", str(state)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise AssertionError("luigid did not start")
        make_dataset(tmp_path)
        config = write_config(tmp_path, train={"strategy": "linear_probe", "epochs": 2, "batch_size": 16, "lr": 0.03},
                              ops={"promotion": {"min_holdout_cases": 5}, "retries": 0})
        # A fresh process, as `medtl run` is in production: Luigi forks one process per worker, and forking
        # a test process whose torch/onnxruntime thread pools are already running can deadlock.
        repo = Path(__file__).resolve().parents[1]
        proc_run = subprocess.run(
            [sys.executable, "-m", "tasks.cli", "run", str(config), "--workers", "2",
             "--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)],
            cwd=repo, capture_output=True, text=True, timeout=900,
        )
        rc = proc_run.returncode
        assert rc == 0, (proc_run.stderr[-3000:], Registry(tmp_path / "ws").task_events())
        reg = Registry(tmp_path / "ws")
        (run,) = reg.runs()
        assert run["status"] == "success"
        events = reg.task_events(run["id"])
        done = {e["task"] for e in events if e["event"] == "success"}
        assert {"Ingest", "Augment", "FineTune", "Evaluate", "Promote", "RunPipeline"} <= done
        assert all(e["event"] != "failure" for e in events)
        # the scheduler saw the tasks too
        import json
        import urllib.request
        from urllib.parse import quote

        query = quote(json.dumps({"status": "DONE", "upstream_status": "", "search": ""}))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/task_list?data={query}", timeout=5) as r:
            tasks = json.loads(r.read())["response"]
        assert {"FineTune", "Promote"} <= {t["name"] for t in tasks.values()}, tasks
    finally:
        proc.terminate()
        proc.wait(10)
