"""The model registry and run history: one SQLite file in the workspace (``ops/registry.sqlite``).

Tables (no patient data: only digests, pseudonymous-free aggregates, operator names and reasons):

* ``models``: one row per evaluated model (keyed by its Evaluate folder): stage folders, data snapshot,
  config hash, code version, installed package versions, headline metrics, ``status`` (candidate,
  champion, retired, rejected).
* ``events``: the audit trail (registered, promoted, retired, rejected), with the actor (``auto`` or the
  operator's user name) and the reason.
* ``decisions``: champion/challenger decisions with their numbers and whether the locked holdout was used.
* ``runs`` and ``task_events``: nightly runs (outcome, record file) and the Luigi task events of each.
* ``drift``: per-night monitoring figures (prevalence, input statistics, champion calibration on new cases).

Each call opens its own connection (safe from Luigi worker processes); writes are short transactions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import MedtlError

STATUSES = ("candidate", "champion", "retired", "rejected")
PACKAGES = (
    "torch",
    "numpy",
    "monai",
    "timm",
    "pydicom",
    "nibabel",
    "scikit-learn",
    "scipy",
    "luigi",
    "pydantic",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    name TEXT NOT NULL,
    evaluate TEXT NOT NULL UNIQUE,
    finetune TEXT NOT NULL,
    augment TEXT NOT NULL,
    ingest TEXT NOT NULL,
    data_snapshot TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    train_hash TEXT NOT NULL,
    backbone TEXT NOT NULL,
    code_version TEXT NOT NULL,
    packages TEXT NOT NULL,
    metrics TEXT NOT NULL,
    n_cases INTEGER NOT NULL,
    files TEXT NOT NULL DEFAULT '{}',
    status TEXT NOT NULL CHECK (status IN ('candidate', 'champion', 'retired', 'rejected'))
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    model_id INTEGER NOT NULL REFERENCES models(id),
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    details TEXT
);
CREATE TABLE IF NOT EXISTS decisions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    challenger_id INTEGER NOT NULL REFERENCES models(id),
    champion_id INTEGER REFERENCES models(id),
    promoted INTEGER NOT NULL,
    evaluated_on TEXT NOT NULL,
    n_cases INTEGER NOT NULL,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_key TEXT NOT NULL,
    started TEXT NOT NULL,
    finished TEXT,
    status TEXT NOT NULL,
    host TEXT,
    pid INTEGER,
    user TEXT,
    data_snapshot TEXT,
    record TEXT,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS task_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id INTEGER,
    ts TEXT NOT NULL,
    task TEXT NOT NULL,
    event TEXT NOT NULL,
    pid INTEGER,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS drift (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    source TEXT NOT NULL,
    data_snapshot TEXT,
    model_id INTEGER,
    figures TEXT NOT NULL
);
"""


