"""The wrapper task and the nightly driver: lock, retries, run history, record, notification.

``RunPipeline(config, night)`` requires Ingest; its ``run()`` applies the retraining policy
(:func:`pipeline.ops.nightly.retrain_decision`), pulls in Augment -> FineTune -> Evaluate -> Promote as a
dynamic dependency when tonight trains, records drift figures, and writes the nightly record
``<workspace>/runs/<night>_<snapshot>_<config hash>.json`` pointing to the stage folders it used. The record
is the task's output, so a rerun on the same night with the same data and config runs nothing and writes
nothing; the next night (same data) only writes a new record.

:func:`nightly_build` is what ``medtl run`` calls: it takes the workspace lock first (a second run on the
same workspace refuses at once, before any planning), decides a no-op night from stat calls and the config
hash alone (tonight's record exists: no model registry, torch, MONAI or matplotlib is imported), otherwise
plans the stages (key, weight digests, warm-start choice recorded under the lock), keeps the run history and
the Luigi task events in the registry (Luigi's own SQLAlchemy task history is not used), reruns the chain
with exponential back-off only after failures that can pass by themselves (:func:`build_with_retries`), and
calls the notification hook.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import luigi

from pipeline.io import write_json
from tasks.base import config_and_plan, config_and_snapshot
from tasks.ingest import Ingest

log = logging.getLogger(__name__)

#: Registry run id of the run in progress in this process (read by the task event handlers).
CURRENT_RUN: dict[str, Any] = {"id": None, "workspace": None}


def today() -> str:
    """The night's name: the local date, ``YYYY-MM-DD``."""
    return dt.date.today().isoformat()


class RunPipeline(luigi.Task):
    """The whole night: Ingest, then (per the retraining policy) Augment -> FineTune -> Evaluate -> Promote."""

    config = luigi.Parameter(description="Path to the run's YAML config")
    night = luigi.Parameter(default="", description="Night name (YYYY-MM-DD); default today")

    def _night(self) -> str:
        return self.night or today()

    def requires(self) -> Ingest:
        return Ingest(config=self.config)

    def output(self) -> luigi.LocalTarget:
        # Stat calls and the config hash only: deciding that tonight is done plans nothing.
        cfg, snapshot = config_and_snapshot(self.config)
        return luigi.LocalTarget(str(record_path(cfg, snapshot, self._night())))

    def run(self):
        from pipeline.ops.nightly import monitor, retrain_decision
        from pipeline.ops.registry import Registry
        from tasks.evaluate import Evaluate
        from tasks.finetune import FineTune
        from tasks.ops import Promote

        cfg, plan = config_and_plan(self.config)
        reg = Registry(plan.workspace)
        promote_task = Promote(config=self.config)
        # run() is re-entered after the dynamic dependency finishes: decide from state that the
        # dependency itself does not change (a finished Promote means tonight trains).
        if promote_task.complete():
            policy = {
                "train": True,
                "reasons": ["this configuration and data were already trained and decided"],
            }
        else:
            policy = retrain_decision(cfg, plan, reg)
        decision = None
        evaluated = policy["train"]
        if policy["train"]:
            yield promote_task
            decision = json.loads(Path(promote_task.output().path).read_text())
        elif FineTune(config=self.config).complete():
            # Tonight's data and training config give an already trained model: when only evaluation or
            # report options changed, re-evaluate it (no new promotion decision: the model is the same).
            yield Evaluate(config=self.config)
            evaluated = True
            policy = dict(
                policy,
                reasons=[*policy["reasons"], "model already trained: evaluated with the current options"],
            )
        champ_before = reg.get(decision["champion_id"]) if decision and decision.get("champion_id") else None
        drift = monitor(cfg, plan, reg, champion=champ_before)
        champ = reg.champion()
        reg.record_drift("nightly", drift, plan.snapshot, champ["id"] if champ else None)
        ws = plan.workspace
        stages = ("ingest", "augment", "finetune", "evaluate") if evaluated else ("ingest",)
        headline = {}
        if evaluated and (plan.evaluate / "metrics.json").exists():
            headline = json.loads((plan.evaluate / "metrics.json").read_text()).get("headline", {})
        record = {
            "schema_version": 2,
            "night": self._night(),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "name": cfg.name,
            "data_snapshot": plan.snapshot,
            "stages": {s: os.path.relpath(getattr(plan, s), ws) for s in stages},
            "report": os.path.relpath(plan.evaluate / "report.html", ws) if evaluated else None,
            "headline": headline,
            "retrain": policy,
            "promotion": _decision_summary(decision),
            "champion_id": champ["id"] if champ else None,
            "drift": drift,
        }
        from pipeline.report.nightly import write_nightly_report

        # The HTML page first: the JSON record is the task's output, so it must be the last thing written.
        write_nightly_report(
            Path(self.output().path).with_suffix(".html"), record, reg.drift("nightly", limit=14)
        )
        write_json(self.output().path, record)


