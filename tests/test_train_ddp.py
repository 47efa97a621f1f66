"""DistributedDataParallel through torchrun as a child process: two CPU processes on the gloo backend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.train.worker import launch_distributed, torchrun_command
from pipeline.trained.artefact import TrainedModel
from tests.test_train_helpers import make_augment_dir, write_train_config

pytestmark = pytest.mark.slow


def test_two_gloo_processes_train_and_write_one_model(tmp_path: Path) -> None:
    aug = make_augment_dir(tmp_path, n=48)
    cfg = load_config(write_train_config(tmp_path, strategy="finetune", epochs=2, batch_size=8, devices=2))
    out, work = tmp_path / "out", tmp_path / "work"
    summary = launch_distributed(cfg, aug, out, work, timeout=300)
    assert summary["processes"] == 2
    assert summary["epochs_run"] == 2
    model = TrainedModel.load(out).network
    x = torch.randn(3, 1, 16, 16)
    assert model(x).shape == (3, 2)
    # rank 0 alone wrote the outputs; the summary on disk is the one returned
    assert json.loads((out / "train_summary.json").read_text()) == summary


def test_torchrun_command_runs_the_worker_module(tmp_path: Path) -> None:
    cmd = torchrun_command(tmp_path / "job.json", 3)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=3" in cmd and cmd[-3:] == [
        "pipeline.train.worker",
        "--job",
        str(tmp_path / "job.json"),
    ]


def test_failed_torchrun_raises_with_its_output(tmp_path: Path) -> None:
    from pipeline.errors import MedtlError

    aug = make_augment_dir(tmp_path, n=48)
    cfg = load_config(write_train_config(tmp_path, strategy="finetune", epochs=1, devices=2))
    (aug / "index.csv").write_text("case_id,patient_id,split,label_index\n")  # no cases: training must fail
    with pytest.raises(MedtlError, match="torchrun with 2 process"):
        launch_distributed(cfg, aug, tmp_path / "out", tmp_path / "work", timeout=300)


def test_finetune_task_launches_torchrun_only_for_several_devices(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    import tasks.finetune as ft

    calls = []
    monkeypatch.setattr(ft, "launch_distributed", lambda *a, **k: calls.append(("ddp", a[-1])))
    monkeypatch.setattr(ft, "run_finetune", lambda *a, **k: calls.append(("local", None)))
    plan = SimpleNamespace(
        finetune=tmp_path / "finetune" / "abc", augment=tmp_path / "augment", weights_path=None, weights_sha256="none"
    )
    task = ft.FineTune(config=str(tmp_path / "unused.yaml"))
    for devices in (1, 3):
        cfg = load_config(write_train_config(tmp_path, devices=devices))
        task.build(cfg, plan, tmp_path / "tmp")
    assert calls == [("local", None), ("ddp", 3)]