def now() -> str:
    """UTC time stamp, ISO 8601 to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """``git describe`` of the medtl source tree, else the installed package version, else ``unknown``."""
    here = Path(__file__).resolve().parents[2]
    if (here / ".git").exists():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if out.returncode == 0 and out.stdout.strip():
                return f"git:{out.stdout.strip()}"
    with contextlib.suppress(metadata.PackageNotFoundError):
        return f"medtl=={metadata.version('medtl')}"
    return "unknown"


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that change results."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


class Registry:
    """Model registry and run history of one workspace.

    Args:
        workspace: The workspace folder; the database is ``<workspace>/ops/registry.sqlite``.
    """

    def __init__(self, workspace: str | os.PathLike[str]) -> None:
        self.workspace = Path(workspace)
        self.path = self.workspace / "ops" / "registry.sqlite"

    def exists(self) -> bool:
        return self.path.is_file()

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in a transaction (committed on success); creates the schema on first use."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(self.path, timeout=30.0)
        con.row_factory = sqlite3.Row
        try:
            con.execute("PRAGMA foreign_keys = ON")
            con.executescript(_SCHEMA)
            cols = {r["name"] for r in con.execute("PRAGMA table_info(models)")}
            if "files" not in cols:  # registries created before model files were recorded
                con.execute("ALTER TABLE models ADD COLUMN files TEXT NOT NULL DEFAULT '{}'")
            with con:
                yield con
        finally:
            con.close()

    def _read(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        if not self.exists():
            return []
        con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
        con.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in con.execute(sql, args).fetchall()]
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return []
            raise
        finally:
            con.close()

    # ------------------------------------------------------------------------------------------ models
    def register(
        self,
        *,
        name: str,
        stages: dict[str, str],
        data_snapshot: str,
        config_hash: str,
        train_hash: str,
        backbone: str,
        metrics: dict[str, Any],
        n_cases: int,
    ) -> int:
        """Register a model (idempotent on its Evaluate folder); return its id.

        The sha256 of every file of the trained model (``model.pt``, ``model_info.json``,
        ``calibrator.json``) is recorded; Evaluate-time consumers (promotion, predict, export) verify them
        before use (:meth:`pipeline.trained.artefact.TrainedModel.load` with ``expected``).

        Args:
            stages: Stage name -> folder name (digest) for ingest, augment, finetune, evaluate.
            metrics: Headline metrics (aggregates only).
        """
        from pipeline.trained.artefact import artefact_digests

        files = artefact_digests(
            self.workspace / "finetune" / stages["finetune"], self.workspace / "evaluate" / stages["evaluate"]
        )
        with self.connect() as con:
            row = con.execute("SELECT id FROM models WHERE evaluate = ?", (stages["evaluate"],)).fetchone()
            if row:
                return int(row["id"])
            cur = con.execute(
                "INSERT INTO models (created, name, evaluate, finetune, augment, ingest, data_snapshot, config_hash,"
                " train_hash, backbone, code_version, packages, metrics, n_cases, files, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'candidate')",
                (
                    now(),
                    name,
                    stages["evaluate"],
                    stages["finetune"],
                    stages["augment"],
                    stages["ingest"],
                    data_snapshot,
                    config_hash,
                    train_hash,
                    backbone,
                    code_version(),
                    json.dumps(package_versions(), sort_keys=True),
                    json.dumps(metrics, sort_keys=True),
                    int(n_cases),
                    json.dumps(files, sort_keys=True),
                ),
            )
            model_id = int(cur.lastrowid)
            con.execute(
                "INSERT INTO events (ts, model_id, action, actor, reason) VALUES (?, ?, 'registered', 'auto', ?)",
                (now(), model_id, "evaluated by the nightly run"),
            )
            return model_id

    def get(self, model_id: int) -> dict[str, Any]:
        rows = self._read("SELECT * FROM models WHERE id = ?", (int(model_id),))
        if not rows:
            known = [r["id"] for r in self.models()]
            raise MedtlError(f"model id {model_id} is not in the registry {self.path}; known ids: {known}")
        return _decode_model(rows[0])

    def find(self, evaluate: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM models WHERE evaluate = ?", (evaluate,))
        return _decode_model(rows[0]) if rows else None

    def models(self) -> list[dict[str, Any]]:
        return [_decode_model(r) for r in self._read("SELECT * FROM models ORDER BY id")]

    def champion(self) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM models WHERE status = 'champion' ORDER BY id DESC LIMIT 1")
        return _decode_model(rows[0]) if rows else None

    def promote(self, model_id: int, actor: str, reason: str, details: dict[str, Any] | None = None) -> None:
        """Make ``model_id`` the champion; the previous champion is retired. Both steps are audited."""
        if not reason or not reason.strip():
            raise MedtlError("promote: a reason is required (--reason TEXT); it is kept in the audit trail")
        self.get(model_id)
        with self.connect() as con:
            for old in con.execute(
                "SELECT id FROM models WHERE status = 'champion' AND id != ?", (model_id,)
            ):
                con.execute("UPDATE models SET status = 'retired' WHERE id = ?", (old["id"],))
                con.execute(
                    "INSERT INTO events (ts, model_id, action, actor, reason) VALUES (?, ?, 'retired', ?, ?)",
                    (now(), old["id"], actor, f"replaced by model {model_id}"),
                )
            con.execute("UPDATE models SET status = 'champion' WHERE id = ?", (model_id,))
            con.execute(
                "INSERT INTO events (ts, model_id, action, actor, reason, details) VALUES (?, ?, 'promoted', ?, ?, ?)",
                (now(), model_id, actor, reason, json.dumps(details or {}, sort_keys=True)),
            )

    def set_status(self, model_id: int, status: str, actor: str, reason: str) -> None:
        if status not in STATUSES:
            raise MedtlError(f"status {status!r}: expected one of {STATUSES}")
        with self.connect() as con:
            con.execute("UPDATE models SET status = ? WHERE id = ?", (status, int(model_id)))
            con.execute(
                "INSERT INTO events (ts, model_id, action, actor, reason) VALUES (?, ?, ?, ?, ?)",
                (now(), int(model_id), status, actor, reason),
            )

    def events(self, model_id: int | None = None) -> list[dict[str, Any]]:
        if model_id is None:
            return self._read("SELECT * FROM events ORDER BY id")
        return self._read("SELECT * FROM events WHERE model_id = ? ORDER BY id", (int(model_id),))

    # --------------------------------------------------------------------------------------- decisions
    def record_decision(
        self,
        challenger_id: int,
        champion_id: int | None,
        promoted: bool,
        evaluated_on: str,
        n_cases: int,
        details: dict[str, Any],
    ) -> int:
        with self.connect() as con:
            cur = con.execute(
                "INSERT INTO decisions (ts, challenger_id, champion_id, promoted, evaluated_on, n_cases, details)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    now(),
                    challenger_id,
                    champion_id,
                    int(promoted),
                    evaluated_on,
                    int(n_cases),
                    json.dumps(details, sort_keys=True),
                ),
            )
            return int(cur.lastrowid)

    def decisions(self) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM decisions ORDER BY id")
        for r in rows:
            r["details"] = json.loads(r["details"])
        return rows

    def holdout_uses(self) -> int:
        """How many promotion decisions have looked at the locked holdout."""
        return sum(
            1 for d in self._read("SELECT evaluated_on FROM decisions") if d["evaluated_on"] == "holdout"
        )

    # -------------------------------------------------------------------------------------------- runs
    def start_run(self, run_key: str, host: str, pid: int, user: str, data_snapshot: str) -> int:
        with self.connect() as con:
            cur = con.execute(
                "INSERT INTO runs (run_key, started, status, host, pid, user, data_snapshot) VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (run_key, now(), host, pid, user, data_snapshot),
            )
            return int(cur.lastrowid)

    def close_interrupted_runs(self) -> int:
        """Mark runs still ``running`` as ``interrupted`` (killed before they could finish); return how many.

        Only call this while holding the workspace lock: then no run of this workspace is alive, so a
        ``running`` row is one whose process died (SIGKILL, power loss) before :meth:`finish_run`.
        """
        if not self._read("SELECT id FROM runs WHERE status = 'running' LIMIT 1"):
            return 0  # nothing to write (a no-op night must not touch the database)
        with self.connect() as con:
            cur = con.execute(
                "UPDATE runs SET status = 'interrupted', finished = ? WHERE status = 'running'", (now(),)
            )
            return int(cur.rowcount)

    def finish_run(self, run_id: int, status: str, record: str | None, summary: dict[str, Any]) -> None:
        with self.connect() as con:
            con.execute(
                "UPDATE runs SET finished = ?, status = ?, record = ?, summary = ? WHERE id = ?",
                (now(), status, record, json.dumps(summary, sort_keys=True, default=str), run_id),
            )

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._read("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (int(limit),))
        for r in rows:
            r["summary"] = json.loads(r["summary"]) if r.get("summary") else {}
        return rows

    def task_event(self, run_id: int | None, task: str, event: str, detail: str = "") -> None:
        with self.connect() as con:
            con.execute(
                "INSERT INTO task_events (run_id, ts, task, event, pid, detail) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, now(), task, event, os.getpid(), detail[:2000]),
            )

    def task_events(self, run_id: int | None = None) -> list[dict[str, Any]]:
        if run_id is None:
            return self._read("SELECT * FROM task_events ORDER BY id")
        return self._read("SELECT * FROM task_events WHERE run_id = ? ORDER BY id", (int(run_id),))

    # ------------------------------------------------------------------------------------------- drift
    def record_drift(
        self,
        source: str,
        figures: dict[str, Any],
        data_snapshot: str | None = None,
        model_id: int | None = None,
    ) -> None:
        with self.connect() as con:
            con.execute(
                "INSERT INTO drift (ts, source, data_snapshot, model_id, figures) VALUES (?, ?, ?, ?, ?)",
                (now(), source, data_snapshot, model_id, json.dumps(figures, sort_keys=True)),
            )

    def drift(self, source: str | None = None, limit: int = 30) -> list[dict[str, Any]]:
        if source is None:
            rows = self._read("SELECT * FROM drift ORDER BY id DESC LIMIT ?", (int(limit),))
        else:
            rows = self._read(
                "SELECT * FROM drift WHERE source = ? ORDER BY id DESC LIMIT ?", (source, int(limit))
            )
        for r in rows:
            r["figures"] = json.loads(r["figures"])
        return rows[::-1]


def _decode_model(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["packages"] = json.loads(out["packages"])
    out["metrics"] = json.loads(out["metrics"])
    out["files"] = json.loads(out.get("files") or "{}")
    return out
