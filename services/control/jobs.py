"""Job submission and remote control through the Ray Jobs API only.

`danceopd submit` sends `danceopd train <config> --address auto` as a Ray job tagged with
metadata {"danceopd_job": job.name}. It uploads only what the job needs: the danceopd packages
(runtime_env `py_modules`) and a staged working_dir holding the config and the local files it
names through relative paths (data file, its images, model folders), never an arbitrary folder.
Each of them, after `..` and symlinks, must lie inside the config's folder, the data file's folder
or a model folder the config names, and out of credentials folders (`config_inputs`); an explicit
`--working-dir` must hold no credentials and no symlink out of it.

`danceopd status|scale|stop` never connect to the controller directly: the control API binds
loopback on the head by default, and the only port a user is assumed to reach is the Jobs API
(8265). So the CLI submits a short helper job whose entrypoint is the hidden
`danceopd ctl JOB_NAME status|scale|stop ...`. The helper runs on the head, joins the cluster
(`ray.init(address="auto")`), finds the controller's endpoint and token in the registry
(`services.control.registry.lookup`), calls the control API over loopback and prints one JSON answer
between markers. The CLI waits for the helper, parses that answer from its logs and deletes
the helper job. The token never leaves the cluster.

Every failure is a `JobsError`: one line, exit status 2.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from services.control.ctl import (  # noqa: F401 — CTL_* and format_status are used through this module too
    ACTIONS,
    CTL_BEGIN,
    CTL_END,
    _first_line,
    ctl_entrypoint,
    format_status,
    parse_ctl_output,
)

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

META_JOB = "danceopd_job"  # metadata key of training jobs: the danceopd job name
META_CTL = "danceopd_ctl"  # metadata key of helper jobs
EXCLUDES = [".venv", "runs", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"]
PACKAGES = ("danceopd", "services", "learner", "router", "rollout_workers")  # the job's code (py_modules)
# Names that mark credentials: a folder holding one is never uploaded.
SECRETS = {".ssh", ".aws", ".gnupg", ".git-credentials", ".netrc", ".kube", ".docker", ".pypirc", ".env", ".ray",
           ".config", "id_rsa", "id_ecdsa", "id_ed25519"}
MODEL_SKIP = (".*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")  # hidden, or pickle weights (never loaded)


class JobsError(Exception):
    """A one-line error for the user; the CLI prints it and exits with `code`."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(" ".join(str(msg).split()))
        self.code = code


# ---- helpers -----------------------------------------------------------------------------------

def parse_teachers(items: list[str] | None) -> dict[str, int] | None:
    """`["t2i=2", "local_edit=1"]` -> {"t2i": 2, "local_edit": 1}."""
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        route, sep, n = item.partition("=")
        if not sep or not route.strip():
            raise JobsError(f"--teachers {item!r}: expected ROUTE=N, for example --teachers t2i=2")
        try:
            out[route.strip()] = int(n)
        except ValueError:
            raise JobsError(f"--teachers {item!r}: N must be an integer") from None
    return out


STOP_WAIT_S = 120


def package_dirs() -> list[Path]:
    """The source folders of the danceopd code this CLI runs (a checkout or site-packages)."""
    root = Path(__file__).resolve().parents[2]
    return [root / p for p in PACKAGES]


ROOTS = "the config's folder, the data file's folder and the model folders it names"


def _check_staged(path: Path, what: str, roots: list[Path], base: Path) -> None:
    """Refuse to stage `path` unless, after `..` and symlinks, it lies inside one of `roots`, and
    not in a credentials folder (one that `base`, the config's own folder, is not in)."""
    real = Path(os.path.realpath(path))
    if not any(real.is_relative_to(r) for r in roots):
        raise JobsError(f"{what} resolves outside {ROOTS} (to {real}): refused; only files inside them are uploaded")
    secret = next((x for x in real.parts if x in SECRETS and x not in base.parts), None)
    if secret:
        raise JobsError(f"{what} resolves into {secret} (to {real}): refused; credentials are never uploaded")


