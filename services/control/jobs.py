"""Job submission and remote control through the Ray Jobs API only.

`danceopd submit` sends `danceopd train <config> --address auto` as a Ray job (the working
directory travels as the job's runtime_env) tagged with metadata {"danceopd_job": job.name}.

`danceopd status|scale|stop` never connect to the controller directly: the control API binds
loopback on the head by default, and the only port a user is assumed to reach is the Jobs API
(8265). So the CLI submits a short helper job whose entrypoint is the hidden
`danceopd ctl JOB_NAME status|scale|stop ...`. The helper runs on the head, joins the cluster
(`ray.init(address="auto")`), finds the controller's endpoint and token in the registry
(`services.control.api.lookup`), calls the control API over loopback and prints one JSON answer
between markers. The CLI waits for the helper, parses that answer from its logs and deletes
the helper job. The token never leaves the cluster.

Every failure is a `JobsError`: one line, exit status 2.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

META_JOB = "danceopd_job"  # metadata key of training jobs: the danceopd job name
META_CTL = "danceopd_ctl"  # metadata key of helper jobs
CTL_BEGIN = "<<<DANCEOPD-CTL-JSON "
CTL_END = " DANCEOPD-CTL-JSON>>>"
EXCLUDES = [".venv", "runs", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"]
ACTIONS = ("status", "scale", "stop")


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


def repo_root(start: Path) -> Path | None:
    """The danceopd checkout containing `start` (a folder with pyproject.toml and services/cli.py)."""
    start = start.resolve()
    for p in (start, *start.parents):
        if (p / "pyproject.toml").is_file() and (p / "services" / "cli.py").is_file():
            return p
    return None


def working_dir_for(config: Path, cwd: Path | None = None) -> tuple[Path, str]:
    """(working dir to ship, config path relative to it): the repo root when the cwd is inside
    a danceopd checkout, else the cwd. The config must live inside it (it travels with it)."""
    cwd = (cwd or Path.cwd()).resolve()
    wd = repo_root(cwd) or cwd
    cfg = config.resolve()
    try:
        rel = cfg.relative_to(wd)
    except ValueError:
        raise JobsError(f"{config}: the config must be inside the working directory that is shipped to the "
                        f"cluster ({wd}); copy it there or run from the folder that contains it") from None
    return wd, rel.as_posix()


def train_entrypoint(rel_config: str, overrides: list[str] | None) -> str:
    parts = ["danceopd", "train", rel_config, "--address", "auto", "--no-progress"]
    for o in overrides or []:
        parts += ["--set", o]
    return shlex.join(parts)


def ctl_entrypoint(job_name: str, action: str, rollout_workers: int | None = None,
                   teachers: dict[str, int] | None = None) -> str:
    parts = ["danceopd", "ctl", job_name, action]
    if rollout_workers is not None:
        parts += ["--rollout-workers", str(rollout_workers)]
    for route, n in (teachers or {}).items():
        parts += ["--teachers", f"{route}={n}"]
    return shlex.join(parts)


def parse_ctl_output(logs: str) -> dict | None:
    """The last JSON answer the helper printed between the markers, or None."""
    end = logs.rfind(CTL_END)
    if end < 0:
        return None
    begin = logs.rfind(CTL_BEGIN, 0, end)
    if begin < 0:
        return None
    try:
        return json.loads(logs[begin + len(CTL_BEGIN):end])
    except json.JSONDecodeError:
        return None


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _api(client, fn, *args, **kw):
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kw)
    except AuthenticationError:
        raise JobsError(_auth_hint(client.get_address())) from None
    except ConnectionError as e:
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


def submit(client, config: Path, cfg, overrides: list[str] | None, working_dir: Path | None = None) -> str:
    """Submit the training job; returns the submission id."""
    if working_dir is None:
        wd, rel = working_dir_for(config)
    else:
        wd = working_dir.resolve()
        try:
            rel = config.resolve().relative_to(wd).as_posix()
        except ValueError:
            raise JobsError(f"{config}: not inside --working-dir {wd}") from None
    name = cfg.job.name
    live = [j for j in training_jobs(client, name) if not j.status.is_terminal()]
    if live:
        raise JobsError(f"job.name {name!r} is already running as {live[0].submission_id}; stop it or set another "
                        f"job.name (--set job.name=...)")
    try:
        return _api(client, client.submit_job, entrypoint=train_entrypoint(rel, overrides),
                    runtime_env={"working_dir": str(wd), "excludes": list(EXCLUDES)},
                    metadata={META_JOB: name, "danceopd_config": rel})
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
    runtime_env = {}
    root = repo_root(Path.cwd())
    if root is not None:  # run the same code as this CLI; else the danceopd installed on the head
        runtime_env = {"working_dir": str(root), "excludes": list(EXCLUDES)}
    try:
        sid = _api(client, client.submit_job, entrypoint=ctl_entrypoint(ref.name, action, rollout_workers, teachers),
                   runtime_env=runtime_env or None, metadata={META_CTL: action, "target": ref.name})
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


# ---- the helper job (runs on the head) ---------------------------------------------------------

class CtlError(Exception):
    pass


def ctl_request(url: str, token: str, action: str, body: dict | None = None, timeout_s: float = 30.0) -> dict:
    """Call the control API: GET /status, POST /scale or POST /stop."""
    method, path = ("GET", "/status") if action == "status" else ("POST", f"/{action}")
    data = json.dumps(body or {}).encode() if method == "POST" else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return json.loads(r.read().decode() or "{}")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read().decode()).get("error", "")
        except Exception:
            msg = ""
        raise CtlError(f"controller refused {method} {path} ({e.code}): {msg or e.reason}") from None
    except urllib.error.URLError as e:
        raise CtlError(f"cannot reach the controller at {url}: {e.reason}") from None
    except (TimeoutError, OSError) as e:
        raise CtlError(f"cannot reach the controller at {url}: {e}") from None


def ctl_main(job_name: str, action: str, rollout_workers: int | None = None,
             teachers: dict[str, int] | None = None) -> dict:
    """What the helper job does; returns {"ok": ..., "result"|"error": ...} (never raises)."""
    try:
        if action not in ACTIONS:
            raise CtlError(f"unknown action {action!r} ({', '.join(ACTIONS)})")
        import ray

        from services.control.api import lookup

        ray.init(address="auto", log_to_driver=False, logging_level="ERROR")
        try:
            info = lookup(job_name)
        finally:
            ray.shutdown()
        if info is None:
            raise CtlError(f"no controller registered for job {job_name!r} on this cluster "
                           f"(not started yet, finished, or another job name)")
        body = None
        if action == "scale":
            body = {k: v for k, v in (("rollout_workers", rollout_workers), ("teachers", teachers)) if v is not None}
        result = ctl_request(_loopback(info["url"]), info["token"], action, body)
        return {"ok": True, "result": result}
    except CtlError as e:
        return {"ok": False, "error": str(e)}
    except Exception as e:  # the helper must always answer in one line
        return {"ok": False, "error": f"control helper: {type(e).__name__}: {_first_line(e)}"}


def _loopback(url: str) -> str:
    """A controller bound to a wildcard address (0.0.0.0 on a cluster head) is called over loopback."""
    from urllib.parse import urlsplit, urlunsplit

    from services.control.api import control_url

    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::", "") and parts.port:
        return control_url("0.0.0.0", parts.port) + parts.path
    return urlunsplit(parts)


def ctl_print(answer: dict) -> None:
    print(CTL_BEGIN + json.dumps(answer, default=str) + CTL_END, flush=True)


# ---- presentation -------------------------------------------------------------------------------

def format_status(ref: JobRef, st: dict | None) -> str:
    lines = []
    head = f"job {ref.name}"
    if ref.submission_id:
        head += f" ({ref.submission_id})"
    head += f": Ray job {ref.ray_status or 'unknown (not submitted with danceopd submit)'}"
    if st is not None:
        head += f", controller {st.get('state', '?')}"
    elif ref.terminal:
        head += ", controller not running"
    lines.append(head)
    if st is None:
        return "\n".join(lines)
    sps, age = st.get("samples_per_s"), st.get("last_step_age_s")
    line = f"step {st.get('step', '?')}/{st.get('steps', '?')}"
    line += f"  samples/s {sps:.1f}" if isinstance(sps, (int, float)) else f"  samples/s {sps or '-'}"
    line += f"  lag {st.get('lag_last', '-')} (max {st.get('lag_max', '-')}, bound {st.get('lag_bound', '-')})"
    if isinstance(age, (int, float)):
        line += f"  last step {age:.1f} s ago"
    lines.append(line)
    w = st.get("workers") or {}
    teachers = w.get("teacher") or {}
    tpart = " ".join(f"{k}={v}" for k, v in teachers.items()) if isinstance(teachers, dict) else str(teachers)
    lines.append(f"workers: rollout {w.get('rollout', '?')}, learner {w.get('learner', '?')}, teacher {tpart or '-'}")
    lines.append(f"last checkpoint: {st.get('last_checkpoint') or '-'}")
    if st.get("output_dir"):
        lines.append(f"output: {st['output_dir']}")
    return "\n".join(lines)
