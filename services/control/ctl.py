"""The control side of `danceopd status|scale|stop`: the helper job's entrypoint and what it
runs on the head (find the controller in the registry, call its control API over loopback,
print one JSON answer between markers), and how the CLI reads that answer back."""

from __future__ import annotations

import json
import shlex
import urllib.error
import urllib.request

CTL_BEGIN = "<<<DANCEOPD-CTL-JSON "
CTL_END = " DANCEOPD-CTL-JSON>>>"
ACTIONS = ("status", "scale", "stop")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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

        from services.control.registry import lookup

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

    from services.control.requests import control_url

    parts = urlsplit(url)
    if parts.hostname in ("0.0.0.0", "::", "") and parts.port:
        return control_url(parts.hostname, parts.port) + parts.path
    return urlunsplit(parts)


def ctl_print(answer: dict) -> None:
    print(CTL_BEGIN + json.dumps(answer, default=str) + CTL_END, flush=True)


# ---- presentation -------------------------------------------------------------------------------

def format_status(ref, st: dict | None) -> str:
    """`ref`: the jobs.JobRef shown."""
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
