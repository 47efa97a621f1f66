"""Shared Luigi wiring: one ``config`` parameter, an output folder named by the stage digest, atomic runs.

Tasks stay thin: ``run()`` publishes a temporary folder filled by a ``pipeline`` function. A task's
``complete()`` is Luigi's default (its output folder exists); because the folder appears only through an
atomic rename, a killed run never leaves an output Luigi would take as complete.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import pickle
import re
import shutil
import sqlite3
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


def _error_classes(cls: type = MedtlError) -> dict[str, type]:
    out = {cls.__name__: cls}
    for sub in cls.__subclasses__():
        out.update(_error_classes(sub))
    return out


def _entry_from_json(d: dict[str, Any]) -> tuple[str, MedtlError]:
    """``(family, error)`` rebuilt from a child's JSON entry: the same medtl class (else MedtlError)."""
    cls = _error_classes().get(d.get("class"), MedtlError)
    err = cls.__new__(cls)
    Exception.__init__(err, d.get("message", ""))
    err.__dict__.update(d.get("attrs") or {})
    if not hasattr(err, "code"):
        err.code = cls.default_code
    return d["family"], err


class _Failures(list):
    """``(task family, MedtlError)`` of the tasks that failed, for the CLI's one-line message and the run
    summary.

    With several workers Luigi runs each task in a forked child process, and ``on_failure`` runs there: a
    plain list in the child never reaches the parent. So a child writes its entry as JSON (error class
    name, message and the JSON-able attributes such as ``code``; never a pickle, which could run code)
    into a private folder made when this module is imported (before any fork), and the parent's list takes
    the entries in whenever it is read, rebuilding the same medtl error class. Only files this process's
    own children wrote are read (a 0700 folder).
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
        for path in sorted(self._dir.glob("*.json")):
            try:
                entry = _entry_from_json(json.loads(path.read_text()))
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
        attrs = {k: v for k, v in vars(err).items() if isinstance(v, (str, int, float, bool, type(None)))}
        blob = json.dumps({"family": family, "class": type(err).__name__, "message": str(err), "attrs": attrs})
        name = f"{time.time_ns()}-{os.getpid()}"
        tmp = self._dir / f".{name}.tmp"
        tmp.write_text(blob)
        tmp.rename(self._dir / f"{name}.json")  # atomic: the parent never reads half an entry

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


#: Failures of this run's tasks (in this process or in Luigi's worker processes): a task's MedtlError as
#: raised, any other exception as a :class:`TaskFailure` (see :func:`failure_of`).
FAILURES: list[tuple[str, MedtlError]] = _Failures()


# ------------------------------------------------------------------------------------ what failed, and why
class TaskFailure(MedtlError):
    """A task failed with an exception that is not a MedtlError, told in one line with a code.

    Attributes:
        transient: True when it can pass by itself on a rerun (a busy file, a lost connection to the
            scheduler); only such failures are retried (:func:`tasks.run.build_with_retries`).
        exc_type: The original exception's class name (its message is not kept: it may quote inputs).
    """

    default_code = "internal_error"

    def __init__(
        self, message: str = "", code: str | None = None, transient: bool = False, exc_type: str = ""
    ) -> None:
        super().__init__(message, code)
        self.transient = transient
        self.exc_type = exc_type


#: errno values of a file that is busy now and free later (EAGAIN: a non-blocking lock taken elsewhere).
_BUSY_ERRNOS = {errno.EBUSY, errno.ETXTBSY, errno.EAGAIN}


def transient_code(exc: BaseException) -> str | None:
    """``busy_file`` / ``scheduler_unreachable`` for a failure that can pass by itself, else None.

    Deterministic failures (a NaN volume's ValueError, a full disk, bad input) are never transient:
    running them again gives the same error three times.
    """
    if isinstance(exc, MedtlError):
        return None
    from luigi.rpc import RPCError

    if isinstance(exc, (RPCError, ConnectionError)):
        return "scheduler_unreachable" if isinstance(exc, RPCError) else "connection_lost"
    if isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in ("locked", "busy")):
        return "busy_file"
    if isinstance(exc, OSError) and exc.errno in _BUSY_ERRNOS:
        return "busy_file"
    return None


_TRANSIENT_WORDS = {
    "busy_file": "a file was busy (locked by another process)",
    "scheduler_unreachable": "the connection to the Luigi scheduler was lost",
    "connection_lost": "a network connection was lost",
}

#: Codes whose message promises a per-file summary: the file, and what to do when it was never written.
PROMISED_DETAILS = {
    "nothing_ingested": (
        lambda plan: plan.private / "ingest" / plan.ingest.name / "files.json",
        "the per-file summary it refers to was not written (the run stopped before it); for each file's "
        "reason run `medtl convert <data.source> <folder>` and read <folder>/private/convert_summary.json",
    ),
}


def failure_of(task: Any, exc: BaseException) -> MedtlError:
    """The one-line, coded account of a task's failure (what FAILURES records and the CLI prints).

    Args:
        task: The failed Luigi task (its ``config`` parameter, when it has one, gives the plan).
        exc: What it raised.
    """
    family = getattr(task, "task_family", type(task).__name__)
    plan = _plan_of(task)
    if isinstance(exc, MedtlError):
        return _with_missing_details(exc, plan)
    code = transient_code(exc)
    if code:
        return TaskFailure(
            f"{family}: {_TRANSIENT_WORDS[code]} ({type(exc).__name__}); retried with back-off "
            "(ops.retries); if it persists, find what holds the workspace or the scheduler",
            code=code,
            transient=True,
            exc_type=type(exc).__name__,
        )
    if isinstance(exc, pickle.UnpicklingError):
        return TaskFailure(
            f"{family}: a checkpoint holds Python objects other than tensors and was refused (checkpoints "
            "are read with weights_only=True only); expected a plain state dict: for a FineTune checkpoint "
            "under finetune/*.work delete that folder (training restarts), for a pretrained file re-save it "
            "with torch.save(model.state_dict(), ...) from a trusted copy; then run again",
            code="unsafe_checkpoint",
            exc_type=type(exc).__name__,
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return TaskFailure(_disk_full_words(family, getattr(task, "stage", ""), plan, task), code="disk_full",
                           exc_type=type(exc).__name__)
    return TaskFailure(
        f"{family}: unexpected {type(exc).__name__} (not retried: it would fail the same way); the traceback "
        "is in the log above; report it with that traceback",
        code="internal_error",
        exc_type=type(exc).__name__,
    )


def _plan_of(task: Any) -> StagePlan | None:
    config = getattr(task, "config", None)
    if not isinstance(config, str):
        return None
    wanted = os.path.abspath(config)
    for (path, _), (_, plan) in list(_CACHE.items()):  # never plans anew while reporting a failure
        if path == wanted:
            return plan
    return None


def _with_missing_details(err: MedtlError, plan: StagePlan | None) -> MedtlError:
    promised = PROMISED_DETAILS.get(err.code)
    if promised is None or plan is None:
        return err
    where, words = promised
    try:
        if where(plan).is_file():
            return err
    except OSError:
        pass
    text = re.sub(r"\s*See the [^.]*summary[^.]*\.", "", str(err)).rstrip(". ")
    out = type(err).__new__(type(err))
    Exception.__init__(out, f"{text}; {words}")
    out.__dict__.update(err.__dict__)
    return out


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _disk_full_words(family: str, stage: str, plan: StagePlan | None, task: Any) -> str:
    """Which folder, how much is free, and about how much the stage needs (from what it wrote before)."""
    if plan is None:
        return (f"{family}: the disk is full (no space left on device); free space in the workspace's file "
                "system (e.g. `medtl gc CONFIG`) and run again")
    folder = Path(getattr(plan, stage)).parent if stage else plan.workspace
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    earlier = [
        p
        for p in (folder.iterdir() if folder.is_dir() else [])
        if p.is_dir() and not p.name.startswith(".") and not p.name.endswith(".work")
    ]
    if earlier:
        need, basis = max(_tree_bytes(p) for p in earlier), f"the largest earlier {stage or 'run'} folder"
    else:
        src = {"ingest": Path(task.cfg.data.source)} if stage == "ingest" and hasattr(task, "cfg") else {}
        before = {"augment": plan.volume_cache, "finetune": plan.augment, "evaluate": plan.finetune}
        base = src.get(stage) or before.get(stage) or plan.workspace
        need, basis = _tree_bytes(base), "the size of its input"
    mb = 1e6
    return (
        f"{family}: the disk holding {folder} is full ({free / mb:.0f} MB free); about {need / mb:.0f} MB "
        f"needed ({basis}); nothing was published: free space (e.g. `medtl gc CONFIG`) and run again"
    )


def _record_failure(task: luigi.Task, exc: BaseException) -> None:
    """Luigi FAILURE event of any task (run in the process that ran it: a worker child with workers > 1)."""
    FAILURES.append((task.task_family, failure_of(task, exc)))


luigi.Task.event_handler(luigi.Event.FAILURE)(_record_failure)


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
        # FAILURES is filled by the FAILURE event handler (_record_failure), for every task.
        if isinstance(exception, MedtlError):
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
