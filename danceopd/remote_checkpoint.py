"""Checkpoints and run files on object storage (job.output_dir an s3://, gs:// or file:// URI).

An object store has no rename and no append, so danceopd.checkpoint's rules take this form:
  - a checkpoint is staged in the local staging folder (cfg.output_path/checkpoints/step-N, as
    in a local output_dir), its files are uploaded under <uri>/checkpoints/step-N/, and COMPLETE
    (every object under that prefix with its size, from a listing after the upload) is written
    last. A prefix without COMPLETE is not a checkpoint: `--resume auto` skips it, saying so.
  - learner ranks (maybe on other nodes) upload their own files under the prefix
    (danceopd.storage.writing): `require` and COMPLETE see them in the listing.
  - a checkpoint loses COMPLETE before its objects are deleted (pruning) or replaced (the same
    step saved again: until the new COMPLETE lands, `--resume auto` takes the one before).
  - a resume downloads the chosen checkpoint to cfg.output_path/.downloads/step-N with an ORIGIN
    file naming its URI (learner ranks fetch their own files from there), after checking the
    sizes COMPLETE records against a listing; damage() then checks the copy as a local one.
  - run.json is uploaded whenever it changes; metrics.jsonl is appended to locally and uploaded
    whole with every checkpoint and when the job ends (with summary.json, or error.log when it
    fails), and downloaded by the next `train` into that URI before anything else.
    TensorBoard, sample grids and plots stay in the staging folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from danceopd.checkpoint import PREFIX, RUN_FILE, CheckpointError, checkpoints_root, damage
from danceopd.storage import ORIGIN, Store, is_uri, open_store

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

DOWNLOADS = ".downloads"  # staging copies of checkpoints to resume from
METRICS = "metrics.jsonl"


def remote_output(cfg: Config) -> RemoteOutput | None:
    """The object-storage side of cfg's job.output_dir, or None for a local folder."""
    return RemoteOutput(cfg.job.output_dir, cfg.output_path) if is_uri(cfg.job.output_dir) else None


def push(cfg: Config, *names: str) -> None:
    """Upload the named run files from the staging folder (nothing for a local output_dir)."""
    remote = remote_output(cfg)
    if remote is not None:
        remote.push(*names)


