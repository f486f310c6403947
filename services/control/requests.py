"""What a control request may hold: the /scale body's shape, the token, the URL that reaches a
bind address, and when a status counts as stalled. Plain functions: the server and the CLI share them."""

from __future__ import annotations

import os
import secrets

_SCALE_KEYS = {"rollout_workers", "teachers"}


class BadRequest(ValueError):
    """A request the API refuses with 400."""


class TooLarge(BadRequest):
    """A body over MAX_BODY_BYTES: 413."""


def resolve_token(env_name: str) -> str:
    """The control token: `$env_name` when set and non-empty, else a fresh random one."""
    value = os.environ.get(env_name, "").strip()
    return value or secrets.token_urlsafe(32)


def control_url(host: str, port: int) -> str:
    """URL a process on the same node uses to reach a server bound to (host, port): a
    wildcard bind (0.0.0.0, ::, '') is reached over loopback."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("::", "[::]"):  # an IPv6 wildcard bind may take IPv6 only
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def parse_scale_request(body: object) -> tuple[int | None, dict[str, int] | None]:
    """Check the shape of a /scale body; the controller checks the meaning (routes, bounds)."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object like {\"rollout_workers\": 2, \"teachers\": {\"t2i\": 2}}")
    unknown = sorted(set(body) - _SCALE_KEYS)
    if unknown:
        raise BadRequest(f"unknown key {unknown[0]!r} (known: rollout_workers, teachers)")
    rollout = body.get("rollout_workers")
    teachers = body.get("teachers")
    if rollout is None and not teachers:
        raise BadRequest("nothing to scale: give rollout_workers and/or teachers")
    if rollout is not None and (isinstance(rollout, bool) or not isinstance(rollout, int)):
        raise BadRequest(f"rollout_workers: expected an integer, got {rollout!r}")
    if teachers is not None:
        if not isinstance(teachers, dict):
            raise BadRequest("teachers: expected an object {route: replicas}")
        for route, n in teachers.items():
            if isinstance(n, bool) or not isinstance(n, int):
                raise BadRequest(f"teachers.{route}: expected an integer, got {n!r}")
    return rollout, (dict(teachers) if teachers else None)


def stall(st: dict, stall_after_s: float) -> str | None:
    """Why a status dict counts as stalled, or None: no learner step for more than
    `stall_after_s`, counted from the last step, or from the job's start (`uptime_s`) before the
    first. A finished job never stalls."""
    if st.get("state") == "done":
        return None
    age, up = st.get("last_step_age_s"), st.get("uptime_s")
    if age is not None and float(age) > stall_after_s:
        return f"no learner step for {float(age):.0f} s (stall threshold {stall_after_s:.0f} s)"
    if age is None and up is not None and float(up) > stall_after_s:
        return f"no learner step in the {float(up):.0f} s since the job started (stall threshold {stall_after_s:.0f} s)"
    return None