def _entries(folder: Path, chain: tuple[str, ...] = ()) -> Iterator[Path]:
    """Every path below `folder` that an upload takes (EXCLUDES left out), following symlinks as
    shutil.copytree and Ray's packaging do. Lazy: the caller refuses an entry before its folder is
    entered. A symlink to a folder above it would never end: refused."""
    chain = (*chain, os.path.realpath(folder))
    for entry in sorted(folder.iterdir()):
        if entry.name in EXCLUDES:
            continue
        yield entry
        if entry.is_dir():
            if os.path.realpath(entry) in chain:
                raise JobsError(f"{entry}: refused: a symlink to a folder above it (an upload would never end)")
            yield from _entries(entry, chain)


def check_uploadable(folder: Path, what: str, roots: list[Path] | None = None, base: Path | None = None) -> None:
    """Refuse to upload /, the home folder (or a folder above it), a folder holding credentials, or
    one holding a symlink that resolves outside `roots` (default: the folder itself)."""
    f, home = Path(os.path.abspath(folder)), Path.home().resolve()
    if f == Path(f.anchor) or f.resolve() == home or home.is_relative_to(f.resolve()):
        raise JobsError(f"{what} {folder}: refused: it is / or your home folder (or above it); name a folder "
                        "that holds only what the job needs")
    real = Path(os.path.realpath(f))
    for p in _entries(f):
        if p.name in SECRETS:
            raise JobsError(f"{what} {folder}: refused: it holds {p} (credentials are never "
                            "uploaded); name a folder without it")
        _check_staged(p, f"{what} {folder}: {p.relative_to(f).as_posix()}", roots or [real], base or real)


def config_inputs(config: Path, cfg: Config) -> tuple[dict[Path, str], list[str]]:
    """(the local files and model folders the config names through relative paths, as absolute
    un-resolved paths, each with what names it: a config key, or a data row and column; the
    absolute paths it names, which must exist on the cluster).

    Every local input is checked as `submit` would stage it: after `..` and symlinks it must lie
    inside the config's folder, the data file's folder or a model folder the config names, and out
    of credentials folders (model folders: every file in them too); else a one-line JobsError
    naming the key, or the row and column."""
    from danceopd.dataset import Dataset
    from danceopd.validate import model_paths

    base = Path(os.path.abspath(config)).parent  # lexical: a relative path resolves the same way in the copy
    local: dict[Path, str] = {}
    absolute: list[str] = []

    def ref(key: str, raw: str) -> Path | None:
        p = Path(raw).expanduser()
        if p.is_absolute():
            absolute.append(str(p))
            return None
        path = Path(os.path.normpath(base / p))
        local[path] = key
        return path

    data = ref("data.path", cfg.data.path)
    models = [m for key, raw in model_paths(cfg) if (m := ref(key, raw)) is not None]  # pipelines, checkpoints, LoRA folders
    real_base = Path(os.path.realpath(base))
    roots = [real_base, *(Path(os.path.realpath(m)) for m in models)]
    if data is not None:  # its folder as written (rows are relative to it) and the file's own
        roots += [Path(os.path.realpath(data.parent)), Path(os.path.realpath(data)).parent]
    for path, key in list(local.items()):
        _check_staged(path, key, roots, real_base)
        if path.is_dir():
            check_uploadable(path, key, roots, real_base)
    if data is not None:
        dataset = Dataset.load(data)
        for row in dataset.rows:
            for column in ("source_image", "target_image"):
                img = getattr(row, column)
                if img is None:
                    continue
                if not img.is_relative_to(data.parent):  # written as an absolute path: the cluster's
                    absolute.append(str(img))
                    continue
                what = f"{dataset.where(row)} column {column}: {img.relative_to(data.parent).as_posix()}"
                _check_staged(img, what, roots, real_base)
                local[Path(os.path.normpath(img))] = what
    return local, absolute


def stage_upload(config: Path, cfg: Config, dest: Path, cwd: Path | None = None) -> str:
    """Copy the config and the local inputs it names (`config_inputs`, which checks them) into
    `dest`, each at its path relative to one anchor (the cwd when it holds them all, else their
    common folder), so that the config's relative paths resolve the same way in the copy; nothing
    else is copied. Returns the config's path inside `dest`."""
    cwd = Path(os.path.abspath(cwd or Path.cwd()))
    config = Path(os.path.abspath(config))
    inputs, _ = config_inputs(config, cfg)
    paths = [config, *inputs]
    anchor = cwd if all(p.is_relative_to(cwd) for p in paths) else Path(os.path.commonpath(paths))
    for p in paths:
        target = dest / p.relative_to(anchor)
        target.parent.mkdir(parents=True, exist_ok=True)
        if p.is_dir():  # a model folder: its visible files, safetensors weights only (what config_inputs checked)
            shutil.copytree(p, target, ignore=shutil.ignore_patterns(*MODEL_SKIP, *EXCLUDES), dirs_exist_ok=True)
        else:
            shutil.copy2(p, target)
    return config.relative_to(anchor).as_posix()


