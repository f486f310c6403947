"""One actor-group abstraction for every role: create, probe, restart with backoff, remove.

Elastic roles (rollout workers, teacher replicas, the singletons) give each member its own
placement group, so the group grows and shrinks one member at a time; the learner is a gang
(one placement group, ranks ordered by node so neighbouring ranks share a node).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from services.runtime.failures import RoleFailure
from services.runtime.placement import RoleSpec


@dataclass
class Member:
    name: str
    actor: object
    pg: object = None
    bundle_index: int = 0
    restarts: int = 0
    started: float = field(default_factory=time.time)

    @property
    def incarnation(self) -> str:
        """The current actor's id: a failure reported by an earlier incarnation (already
        replaced) must not restart its replacement."""
        return self.actor._actor_id.hex()


class StartTimeout(TimeoutError):
    """A member's constructor did not finish in time (a hung model load)."""


START_NS = "danceopd-start"  # GCS key-value namespace: actor id -> its constructor began


def mark_started() -> None:
    """First thing in a member's constructor: its start-up deadline counts from here, so a slow
    process boot or a node busy starting many workers is not counted as a hung start."""
    from ray.experimental.internal_kv import _internal_kv_put

    try:
        _internal_kv_put(ray.get_runtime_context().get_actor_id(), b"1", namespace=START_NS)
    except Exception:  # noqa: BLE001 — a busy GCS must not fail the start: the deadline then never runs
        pass


def _began(actor) -> bool:
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get

    key = actor._actor_id.hex()
    try:
        if _internal_kv_get(key, namespace=START_NS) is None:
            return False
        _internal_kv_del(key, namespace=START_NS)
    except Exception:  # noqa: BLE001 — a busy GCS: look again at the next poll
        return False
    return True


@dataclass
class Pending:
    """A member on its way in: its placement group waits for the cluster (the autoscaler may be
    adding a node), then its actor starts and answers a first call (`probe`). Only then does it
    join the group. A new member, a restarted one (after its backoff) and one of the job's
    start all take this path, so none of them blocks the loop."""

    name: str
    pg: object  # None when the role reserves nothing
    since: float = field(default_factory=time.perf_counter)
    restarts: int = 0  # the member's restart count, carried into the Member
    not_before: float = 0.0  # a restart's backoff: the actor starts no earlier
    actor: object = None  # once placed
    probe: object = None  # the placed actor's first answer
    started: float = 0.0  # when its constructor began (mark_started): the start-up deadline counts from here
    checked: float = 0.0  # when that was last looked up

    def __post_init__(self):
        self.ready = self.pg.ready() if self.pg is not None else None


def on(pg, bundle: int = 0) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)


