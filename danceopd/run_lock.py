"""One run per folder: `danceopd train` holds job.output_dir/run.lock while it runs.

The lock file names its holder (pid, host, run id, start time); a daemon thread touches it every
`heartbeat_s`, so its modification time is the holder's heartbeat. A lock is stale when its
holder is gone: on this host its pid no longer runs, on any host its heartbeat is older than
`stale_s` (a pid cannot be checked from another machine, and on this one it may have been
reused). A stale lock is reported and may be taken over by a run that continues or replaces the
folder's run (`--resume`, `--overwrite`); a live one is never taken.

Creating the file is atomic (O_CREAT | O_EXCL, on any file system), so two runs starting
together cannot both hold it. Taking over a stale lock re-reads it first and removes it only if
it is still the stale holder's; two takeovers of one stale lock racing within that instant
remain possible.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from danceopd.checkpoint import CheckpointError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 10.0
STALE_S = 120.0  # 12 missed heartbeats: a busy or briefly stalled holder is never taken for dead


class RunLocked(CheckpointError):
    """Another run holds job.output_dir, or a dead one left its lock (one line)."""


def read_holder(path: Path) -> dict | None:
    """The holder recorded in a lock file and its heartbeat (`heartbeat`: the file's mtime), or
    None if there is no lock. A lock file that does not parse (its writer died mid-write) is a
    holder of unknown pid, judged by its heartbeat alone."""
    try:
        text, heartbeat = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        if not isinstance(holder, dict):
            raise ValueError
    except ValueError:
        holder = {}
    return {**holder, "heartbeat": heartbeat}


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def stale_reason(holder: dict, stale_s: float = STALE_S, now: float | None = None) -> str | None:
    """Why the lock's holder is gone, or None if it may still be running."""
    age = (time.time() if now is None else now) - holder["heartbeat"]
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not pid_running(pid):
        return "its process is not running"
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s"
    return None


def describe(holder: dict, now: float | None = None) -> str:
    age = (time.time() if now is None else now) - holder["heartbeat"]
    return (f"run {holder.get('run_id') or '(starting)'} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"heartbeat {max(age, 0):.0f} s ago)")


class RunLock:
    """`RunLock(output_dir).acquire(takeover)`, `set_run_id(...)`, `release()`; or a `with` block."""

    def __init__(self, output_dir: Path, run_id: str | None = None, heartbeat_s: float = HEARTBEAT_S,
                 stale_s: float = STALE_S):
        self.path = Path(output_dir) / LOCK_FILE
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": time.time(),
                       "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, takeover: bool = False) -> RunLock:
        """Hold the lock, or raise RunLocked naming the holder. `takeover`: a stale lock is taken
        over (said in one line on stderr); without it a stale lock is refused too."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            holder = read_holder(self.path)
            if holder is None:
                continue  # released meanwhile: try again
            folder = self.path.parent
            why = stale_reason(holder, self.stale_s)
            if why is None:
                raise RunLocked(f"job.output_dir {folder} is in use by {describe(holder)}: one run per folder; "
                                "stop that run first, or give this one another job.output_dir")
            if not takeover:
                raise RunLocked(f"job.output_dir {folder} holds the lock of {describe(holder)}, which is gone "
                                f"({why}): pass --resume auto to continue that run, or --overwrite to start a new one")
            if read_holder(self.path) != holder:
                continue  # someone else took it over or released it: look again
            self.path.unlink(missing_ok=True)
            print(f"run lock: taking over the stale lock of {describe(holder)}: {why}", file=sys.stderr, flush=True)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # a reader in between sees no pid: a holder judged by its fresh heartbeat
            f.write(json.dumps(self.record))
        return True

    def held(self) -> bool:
        """The lock file is still this run's (not released, not taken over as stale)."""
        holder = read_holder(self.path)
        return holder is not None and holder.get("token") == self.record["token"]

    def set_run_id(self, run_id: str) -> None:
        """Name the run once it is known (prepare_output decides it under the lock)."""
        self.record["run_id"] = run_id
        if self.held():
            tmp = self.path.with_name(f".{LOCK_FILE}.{self.record['token']}")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)  # never absent, never half-written

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # removed under us: nothing to refresh
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's (a run whose lock was
        taken over as stale must not remove its successor's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
