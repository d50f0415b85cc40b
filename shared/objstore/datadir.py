"""A durable broker's data directory: its secret, its locks and the processes it runs.

```
<data_dir>/                 0700
  credentials               0600  {"access_key_id": ..., "secret_access_key": ...}, made once
  objects/<bucket>/...            the objects (vidsearch.objstore.objects)
  run/owner.lock                  held (flock) by the process that owns the broker (vidsearch up)
  run/objstore.lock               held by the object server while it serves this directory
  run/objstore.json               the object server's pid, start time and port (written once it listens)
  run/<name>.pid.json             pid and start time of each process the owner started
  run/objstore.log                the object server's log (no secrets)
```

A SIGKILLed owner leaves its children and their records behind; the next owner takes the
lock (the kernel released it with the dead process) and :func:`reap` stops the recorded
processes that still run (checked by their start time, so a reused pid is never signalled).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import signal
import time
from pathlib import Path

from .sigv4 import Credentials

CREDENTIALS_FILE = "credentials"
OBJECTS_DIR = "objects"
RUN_DIR = "run"


class DataDirError(RuntimeError):
    """The data directory can't be used (in use, unreadable secret ...); one line saying why."""


def ensure_layout(data_dir: Path) -> None:
    """Create the directory (0700: it holds the secret and every queued message)."""
    for directory in (data_dir, data_dir / RUN_DIR, data_dir / OBJECTS_DIR):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            directory.chmod(0o700)


def load_or_create_credentials(data_dir: Path) -> Credentials:
    """The directory's credentials, made on first use: 0600, written in full to a temporary
    file and then hard-linked into place, which fails when another start got there first, so
    racing starts agree on one secret and a crash never leaves an empty one."""
    ensure_layout(data_dir)
    path = data_dir / CREDENTIALS_FILE
    if not path.exists():
        fresh = {"access_key_id": "VIDSEARCH" + secrets.token_hex(6).upper(),
                 "secret_access_key": secrets.token_urlsafe(32)}
        tmp = data_dir / f".{CREDENTIALS_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(fresh, handle)
                handle.flush()
                os.fsync(handle.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(data_dir)
    return load_credentials(data_dir)


def load_credentials(data_dir: Path) -> Credentials:
    path = data_dir / CREDENTIALS_FILE
    try:
        raw = json.loads(path.read_text())
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)  # readable by others once: at least stop that now
        return Credentials(str(raw["access_key_id"]), str(raw["secret_access_key"]))
    except OSError as exc:
        raise DataDirError(f"cannot read the broker storage credentials {path}: {exc.strerror}") from None
    except (ValueError, KeyError, TypeError):
        pass
    raise DataDirError(f"the broker storage credentials {path} are not valid JSON with access_key_id and "
                       "secret_access_key (remove the file to make new ones)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirLock:
    """An exclusive ``flock`` on a file: held until :meth:`release` or this process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str) -> "DirLock":
        """Take the lock or raise :class:`DataDirError` naming ``what`` holds it (and its pid)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise DataDirError(f"{self.path.parent.parent} is in use by {what}"
                                   + (f", pid {holder}" if holder else "")) from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when it is gone.
    Linux only (/proc); elsewhere None, and reaping is skipped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else fields[19]


def record_process(data_dir: Path, name: str, pid: int, **extra: object) -> None:
    """Write ``run/<name>.pid.json`` (atomically) for :func:`reap`."""
    entry = {"pid": pid, "start": start_time(pid), **extra}
    path = data_dir / RUN_DIR / f"{name}.pid.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)


def forget_process(data_dir: Path, name: str) -> None:
    (data_dir / RUN_DIR / f"{name}.pid.json").unlink(missing_ok=True)


def _recorded(path: Path) -> tuple[int, str | None] | None:
    try:
        raw = json.loads(path.read_text())
        return int(raw["pid"]), raw.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reap(data_dir: Path, grace_s: float = 5.0) -> list[str]:
    """Stop the processes a dead owner left running (recorded in ``run/``); call with the owner
    lock held. Returns what was stopped, for the log."""
    stopped = []
    for path in sorted((data_dir / RUN_DIR).glob("*.json")):
        found = _recorded(path)
        if found is not None:
            pid, started = found
            if started is not None and start_time(pid) == started and pid != os.getpid():
                _stop(pid, started, grace_s)
                stopped.append(f"{path.name.split('.')[0]} (pid {pid})")
        if path.name.endswith(".pid.json"):
            path.unlink(missing_ok=True)
    return stopped


def _stop(pid: int, started: str, grace_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while start_time(pid) == started and time.monotonic() < deadline:
        time.sleep(0.05)
    if start_time(pid) == started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while start_time(pid) == started and time.monotonic() < deadline + grace_s:
            time.sleep(0.05)