def train_entrypoint(rel_config: str, overrides: list[str] | None, resume: str | None = None,
                     overwrite: bool = False) -> str:
    parts = ["danceopd", "train", rel_config, "--address", "auto", "--no-progress"]
    if resume:
        parts += ["--resume", resume]
    if overwrite:
        parts += ["--overwrite"]
    for o in overrides or []:
        parts += ["--set", o]
    return shlex.join(parts)


# ---- the Jobs API ------------------------------------------------------------------------------

def connect(address: str | None):
    """A JobSubmissionClient, with connection and Ray-token problems turned into one line."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    # Ray's packaging chatter (INFO lines, "'.git' is now ignored by default") is noise here:
    # the CLI reports what matters in its own words.
    logging.getLogger("ray").setLevel(logging.ERROR)
    if not address:
        raise JobsError("no Ray Jobs API address: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise JobsError(_auth_hint(address)) from None
    except ConnectionError:
        raise JobsError(f"cannot reach the Ray Jobs API at {address} (connection refused or no dashboard there)") from None
    except (RuntimeError, ValueError) as e:
        raise JobsError(f"Ray Jobs API at {address}: {_first_line(e)}") from None


def _auth_hint(address: str) -> str:
    return (f"the Ray cluster at {address} refused the request (token authentication): set RAY_AUTH_MODE=token "
            f"and provide the cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")




def _api(client, fn, *args, **kw):
    from ray.exceptions import AuthenticationError
    from requests.exceptions import ConnectionError as HTTPConnectionError  # not a builtin ConnectionError

    try:
        return fn(*args, **kw)
    except AuthenticationError:
        raise JobsError(_auth_hint(client.get_address())) from None
    except (ConnectionError, HTTPConnectionError) as e:
        raise JobsError(f"Ray Jobs API at {client.get_address()}: {_first_line(e)}") from None


def _job_info(client, submission_id: str):
    """JobDetails or None when no job has that id."""
    try:
        return _api(client, client.get_job_info, submission_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            return None
        raise JobsError(f"Ray Jobs API: {_first_line(e)}") from None


@dataclass
class JobRef:
    name: str  # the danceopd job name (registry key)
    info: object | None  # the Ray JobDetails of the training job, when one is known

    @property
    def submission_id(self) -> str | None:
        return getattr(self.info, "submission_id", None) if self.info is not None else None

    @property
    def ray_status(self) -> str | None:
        return str(self.info.status.value if hasattr(self.info.status, "value") else self.info.status) \
            if self.info is not None else None

    @property
    def terminal(self) -> bool:
        return self.info is not None and self.info.status.is_terminal()


def training_jobs(client, name: str | None = None) -> list:
    jobs = [j for j in _api(client, client.list_jobs)
            if (j.metadata or {}).get(META_JOB) and not (j.metadata or {}).get(META_CTL)]
    if name is not None:
        jobs = [j for j in jobs if j.metadata[META_JOB] == name]
    return jobs


def resolve_job(client, job: str) -> JobRef:
    """JOB is a submission id (its metadata names the danceopd job) or a danceopd job name
    (its running, else latest, training job, if any was submitted)."""
    if not job or not job.strip():
        raise JobsError("JOB is empty: give a submission id or a job name")
    info = _job_info(client, job)
    if info is not None:
        name = (info.metadata or {}).get(META_JOB)
        if not name or (info.metadata or {}).get(META_CTL):
            raise JobsError(f"Ray job {job} is not a danceopd training job (no {META_JOB!r} in its metadata)")
        return JobRef(name, info)
    matches = training_jobs(client, job)
    if not matches:
        return JobRef(job, None)
    running = [j for j in matches if not j.status.is_terminal()]
    pick = max(running or matches, key=lambda j: j.start_time or 0)
    return JobRef(job, pick)


def submit(client, config: Path, cfg: Config, overrides: list[str] | None, working_dir: Path | None = None,
           resume: str | None = None, overwrite: bool = False) -> str:
    """Submit the training job; returns the submission id. Uploads the danceopd packages
    (py_modules) and, as working_dir, a staging folder with the config and its local inputs
    (`stage_upload`), or the explicit `working_dir` after `check_uploadable`."""
    name = cfg.job.name
    live = [j for j in training_jobs(client, name) if not j.status.is_terminal()]
    if live:
        raise JobsError(f"job.name {name!r} is already running as {live[0].submission_id}; stop it or set another "
                        f"job.name (--set job.name=...)")
    with tempfile.TemporaryDirectory(prefix="danceopd-submit-") as staging:
        if working_dir is None:
            try:
                wd, rel = Path(staging), stage_upload(config, cfg, Path(staging))
            except (OSError, ValueError) as e:  # DatasetError is a ValueError
                raise JobsError(f"staging the upload: {e}") from None
        else:
            wd = working_dir.resolve()
            check_uploadable(wd, "--working-dir")
            try:
                rel = config.resolve().relative_to(wd).as_posix()
            except ValueError:
                raise JobsError(f"{config}: not inside --working-dir {wd}") from None
        runtime_env = {"working_dir": str(wd), "py_modules": [str(p) for p in package_dirs()],
                       "excludes": list(EXCLUDES),
                       # `ray job stop` SIGTERMs the driver, then SIGKILLs it after this many
                       # seconds (Ray's default: 3): time for the final checkpoint.
                       "env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}}
        try:  # the client uploads both before it returns, so the staging folder may go then
            return _api(client, client.submit_job, entrypoint=train_entrypoint(rel, overrides, resume, overwrite),
                        runtime_env=runtime_env, metadata={META_JOB: name, "danceopd_config": rel})
        except (RuntimeError, ValueError) as e:
            raise JobsError(f"submit failed: {_first_line(e)}") from None


def wait_for(client, submission_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
             echo=None) -> object:
    """Poll until the job is terminal; `echo(text)` gets new log output as it appears."""
    t0, shown = time.monotonic(), 0
    while True:
        info = _api(client, client.get_job_info, submission_id)
        if echo is not None:
            logs = _api(client, client.get_job_logs, submission_id)
            if len(logs) > shown:
                echo(logs[shown:])
                shown = len(logs)
        if info.status.is_terminal():
            return info
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            return info
        time.sleep(poll_s)


def run_ctl(client, ref: JobRef, action: str, rollout_workers: int | None = None,
            teachers: dict[str, int] | None = None, timeout_s: float = 120.0) -> dict:
    """Run `danceopd ctl` as a helper job on the head; returns the controller's answer."""
    runtime_env = {"py_modules": [str(p) for p in package_dirs()], "excludes": list(EXCLUDES)}  # this CLI's code
    try:
        sid = _api(client, client.submit_job, entrypoint=ctl_entrypoint(ref.name, action, rollout_workers, teachers),
                   runtime_env=runtime_env, metadata={META_CTL: action, "target": ref.name})
    except (RuntimeError, ValueError) as e:
        raise JobsError(f"could not submit the control helper job: {_first_line(e)}") from None
    try:
        info = wait_for(client, sid, timeout_s=timeout_s, poll_s=0.5)
        logs = _api(client, client.get_job_logs, sid)
        if not info.status.is_terminal():
            _api(client, client.stop_job, sid)
            raise JobsError(f"control helper job {sid} did not finish within {timeout_s:.0f} s")
    finally:
        _delete_quietly(client, sid)
    answer = parse_ctl_output(logs)
    if answer is None:
        tail = " | ".join(line for line in logs.strip().splitlines()[-3:]) or "no output"
        raise JobsError(f"control helper job {sid} ended {info.status} without an answer: {tail}")
    if not answer.get("ok"):
        raise JobsError(answer.get("error") or "control request failed")
    return answer.get("result") or {}


def _delete_quietly(client, sid: str) -> None:
    for _ in range(20):  # a job is deletable only once terminal
        try:
            if client.delete_job(sid):
                return
        except Exception:
            pass
        time.sleep(0.25)