class ActorGroup:
    """Named actors of one role. `make(name, options)` creates one actor with the given Ray
    options (resources, scheduling strategy, concurrency)."""

    def __init__(self, role: str, spec: RoleSpec, make, pg_timeout_s: float = 300.0, probe=None):
        self.role, self.spec, self.make = role, spec, make
        self.probe = probe or (lambda actor: actor.get_stats.remote())  # a started actor's first answer
        self.pg_timeout_s = pg_timeout_s
        self.members: dict[str, Member] = {}
        self.pending: dict[str, Pending] = {}
        self.restarts_total = 0
        self.failures_total = 0  # deaths and missed deadlines, the fatal last one included
        self._next = 0
        self._gang_pg = None

    def _options(self, pg, index: int) -> dict:
        opts = self.spec.actor_options(in_group=pg is not None)
        if self.spec.max_concurrency > 1:
            opts["max_concurrency"] = self.spec.max_concurrency
        if pg is not None:
            opts["scheduling_strategy"] = on(pg, index)
        return opts

    def _reserve(self, n: int, bundle: dict | None = None, strategy: str = "PACK"):
        """A placement group of n bundles on nodes that carry the role's labels."""
        labels = [self.spec.label_selector] * n if self.spec.labels else None
        return placement_group([bundle or self.spec.bundle] * n, strategy=strategy, bundle_label_selector=labels)

    def add_later(self, name: str | None = None, restarts: int = 0, delay_s: float = 0.0) -> Pending:
        """Ask for a member without waiting: `poll_pending` starts it once the cluster placed it
        and reports it once it answered."""
        if name is None:
            name = f"{self.role}-{self._next}"
            self._next += 1
        pg = self._reserve(1) if self.spec.bundle else None
        self.pending[name] = p = Pending(name, pg, restarts=restarts, not_before=time.perf_counter() + delay_s)
        return p

    def restart_later(self, name: str, cause: str = "") -> Pending:
        """Replace a dead, hung or never-started member without waiting for its replacement: a
        fresh placement group (the old one may sit on a node that is gone), a backoff, then the
        pending path. One failure of the member's restart budget, as `restart`."""
        m = self.members[name]
        self._count_failure(m, cause)
        del self.members[name]
        try:
            ray.kill(m.actor, no_restart=True)  # a hung member must not answer late
        except Exception:  # noqa: BLE001 — already gone
            pass
        if m.pg is not None:
            remove_placement_group(m.pg)
        return self.add_later(name, m.restarts + 1, delay_s=min(0.5 * 2 ** m.restarts, 10.0))

    def _count_failure(self, m: Member, cause: str) -> None:
        self.failures_total += 1
        if m.restarts >= self.spec.max_restarts:
            last = f"; last: {cause}" if cause else ""
            raise RoleFailure(f"{self.role} {m.name}: failed {m.restarts + 1} times (max_restarts={self.spec.max_restarts}){last}")
        self.restarts_total += 1

    def poll_pending(self, timeout_s: float, start_s: float = float("inf")) -> tuple[list[tuple[Member, object]], list[tuple[str, BaseException]], list[str]]:
        """Advance every pending member: (joined: (member, its probe's answer); failed: (name,
        error) of members that died, raised or whose constructor did not finish within `start_s`
        of beginning (a hung model load) — members now, for the caller to `restart_later` or
        `remove`; expired: names not placed within `timeout_s`, their placement groups removed so
        nothing stays reserved)."""
        joined, failed, expired = [], [], []
        now = time.perf_counter()
        for name, p in list(self.pending.items()):
            if p.actor is None:
                placed = p.ready is None or ray.wait([p.ready], timeout=0)[0]
                if placed and now >= p.not_before:
                    p.actor = self.make(name, self._options(p.pg, 0))
                    p.probe = self.probe(p.actor)
                elif not placed and now - p.since > timeout_s:
                    del self.pending[name]
                    remove_placement_group(p.pg)
                    expired.append(name)
        probes = {p.probe: p for p in self.pending.values() if p.probe is not None}
        done = ray.wait(list(probes), num_returns=len(probes), timeout=0)[0] if probes else []
        for ref in done:
            p = probes[ref]
            del self.pending[p.name]
            m = self.members[p.name] = Member(p.name, p.actor, p.pg, restarts=p.restarts)
            try:
                joined.append((m, ray.get(ref)))
            except Exception as e:  # noqa: BLE001 — the caller decides: restart or remove
                failed.append((p.name, e))
        for p in [p for p in self.pending.values() if p.probe is not None]:
            if not p.started and now - p.checked > 0.25:  # a few lookups a second, only while starting
                p.checked = now
                if _began(p.actor):
                    p.started = now
            # Until its constructor begins, the process boots and imports (slow on a node starting
            # many at once): Ray's own worker start-up timeout covers that part.
            if not p.started or now - p.started <= start_s:
                continue
            del self.pending[p.name]
            self.members[p.name] = Member(p.name, p.actor, p.pg, restarts=p.restarts)
            failed.append((p.name, StartTimeout(f"its constructor did not finish within deadlines.start_s={start_s:g}")))
        return joined, failed, expired

    def cancel_pending(self, n: int) -> list[str]:
        """Give up the `n` newest pending members (a scale-down while they wait)."""
        names = list(self.pending)[::-1][:n]
        for name in names:
            p = self.pending.pop(name)
            if p.actor is not None:
                ray.kill(p.actor, no_restart=True)
            if p.pg is not None:
                remove_placement_group(p.pg)
        return names

    def reserve_gang(self, n: int) -> tuple[object, int]:
        """One placement group of n bundles; returns it and the bundle rank 0 will use."""
        self._gang_pg = pg = self._reserve(n, self.spec.bundle or {"CPU": 0.01}, self.spec.strategy)
        ray.get(pg.ready(), timeout=self.pg_timeout_s)
        nodes = placement_group_table(pg)["bundles_to_node_id"]
        self._gang_order = sorted(range(n), key=lambda b: (nodes[b], b))  # ranks ordered by node
        return pg, self._gang_order[0]

    def add_gang(self) -> list[Member]:
        """The reserved gang's members, rank r in the r-th bundle by node order."""
        for rank, b in enumerate(self._gang_order):
            name = f"{self.role}-{rank}"
            self.members[name] = Member(name, self.make(name, self._options(self._gang_pg, b)), None, b)
        self._next = len(self._gang_order)
        return list(self.members.values())

    def remove(self, name: str) -> None:
        m = self.members.pop(name)
        ray.kill(m.actor, no_restart=True)
        if m.pg is not None:
            remove_placement_group(m.pg)

    def names(self) -> list[str]:
        return list(self.members)

    def actors(self) -> list:
        return [m.actor for m in self.members.values()]

    @property
    def only(self):
        """The actor of a one-member group (router, replay queue, weight store)."""
        (m,) = self.members.values()
        return m.actor

    def shutdown(self) -> None:
        self.cancel_pending(len(self.pending))
        for n in list(self.members):
            self.remove(n)
        if self._gang_pg is not None:
            remove_placement_group(self._gang_pg)
            self._gang_pg = None
