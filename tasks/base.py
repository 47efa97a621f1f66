"""Shared Luigi wiring: one ``config`` parameter, an output folder named by the stage digest, atomic runs.

Tasks stay thin: ``run()`` publishes a temporary folder filled by a ``pipeline`` function. A task's
``complete()`` is Luigi's default (its output folder exists); because the folder appears only through an
atomic rename, a killed run never leaves an output Luigi would take as complete.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar

import luigi

from pipeline.config import Config, load_config
from pipeline.errors import MedtlError
from pipeline.io import atomic_dir
from pipeline.workspace import StagePlan, data_snapshot, gather_plan_inputs, plan_stages, record_plan_choices

_CACHE: dict[tuple[str, int], tuple[Config, StagePlan]] = {}
_CONFIGS: dict[tuple[str, int], Config] = {}
_SNAPSHOTS: dict[tuple[str, int], str] = {}


class _Failures(list):
    """``(task family, MedtlError)`` of the tasks that failed, for the CLI's one-line message and the run
    summary.

    With several workers Luigi runs each task in a forked child process, and ``on_failure`` runs there: a
    plain list in the child never reaches the parent. So a child pickles its entry into a private folder
    made when this module is imported (before any fork), and the parent's list takes the entries in
    whenever it is read. A MedtlError pickles with its ``code`` and every attribute (models/errors.py), so
    the parent sees the same error. Only files this process's own children wrote are read (a 0700 folder).
    """

    def __init__(self) -> None:
        super().__init__()
        self._owner = os.getpid()
        self._dir = Path(tempfile.mkdtemp(prefix="medtl-failures-"))
        atexit.register(self._cleanup)

    def _cleanup(self) -> None:
        if os.getpid() == self._owner:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _take_in(self) -> None:
        if os.getpid() != self._owner or not self._dir.is_dir():
            return
        for path in sorted(self._dir.glob("*.pkl")):
            try:
                entry = pickle.loads(path.read_bytes())
            except Exception:  # noqa: BLE001 - a half-written entry of a killed child: nothing to report
                continue
            finally:
                path.unlink(missing_ok=True)
            super().append(entry)

    def append(self, entry: Any) -> None:
        if os.getpid() == self._owner:
            super().append(entry)
            return
        family, err = entry
        try:
            blob = pickle.dumps((family, err))
        except Exception:  # noqa: BLE001 - an attribute that does not pickle: keep message and code
            blob = pickle.dumps((family, MedtlError(str(err), code=getattr(err, "code", None))))
        name = f"{time.time_ns()}-{os.getpid()}"
        tmp = self._dir / f".{name}.tmp"
        tmp.write_bytes(blob)
        tmp.rename(self._dir / f"{name}.pkl")  # atomic: the parent never reads half an entry

    def __iter__(self):
        self._take_in()
        return super().__iter__()

    def __len__(self) -> int:
        self._take_in()
        return super().__len__()

    def __bool__(self) -> bool:
        return len(self) > 0

    def __getitem__(self, index):
        self._take_in()
        return super().__getitem__(index)

    def clear(self) -> None:
        self._take_in()
        super().clear()


#: MedtlErrors raised by tasks of this run (in this process or in Luigi's worker processes).
FAILURES: list[tuple[str, MedtlError]] = _Failures()


def clear_plan_cache() -> None:
    """Forget cached plans, so the next planning sees the data (and registry) as they are now."""
    _CACHE.clear()
    _CONFIGS.clear()
    _SNAPSHOTS.clear()


def _key(path: str) -> tuple[str, int]:
    return os.path.abspath(path), os.stat(path).st_mtime_ns


def config_of(path: str) -> Config:
    """The validated config (loaded once per file version)."""
    key = _key(path)
    if key not in _CONFIGS:
        _CONFIGS[key] = load_config(path)
    return _CONFIGS[key]


def config_and_snapshot(path: str) -> tuple[Config, str]:
    """The config and the data snapshot only: stat calls and the config hash, no model registry (no torch).

    Enough to name tonight's run record, so a night with nothing new decides so without planning.
    """
    key = _key(path)
    if key in _CACHE:
        cfg, plan = _CACHE[key]
        return cfg, plan.snapshot
    cfg = config_of(path)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = data_snapshot(Path(cfg.data.source), Path(cfg.data.labels_csv))
    return cfg, _SNAPSHOTS[key]


def config_and_plan(path: str) -> tuple[Config, StagePlan]:
    """Load (once per file version) the config and its stage plan.

    Planning itself is pure (:func:`pipeline.workspace.plan_stages`); its side effects happen here, in the
    caller: a new workspace's key is created, and the plan's choices (warm-start source, weight digests)
    are recorded. ``medtl run`` gets here under the workspace lock (:func:`tasks.run.nightly_build`).
    """
    key = _key(path)
    if key not in _CACHE:
        cfg = config_of(path)
        inputs = gather_plan_inputs(cfg, create=True)
        plan = plan_stages(cfg, inputs)
        record_plan_choices(plan, inputs)
        _CACHE[key] = (cfg, plan)
    return _CACHE[key]


class StageTask(luigi.Task):
    """Base class: subclasses set ``stage`` and implement ``build(cfg, plan, tmp_dir)``."""

    config = luigi.Parameter(description="Path to the run's YAML config")
    stage: ClassVar[str] = ""
    retry_count = 0

    @property
    def cfg(self) -> Config:
        return config_and_plan(self.config)[0]

    @property
    def plan(self) -> StagePlan:
        return config_and_plan(self.config)[1]

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(getattr(self.plan, self.stage)))

    def run(self) -> None:
        with atomic_dir(self.output().path) as tmp:
            self.build(self.cfg, self.plan, Path(tmp))

    def build(self, cfg: Config, plan: StagePlan, tmp: Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_failure(self, exception: BaseException) -> str:
        if isinstance(exception, MedtlError):
            FAILURES.append((self.task_family, exception))
            return f"{self.task_family} failed: {exception}"
        return super().on_failure(exception)


class _HideMedtlTracebacks(logging.Filter):
    """Luigi logs every task failure with a traceback; for medtl's own errors, the message is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], MedtlError):
            record.msg = f"{record.getMessage()}: {record.exc_info[1]}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_filter() -> None:
    for name in ("luigi-interface", "luigi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _HideMedtlTracebacks) for f in logger.filters):
            logger.addFilter(_HideMedtlTracebacks())
