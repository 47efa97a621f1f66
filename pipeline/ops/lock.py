"""The workspace run lock: one ``medtl run`` per workspace at a time.

The lock is an advisory ``fcntl.flock`` on ``<workspace>/ops/run.lock``; the file also says who holds it
(pid, host, user, since when, command). The kernel drops a ``flock`` when its process dies, so a lock file
left behind by a killed run (SIGKILL, power loss) is *stale* by construction: the next run takes it over and
reports the recovered holder. On filesystems without working ``flock`` (some NFS set-ups) the holder's
pid is checked instead when it ran on the same host.

The file is removed on release, so a finished run leaves nothing behind.

A ``flock`` belongs to the open file description, which ``fork`` shares with the child: a forked decoder or
Luigi worker process would keep the lock after its parent was killed (orphaned pool workers sleep forever),
and every later night would find the workspace locked by a dead pid. So the lock's descriptor is closed in
every child forked while it is held (``os.register_at_fork``); the lock lives exactly as long as the process
that took it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import getpass
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import MedtlError

log = logging.getLogger(__name__)

#: Descriptors of the run locks held by this process (closed in forked children, see the module docstring).
_HELD_FDS: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's descriptor (and so the lock) is untouched
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class LockHeld(MedtlError):
    """Another live process holds the workspace lock."""

    def __init__(self, path: Path, holder: dict[str, Any]) -> None:
        self.path = path
        self.holder = holder
        who = ", ".join(
            f"{k} {holder.get(k)}" for k in ("pid", "host", "user", "since") if holder.get(k) is not None
        )
        dead = (
            holder.get("host") == socket.gethostname()
            and holder.get("pid") is not None
            and not _pid_alive(int(holder["pid"]))
        )
        hint = (
            f" The recorded holder pid {holder.get('pid')} is gone, so leftover processes of that run still "
            f"hold the lock (list them with `fuser -v {path}`); end them and the next run takes it over."
            if dead
            else " Wait for it to finish; the lock is released automatically if that process dies."
        )
        super().__init__(
            f"workspace lock {path} is held ({who or 'holder unknown'}); another medtl run is using this "
            f"workspace.{hint}"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(path: Path) -> dict[str, Any]:
    """The holder recorded in a lock file (empty dict when absent or unreadable)."""
    try:
        return json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """Exclusive, self-describing lock on a workspace.

    Args:
        workspace: The workspace folder.
        purpose: Short description stored in the lock file (e.g. ``"medtl run tiny"``).

    Attributes:
        recovered: After :meth:`acquire`, the holder record of a stale lock that was taken over, or None.
    """

    def __init__(self, workspace: str | os.PathLike[str], purpose: str = "medtl run") -> None:
        self.path = Path(workspace) / "ops" / "run.lock"
        self.purpose = purpose
        self.recovered: dict[str, Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`LockHeld` naming the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.ENOLCK):
                    raise
                holder = read_holder(self.path)
                if err.errno == errno.ENOLCK and self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise LockHeld(self.path, holder) from err
            # The file may have been unlinked by the previous holder between open() and flock().
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = read_holder(self.path)
            if previous:
                self.recovered = previous
                log.warning(
                    "Recovered a stale workspace lock %s (pid %s on %s since %s is gone)",
                    self.path,
                    previous.get("pid"),
                    previous.get("host"),
                    previous.get("since"),
                )
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "user": _user(),
                "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "purpose": self.purpose,
                "argv": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3])),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            _HELD_FDS.add(fd)
            return self
        raise MedtlError(
            f"workspace lock {self.path}: could not be taken after 10 attempts (file keeps changing)"
        )

    def _stale(self, holder: dict[str, Any]) -> bool:
        return (
            bool(holder)
            and holder.get("host") == socket.gethostname()
            and not _pid_alive(int(holder.get("pid", 0)))
        )

    def release(self) -> None:
        """Remove the lock file and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        _HELD_FDS.discard(self._fd)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
