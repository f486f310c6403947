"""What a fleet's `poll` reports to the training loop (both modes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RolledOut:
    """Ticket `ticket`'s rollout is done (its batch is being routed): its worker is free."""

    ticket: int


@dataclass(frozen=True)
class Routed:
    """Ticket `ticket`'s routed batch is done; `handle` is the batch (local) or its ref (Ray);
    `version` is the oldest policy version of its rows."""

    ticket: int
    handle: object
    version: int


@dataclass(frozen=True)
class NonFinite:
    """Ticket `ticket`'s routed batch held NaN/Inf in `what` (the answer of `teacher` for `route`,
    or a routed column): it is dropped before the replay queue and its route owed."""

    ticket: int
    teacher: str
    route: str
    what: str


@dataclass(frozen=True)
class Lost:
    """Ticket `ticket` will never arrive: `member` (a rollout worker or teacher replica) failed."""

    ticket: int
    member: str
    cause: str


@dataclass(frozen=True)
class Traced:
    """Profiler traces a member recorded (`logging.profile_steps`), {file name: Chrome trace
    JSON bytes}, carried back with its answer: the loop writes them to job.output_dir/profile/."""

    traces: dict


@dataclass(frozen=True)
class Joined:
    """Rollout worker `worker` (new or restarted) holds weights of `version`."""

    worker: str
    version: int


@dataclass(frozen=True)
class Applied:
    """Rollout worker `worker` applied weights `version` before a batch (`object_store`: the
    weights ride on its orders); `transfer_s` fetching and loading them, `nbytes` their size."""

    worker: str
    version: int
    transfer_s: float
    nbytes: int
