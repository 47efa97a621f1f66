"""Incremental ingestion: a per-source-tree index of file fingerprints and header-scan results.

Every source file is fingerprinted by (path, size, mtime); when size or mtime change, its content hash
(SHA-256) decides whether it really changed. Unchanged files reuse their cached header-scan result
(:class:`~pipeline.ingest.dicom.HeaderRecord`, NIfTI/image header facts or the rejection), so a rerun
reads only new or changed files. Files that were seen before and are gone are kept in the index with
status ``vanished`` (history is never silently dropped) and reported by the stage.

The index holds source paths and DICOM identifiers (PatientID, UIDs), which the series regrouping needs,
so it lives under the workspace's ``private/`` folder: ``private/ingest/index-<root token>.sqlite``
(mode 0600). Results are stored as JSON (no pickle: the file is data, never code).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Bump when a reader changes what a header scan returns, so stale cached results are re-read.
INDEX_VERSION = 1
_HASH_CHUNK = 1 << 20


def content_hash(path: str) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB chunks (the file is opened read-only)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class IndexStats:
    """What one scan did with the index (counts only: safe to publish).

    Attributes:
        unchanged: Files whose size and mtime matched (header reused without opening the file).
        touched: Files whose size/mtime changed but whose content hash did not (header reused).
        changed: Files whose content changed (header read again).
        new: Files not in the index before (header read).
        vanished: Files in the index that are no longer on disk (newly vanished in this scan).
        returned: Files marked vanished earlier that are back.
        hashed_bytes: Bytes read to compute content hashes.
        index_rebuilt: 1 when the index file was unreadable or corrupt: it was set aside (renamed
            ``*.corrupt``) and rebuilt from this scan, every header read again (cached volumes are still
            reused: their fingerprints hold the content hashes).
    """

    unchanged: int = 0
    touched: int = 0
    changed: int = 0
    new: int = 0
    vanished: int = 0
    returned: int = 0
    hashed_bytes: int = 0
    index_rebuilt: int = 0
    vanished_paths: list[str] = field(default_factory=list, repr=False)  # PRIVATE
    vanished_before: list[str] = field(default_factory=list, repr=False)  # PRIVATE, earlier scans

    @property
    def headers_read(self) -> int:
        return self.changed + self.new

    def public(self) -> dict[str, int]:
        """The counts (no paths)."""
        out = {k: v for k, v in asdict(self).items() if not k.startswith("vanished_")}
        out["headers_read"] = self.headers_read
        out["vanished_earlier"] = len(self.vanished_before)
        return out


class SourceIndex:
    """SQLite index of one source tree's files (PRIVATE: holds paths and identifiers).

    Use as a context manager; :meth:`lookup` and :meth:`store` are called by
    :func:`pipeline.ingest.sources.scan_sources`, then :meth:`finish` marks files not seen in this scan
    as vanished and commits.

    Args:
        path: SQLite file (created with mode 0600 if missing; its folder should be private).
        root: Absolute source root; only files under it are considered for ``vanished``.
    """

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.root = os.path.abspath(os.fspath(root))
        self.stats = IndexStats()
        self._seen: set[str] = set()
        self._hashes: dict[str, str] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._rows = self._open()
        except sqlite3.DatabaseError as err:  # a corrupt/truncated file: set aside, never a crash loop
            self._db.close()
            aside = self.path.with_name(f"{self.path.name}.corrupt")
            os.replace(self.path, aside)
            log.warning("source index unreadable (%s): set aside as %s and rebuilt", err, aside.name)
            self.stats.index_rebuilt = 1
            self._rows = self._open()
        self._pending: list[tuple] = []

    def _open(self) -> dict[str, tuple]:
        """Connect, check the file (``PRAGMA quick_check``), create the table; this root's rows."""
        fresh = not self.path.exists()
        self._db = sqlite3.connect(str(self.path), timeout=60.0)
        if fresh:
            os.chmod(self.path, 0o600)
        check = self._db.execute("PRAGMA quick_check").fetchone()
        if check is None or check[0] != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
            "sha256 TEXT, result TEXT, version INTEGER, status TEXT, first_seen TEXT, last_seen TEXT, "
            "case_id TEXT)"
        )
        prefix = self.root.rstrip(os.sep) + os.sep
        return {
            r[0]: r
            for r in self._db.execute(
                "SELECT path, size, mtime_ns, sha256, result, version, status, case_id FROM files "
                "WHERE substr(path, 1, ?) = ?",
                (len(prefix), prefix),
            )
        }

    def __enter__(self) -> SourceIndex:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def sha256(self, path: str) -> str | None:
        """Content hash of a file seen in this scan (None if not seen)."""
        return self._hashes.get(path)

    def lookup(self, path: str) -> dict[str, Any] | None:
        """Return the cached scan result of ``path`` if the file is unchanged, else None.

        Size and mtime equal to the index: unchanged without reading the file. Otherwise the content hash
        is computed and compared; the caller then reads the header only when it differs (or is new).
        """
        self._seen.add(path)
        st = os.stat(path)
        row = self._rows.get(path)
        if row is not None and row[6] == "vanished":
            self.stats.returned += 1
        if row is not None and row[5] == INDEX_VERSION and row[4] is not None:
            if (row[1], row[2]) == (st.st_size, st.st_mtime_ns):
                self.stats.unchanged += 1
                self._hashes[path] = row[3]
                if row[6] != "present":
                    self._pending.append((path, st.st_size, st.st_mtime_ns, row[3], row[4]))
                return json.loads(row[4])
            sha = self._hash(path, st.st_size)
            if sha == row[3]:
                self.stats.touched += 1
                self._pending.append((path, st.st_size, st.st_mtime_ns, sha, row[4]))
                return json.loads(row[4])
            self.stats.changed += 1
            return None
        self._hash(path, st.st_size)
        if row is None:
            self.stats.new += 1
        else:
            self.stats.changed += 1  # reader version changed or no result stored
        return None

    def _hash(self, path: str, size: int) -> str:
        sha = content_hash(path)
        self._hashes[path] = sha
        self.stats.hashed_bytes += size
        return sha

    def store(self, path: str, result: dict[str, Any]) -> None:
        """Record the scan result of a file read in this scan (after :meth:`lookup` returned None)."""
        st = os.stat(path)
        sha = self._hashes.get(path) or self._hash(path, st.st_size)
        self._pending.append(
            (path, st.st_size, st.st_mtime_ns, sha, json.dumps(result, separators=(",", ":")))
        )

    def set_cases(self, case_of_file: dict[str, str]) -> None:
        """Remember which case each file went into (for reports about vanished files later)."""
        self._db.executemany(
            "UPDATE files SET case_id = ? WHERE path = ?", [(c, p) for p, c in case_of_file.items()]
        )
        self._db.commit()

    def previous_case(self, path: str) -> str | None:
        row = self._rows.get(path)
        return row[7] if row is not None else None

    def finish(self) -> IndexStats:
        """Write this scan's results, mark unseen files ``vanished`` and commit. Returns the stats."""
        now = _now()
        self._db.executemany(
            "INSERT INTO files (path, size, mtime_ns, sha256, result, version, status, first_seen, "
            "last_seen) VALUES (?, ?, ?, ?, ?, ?, 'present', ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, result = excluded.result, "
            "version = excluded.version, status = 'present', last_seen = excluded.last_seen",
            [(p, s, m, h, r, INDEX_VERSION, now, now) for p, s, m, h, r in self._pending],
        )
        gone = [p for p, row in self._rows.items() if p not in self._seen]
        for p in gone:
            if self._rows[p][6] == "vanished":
                self.stats.vanished_before.append(p)
            else:
                self.stats.vanished_paths.append(p)
        self.stats.vanished = len(self.stats.vanished_paths)
        self._db.executemany(
            "UPDATE files SET status = 'vanished', last_seen = ? WHERE path = ?",
            [(now, p) for p in self.stats.vanished_paths],
        )
        self._db.commit()
        self._pending = []
        return self.stats


__all__ = ["SourceIndex", "IndexStats", "content_hash", "INDEX_VERSION"]