def record_path(cfg: Any, snapshot: str, night: str) -> Path:
    """``<workspace>/runs/<night>_<snapshot>_<config hash>.json``: the night's record.

    With ``evaluate.external`` the external sources' snapshots join the data snapshot (``<snap>-<digest>``):
    a changed second test source is new work for the night, as changed training data is.
    """
    from pipeline.ops.nightly import record_name

    if cfg.evaluate.external:
        import hashlib

        from pipeline.workspace import external_snapshots

        blob = json.dumps(external_snapshots(cfg)).encode()
        snapshot = f"{snapshot}-{hashlib.sha256(blob).hexdigest()[:8]}"
    return Path(cfg.runtime.workspace) / "runs" / record_name(cfg, snapshot, night)


def _decision_summary(decision: dict[str, Any] | None) -> dict[str, Any] | None:
    if decision is None:
        return None
    keys = (
        "model_id",
        "champion_id",
        "promote",
        "promoted",
        "evaluated_on",
        "n_cases",
        "auroc_challenger",
        "auroc_champion",
        "auroc_difference",
        "difference_ci",
        "auroc_ci",
        "brier_challenger",
        "brier_champion",
        "method",
        "reasons",
        "note",
        "holdout_uses",
    )
    return {k: decision.get(k) for k in keys if k in decision}


# ------------------------------------------------------------------------------------- run history
def _on_event(event: str):
    def handler(task: luigi.Task, *args: Any) -> None:
        if CURRENT_RUN["id"] is None:
            return
        from pipeline.ops.registry import Registry

        detail = f"{type(args[0]).__name__}: {args[0]}" if args and isinstance(args[0], BaseException) else ""
        try:
            Registry(CURRENT_RUN["workspace"]).task_event(CURRENT_RUN["id"], task.task_family, event, detail)
        except Exception as err:  # noqa: BLE001 - history must never break a run
            log.warning("run history: could not record %s %s: %s", task.task_family, event, err)

    return handler


_HANDLERS_INSTALLED = False