class RemoteOutput:
    def __init__(self, uri: str, staging: Path):
        self.store = open_store(uri)
        self.uri, self.staging = self.store.uri, Path(staging)

    # ---- run files ---------------------------------------------------------------------------
    def push(self, *names: str) -> None:
        for name in names:
            if (self.staging / name).is_file():
                self.store.upload(self.staging / name, name)

    def start(self) -> None:
        """Before a run decides anything: the staging folder drops what an earlier run on this
        machine left in it (checkpoint copies, run files) and takes the store's run.json and
        metrics.jsonl."""
        self.staging.mkdir(parents=True, exist_ok=True)
        for folder in (checkpoints_root(self.staging), self.staging / DOWNLOADS):
            shutil.rmtree(folder, ignore_errors=True)
        for name in (RUN_FILE, METRICS):
            (self.staging / name).unlink(missing_ok=True)
            self.store.download(name, self.staging / name)

    # ---- checkpoints -------------------------------------------------------------------------
    def prefixes(self) -> dict[str, dict[str, int]]:
        """Every step-N prefix under checkpoints/, complete or not: its objects and sizes."""
        found: dict[str, dict[str, int]] = {}
        for name, size in self.store.files("checkpoints").items():
            head, _, rest = name.partition("/")
            if head.startswith(PREFIX) and rest:
                found.setdefault(head, {})[rest] = size
        return dict(sorted(found.items()))

    def checkpoints(self) -> list[str]:
        """The names of the complete checkpoints, oldest first."""
        return [name for name, files in self.prefixes().items() if "COMPLETE" in files]

    def uri_of(self, name: str) -> str:
        return self.store.child(f"checkpoints/{name}")

    def run_id_of(self, name: str) -> str | None:
        try:
            return json.loads(self.store.read(f"checkpoints/{name}/state.json") or b"null").get("run_id")
        except (ValueError, AttributeError):
            return None

    @contextlib.contextmanager
    def checkpoint(self, step: int):
        """Yields an empty local folder to write checkpoint `step` into (an ORIGIN file in it
        names its prefix, for the learner ranks). When the block ends, its files are uploaded,
        then COMPLETE; after an error, what was uploaded is deleted again."""
        name = f"{PREFIX}{step:08d}"
        prefix = f"checkpoints/{name}"
        local = checkpoints_root(self.staging) / name
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        self.store.delete(f"{prefix}/COMPLETE")  # first: a same-step checkpoint stops being one
        self.store.delete_prefix(prefix)  # what an upload that did not finish left
        (local / ORIGIN).write_text(self.store.child(prefix))
        try:
            yield local
            for f in sorted(local.rglob("*")):
                if f.is_file() and f.name != ORIGIN:
                    self.store.upload(f, f"{prefix}/{f.relative_to(local).as_posix()}")
            files = self.store.files(prefix)  # the ranks' own uploads too
            self.store.write(f"{prefix}/COMPLETE", json.dumps({"step": step, "files": files}, indent=1).encode())
        except BaseException:
            with contextlib.suppress(Exception):  # best effort: a prefix without COMPLETE is ignored anyway
                self.store.delete_prefix(prefix)
            raise
        finally:
            shutil.rmtree(local, ignore_errors=True)  # the store holds it now

    def damage(self, name: str) -> str | None:
        return remote_damage(self.store, f"checkpoints/{name}", self.prefixes().get(name, {}))

    def prune(self, keep: int, run_id: str, step: int) -> None:
        """danceopd.checkpoint.prune on the store: the checkpoint of `step` and the newest
        `keep - 1` others of run `run_id` stay, and the newest undamaged one (by its sizes)."""
        written = f"{PREFIX}{step:08d}"
        mine = [n for n in self.checkpoints() if n != written and self.run_id_of(n) == run_id]
        doomed = mine[:max(len(mine) - (keep - 1), 0)]
        if doomed and self.damage(written):
            resume_point = next((n for n in reversed(mine) if not self.damage(n)), None)
            doomed = [n for n in doomed if n != resume_point]
        for n in doomed:
            self.store.delete(f"checkpoints/{n}/COMPLETE")  # first: never a half-deleted checkpoint
            self.store.delete_prefix(f"checkpoints/{n}")

    def resolve(self, resume: str, run_id: str | None) -> Path | None:
        """danceopd.checkpoint.resolve_resume with this store as output_dir: `auto` downloads the
        newest undamaged checkpoint of run `run_id`, saying in one line each one it skips."""
        if resume != "auto":
            from danceopd.checkpoint import resolve_resume

            return resolve_resume(self.staging, resume, run_id)
        for name, files in reversed(self.prefixes().items()):
            local = self.staging / DOWNLOADS / name
            why = remote_damage(self.store, f"checkpoints/{name}", files) or fetch(self.store, f"checkpoints/{name}",
                                                                                    files, local)
            if why:
                print(f"--resume auto: skipping {name}, it is {why}", file=sys.stderr, flush=True)
            elif run_id is None or json.loads((local / "state.json").read_text()).get("run_id") == run_id:
                return local
            shutil.rmtree(local, ignore_errors=True)
        return None


def remote_damage(store: Store, prefix: str, files: dict[str, int]) -> str | None:
    """Why checkpoint `prefix` (its objects and sizes: `files`) is not one to resume from, from
    its listing and COMPLETE alone ('incomplete: ...' or 'damaged: ...'), or None."""
    if "COMPLETE" not in files:
        return "incomplete: no COMPLETE object (its upload did not finish)"
    try:
        record = json.loads(store.read(f"{prefix}/COMPLETE") or b"")
    except ValueError:
        return "damaged: COMPLETE does not parse"
    for name, size in (record.get("files", {}) if isinstance(record, dict) else {}).items():
        if name not in files:
            return f"damaged: {name} is missing"
        if files[name] != size:
            return f"damaged: {name} is {files[name]} bytes, {size} were written"
    return None


def fetch(store: Store, prefix: str, files: dict[str, int], local: Path) -> str | None:
    """Download checkpoint `prefix` into the folder `local` (with an ORIGIN file); why the copy
    is damaged ('damaged: ...'), or None."""
    shutil.rmtree(local, ignore_errors=True)
    for name in files:
        store.download(f"{prefix}/{name}", local / name)
    (local / ORIGIN).write_text(store.child(prefix))
    why = damage(local)
    return f"damaged: {why}" if why else None


def fetch_uri(uri: str, downloads: Path, what: str = "--resume") -> Path:
    """`--resume URI` (or `what`: another command's checkpoint argument): the checkpoint at `uri`,
    downloaded under `downloads`, or a one-line FileNotFoundError / CheckpointError."""
    store = open_store(uri)
    files = store.files()
    if "COMPLETE" not in files:
        raise FileNotFoundError(f"{what} {uri}: not a complete checkpoint (no COMPLETE object under it)")
    local = Path(downloads) / store.uri.rsplit("/", 1)[-1]
    why = remote_damage(store, "", files) or fetch(store, "", files, local)
    if why:
        raise CheckpointError(f"{what} {uri}: the checkpoint is {why}")
    return local
