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

On object storage (an s3:// / gs:// / file:// job.output_dir) the lock is an object with the
same record and the same rules, taken on a best-effort basis: ObjectRunLock says how and where it
falls short.
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
    return parse_holder(text, heartbeat)


def parse_holder(text: str | bytes, heartbeat: float) -> dict:
    """A lock record with its heartbeat; one that does not parse is a holder of unknown pid."""
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
        self.where = str(self.path.parent)  # job.output_dir, as the messages name it
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": time.time(),
                       "token": secrets.token_hex(8)}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, takeover: bool = False) -> RunLock:
        """Hold the lock, or raise RunLocked naming the holder. `takeover`: a stale lock is taken
        over (said in one line on stderr); without it a stale lock is refused too."""
        while not self._create():
            holder = self._read()
            if holder is None:
                continue  # released meanwhile: try again
            folder = self.where
            why = stale_reason(holder, self.stale_s)
            if why is None:
                raise RunLocked(f"job.output_dir {folder} is in use by {describe(holder)}: one run per folder; "
                                "stop that run first, or give this one another job.output_dir")
            if not takeover:
                raise RunLocked(f"job.output_dir {folder} holds the lock of {describe(holder)}, which is gone "
                                f"({why}): pass --resume auto to continue that run, or --overwrite to start a new one")
            if self._read() != holder:
                continue  # someone else took it over or released it: look again
            self._remove()
            print(f"run lock: taking over the stale lock of {describe(holder)}: {why}", file=sys.stderr, flush=True)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    # ---- the lock file: what a lock on another kind of storage replaces (ObjectRunLock) ----------
    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # a reader in between sees no pid: a holder judged by its fresh heartbeat
            f.write(json.dumps(self.record))
        return True

    def _read(self) -> dict | None:
        return read_holder(self.path)

    def _remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _rewrite(self) -> None:
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)  # never absent, never half-written

    def _touch(self) -> None:
        try:
            os.utime(self.path)
        except OSError:  # removed under us: nothing to refresh
            pass

    # ---- the run's side --------------------------------------------------------------------------
    def held(self) -> bool:
        """The lock file is still this run's (not released, not taken over as stale)."""
        holder = self._read()
        return holder is not None and holder.get("token") == self.record["token"]

    def set_run_id(self, run_id: str) -> None:
        """Name the run once it is known (prepare_output decides it under the lock)."""
        self.record["run_id"] = run_id
        if self.held():
            self._rewrite()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self._touch()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still this run's (a run whose lock was
        taken over as stale must not remove its successor's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held():
            self._remove()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class ObjectRunLock(RunLock):
    """The run lock as an object, `<job.output_dir URI>/run.lock`: best effort.

    pyarrow.fs has no create-if-absent (conditional put), so taking the lock is: see that there
    is none, write this run's record, wait `settle_s`, read it back and compare tokens; of two
    runs starting together the later writer wins and the other, reading back the winner's
    record, is refused. Two runs both win only if one takes longer than `settle_s` between its
    look and its write. The heartbeat rewrites the object (its modification time, on the store's
    clock, is the heartbeat) after checking it is still this run's, so a holder that was taken
    over as stale stops beating instead of clobbering its successor; clocks more than `stale_s`
    apart between the store and a host misjudge staleness."""

    SETTLE_S = 2.0

    def __init__(self, store, run_id: str | None = None, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 settle_s: float = SETTLE_S):
        super().__init__(Path("."), run_id, heartbeat_s, stale_s)
        self.store, self.where, self.settle_s = store, store.uri, settle_s

    def acquire(self, takeover: bool = False) -> RunLock:
        try:
            return super().acquire(takeover)
        except OSError as e:  # no such bucket, no credentials, no route: one line naming the URI
            text = str(e).strip().splitlines()
            raise OSError(f"job.output_dir {self.where}: {text[0] if text else type(e).__name__}") from None

    def _create(self) -> bool:
        if self._read() is not None:
            return False
        self._rewrite()
        time.sleep(self.settle_s)  # a run that looked at the same moment writes meanwhile: the later write wins
        return self.held()

    def _read(self) -> dict | None:
        stat, data = self.store.stat(LOCK_FILE), self.store.read(LOCK_FILE)
        if stat is None or data is None:
            return None
        return parse_holder(data, stat[1])

    def _remove(self) -> None:
        self.store.delete(LOCK_FILE)

    def _rewrite(self) -> None:
        self.store.write(LOCK_FILE, json.dumps(self.record).encode())

    def _touch(self) -> None:
        try:
            if self.held():
                self._rewrite()
        except OSError:  # the store unreachable for a while: the next beat tries again
            pass


def lock_for(cfg) -> RunLock:
    """The lock of cfg's job.output_dir: a file, or an object on object storage."""
    from danceopd.storage import is_uri, open_store

    if is_uri(cfg.job.output_dir):
        return ObjectRunLock(open_store(cfg.job.output_dir))
    return RunLock(cfg.output_path)