def install_history_handlers() -> None:
    """Record START / SUCCESS / FAILURE of every task in the registry's ``task_events`` table."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    for ev, name in (
        (luigi.Event.START, "start"),
        (luigi.Event.SUCCESS, "success"),
        (luigi.Event.FAILURE, "failure"),
        (luigi.Event.PROCESS_FAILURE, "process_failure"),
        (luigi.Event.TIMEOUT, "timeout"),
    ):
        luigi.Task.event_handler(ev)(_on_event(name))
    _HANDLERS_INSTALLED = True


# ----------------------------------------------------------------------------------- the nightly driver
def nightly_build(
    config: str | Path, luigi_kwargs: dict[str, Any], night: str | None = None, sleep=time.sleep
) -> tuple[Any, dict[str, Any]]:
    """Run the night under the workspace lock, with retries, history and notification.

    Args:
        config: The YAML config path.
        luigi_kwargs: Arguments of ``luigi.build`` (workers, scheduler).
        night: Night name (default today).
        sleep: Back-off sleep function (tests pass a fake).

    Returns:
        ``(last luigi result, summary)``; ``summary["status"]`` is ``success``, ``noop`` or ``failed``.
    """
    from pipeline.ops.lock import RunLock
    from pipeline.ops.notify import notify
    from pipeline.ops.registry import Registry
    from tasks.base import config_of

    config = str(Path(config).resolve())
    cfg = config_of(config)
    ws = Path(cfg.runtime.workspace)
    luigi_kwargs = {**luigi_kwargs, "detailed_summary": True}
    task = RunPipeline(config=config, night=night or today())
    summary: dict[str, Any] = {"name": cfg.name, "night": task._night()}
    # The lock first: a second run on this workspace refuses before planning anything.
    with RunLock(ws, purpose=f"medtl run {cfg.name}") as lock:
        if lock.recovered:
            summary["recovered_lock"] = {k: lock.recovered.get(k) for k in ("pid", "host", "since")}
        interrupted = Registry(ws).close_interrupted_runs()
        if interrupted:
            log.warning("Run history: %d earlier run(s) had been killed before finishing", interrupted)
            summary["interrupted_runs"] = interrupted
        _, snapshot = config_and_snapshot(config)
        summary["data_snapshot"] = snapshot
        if task.complete():
            # Nothing to do tonight: write nothing at all (the run history is not touched either), and plan
            # nothing (no model registry, no torch).
            result = luigi.build([task], **luigi_kwargs)
            summary["status"] = "noop"
            summary["record"] = os.path.relpath(task.output().path, ws)
        else:
            refuse_problems(cfg)  # what would fail later fails now, before any stage starts
            _, plan = config_and_plan(config)  # under the lock: creates the key, records the plan's choices
            result = _build_recorded(task, cfg, plan, luigi_kwargs, summary, sleep)
    summary["notify_warnings"] = notify(cfg.ops.notify, summary)
    return result, summary


def refuse_problems(cfg: Any) -> None:
    """Raise one ConfigError listing every preflight problem (:mod:`pipeline.preflight`), if any; problems
    of single CSV rows are logged (counts and line numbers) and left to Ingest, which reports them."""
    from pipeline.errors import ConfigError
    from pipeline.preflight import preflight

    problems = preflight(cfg)
    for p in (p for p in problems if p.per_row):  # a batch goes on: Ingest reports those rows by line
        log.warning("preflight: %s: %s", p.field, p.message)
    problems = [p for p in problems if not p.per_row]
    if problems:
        raise ConfigError(
            "the config cannot run:\n" + "\n".join(p.line() for p in problems), code=problems[0].code
        )


def _build_recorded(
    task: RunPipeline, cfg: Any, plan: Any, luigi_kwargs: dict[str, Any], summary: dict[str, Any], sleep
) -> Any:
    from pipeline.ops.registry import Registry
    from tasks.base import FAILURES

    reg = Registry(plan.workspace)
    install_history_handlers()
    run_id = reg.start_run(
        Path(task.output().path).name, socket.gethostname(), os.getpid(), lock_user(), plan.snapshot
    )
    CURRENT_RUN.update(id=run_id, workspace=str(plan.workspace))
    result = None
    try:

        def on_retry(attempt: int, attempts: int, why: str, delay: float) -> None:
            reg.task_event(
                run_id, "RunPipeline", "retry", f"attempt {attempt} failed ({why}); back-off {delay:.0f} s"
            )

        result, attempt = build_with_retries(
            [task], luigi_kwargs, cfg.ops.retries, cfg.ops.retry_backoff_s, sleep, on_retry
        )
        summary["attempts"] = attempt
        ok = task.complete()
        summary["status"] = "success" if ok else "failed"
        if FAILURES:
            summary["error"] = "; ".join(f"{f}: {e}" for f, e in FAILURES)[:500]
            summary["failure_codes"] = sorted({getattr(e, "code", "error") for _, e in FAILURES})
        if ok:
            record = json.loads(Path(task.output().path).read_text())
            summary.update(
                record=os.path.relpath(task.output().path, plan.workspace),
                trained=record["retrain"]["train"],
                promoted=(record.get("promotion") or {}).get("promoted"),
                promotion=record.get("promotion"),
                champion_id=record.get("champion_id"),
                headline=record.get("headline"),
            )
    finally:
        CURRENT_RUN.update(id=None)
        reg.finish_run(run_id, summary.get("status", "failed"), summary.get("record"), summary)
    return result


def build_with_retries(
    tasks: list[luigi.Task],
    luigi_kwargs: dict[str, Any],
    retries: int,
    backoff_s: float,
    sleep=time.sleep,
    on_retry=None,
) -> tuple[Any, int]:
    """``luigi.build`` again, with exponential back-off, only while what failed can pass by itself.

    Retried: every failure of the attempt is transient (:attr:`tasks.base.TaskFailure.transient`: a busy
    file, a lost scheduler connection), or ``luigi.build`` itself lost the scheduler (``RPCError``). Not
    retried: a MedtlError, any other exception (deterministic: a NaN volume's ValueError fails the same way
    every time), a worker process that died, or a run that failed without a recorded cause. Failures are
    recorded in every worker mode (``tasks.base.FAILURES`` crosses Luigi's worker processes).

    Args:
        tasks: What to build.
        luigi_kwargs: Arguments of ``luigi.build`` (``detailed_summary`` is forced on).
        retries: Extra attempts allowed (``ops.retries``).
        backoff_s: First back-off in seconds; attempt k waits ``backoff_s * 2**k``.
        sleep: The sleep function (tests pass a fake).
        on_retry: Called ``(attempt, attempts, why, delay)`` before each back-off.

    Returns:
        ``(last luigi result or None, attempts made)``. After an ``RPCError`` on the last attempt, the
        result is None and FAILURES holds a ``scheduler_unreachable`` entry.
    """
    from luigi.rpc import RPCError

    from tasks.base import FAILURES, TaskFailure, failure_of

    attempts = retries + 1
    result = None
    for attempt in range(1, attempts + 1):
        FAILURES.clear()
        try:
            result = luigi.build(tasks, **{**luigi_kwargs, "detailed_summary": True})
        except (RPCError, ConnectionError) as err:  # luigi.build lost the central scheduler
            result = None
            FAILURES.append(("scheduler", failure_of(tasks[0], err)))
        ok = result is not None and result.scheduling_succeeded and result.status.name in (
            "SUCCESS",
            "SUCCESS_WITH_RETRY",
        )
        failures = list(FAILURES)
        transient = bool(failures) and all(
            isinstance(e, TaskFailure) and e.transient for _, e in failures
        )
        if ok or not transient or attempt == attempts:
            return result, attempt
        delay = backoff_s * (2 ** (attempt - 1))
        why = ", ".join(sorted({e.code for _, e in failures}))
        log.warning("Run attempt %d of %d failed (%s); retrying in %.0f s", attempt, attempts, why, delay)
        if on_retry is not None:
            on_retry(attempt, attempts, why, delay)
        sleep(delay)
    return result, attempts  # pragma: no cover - the loop always returns


def lock_user() -> str:
    from pipeline.ops.lock import _user

    return _user()
