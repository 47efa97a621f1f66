"""Training in a child process: the ``torchrun`` entry point for DistributedDataParallel, and its launcher.

The FineTune task never runs DDP inside the Luigi worker: with ``train.devices > 1`` it calls
:func:`launch_distributed`, which writes a job file and runs::

    python -m torch.distributed.run --standalone --nproc_per_node N -m pipeline.train.worker --job JOB.json

Each process joins the group (NCCL on CUDA, gloo on CPU), calls :func:`pipeline.train.loop.run_finetune`
(which shards every batch over the ranks and lets rank 0 write), and leaves. Without torchrun the same
module trains in a single plain subprocess (used by the kill-and-resume test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.errors import MedtlError
from pipeline.io import write_json

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_job(cfg: Config, augment_dir: Path, out_dir: Path, work_dir: Path) -> Path:
    """Write ``work_dir/job.json``: the validated config and the stage folders (absolute paths)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job = work_dir / "job.json"
    write_json(
        job,
        {
            "config": cfg.model_dump(mode="json"),
            "augment_dir": str(Path(augment_dir).resolve()),
            "out_dir": str(Path(out_dir).resolve()),
            "work_dir": str(Path(work_dir).resolve()),
        },
    )
    return job


def torchrun_command(job: Path, nproc: int) -> list[str]:
    """The ``torchrun`` command line (as ``python -m torch.distributed.run``, same interpreter)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "pipeline.train.worker",
        "--job",
        str(job),
    ]


def launch_distributed(
    cfg: Config,
    augment_dir: Path,
    out_dir: Path,
    work_dir: Path,
    nproc: int | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Train with ``nproc`` (default ``train.devices``) DDP processes under torchrun; wait for them.

    Args:
        cfg: The run config.
        augment_dir: The Augment stage folder.
        out_dir: Receives ``model.pt`` and the other artefacts (written by rank 0).
        work_dir: Checkpoints (a relaunch resumes from them) and the job file.
        nproc: Processes; default ``cfg.train.devices``.
        timeout: Seconds before the child is killed (None: no limit).

    Returns:
        The training summary written by rank 0.

    Raises:
        MedtlError: torchrun failed; the message carries the end of its output.
    """
    nproc = nproc or cfg.train.devices
    job = write_job(cfg, augment_dir, out_dir, work_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if cfg.runtime.threads:
        env["OMP_NUM_THREADS"] = str(cfg.runtime.threads)
    proc = subprocess.run(
        torchrun_command(job, nproc),
        cwd=str(REPO_ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise MedtlError(
            f"FineTune: torchrun with {nproc} process(es) failed (exit {proc.returncode}):\n{tail}"
        )
    return json.loads((Path(out_dir) / "train_summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python -m pipeline.train.worker --job JOB.json`` (under torchrun or alone)."""
    ap = argparse.ArgumentParser(description="medtl training worker (torchrun entry point)")
    ap.add_argument("--job", required=True, type=Path)
    args = ap.parse_args(argv)
    job = json.loads(args.job.read_text())
    cfg = Config.model_validate(job["config"])

    import logging

    import torch
    import torch.distributed as dist

    from pipeline.train.loop import run_finetune
    from pipeline.trained.device import select_device

    logging.basicConfig(level=logging.INFO, format="%(asctime)s rank%(process)d %(levelname)s %(message)s")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        use_cuda = select_device(cfg.train.device).type == "cuda"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        run_finetune(
            cfg, Path(job["augment_dir"]), Path(job["out_dir"]), Path(job["work_dir"]), progress=False
        )
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
