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


@dataclass
class Pending:
    """A member whose placement group the cluster has not placed yet."""

    name: str
    pg: object
    ready: object  # the placement group's ready() ref
    since: float = field(default_factory=time.perf_counter)


def on(pg, bundle: int = 0) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)


class ActorGroup:
    """Named actors of one role. `make(name, options)` creates one actor with the given Ray
    options (resources, scheduling strategy, concurrency)."""

    def __init__(self, role: str, spec: RoleSpec, make, pg_timeout_s: float = 300.0):
        self.role, self.spec, self.make = role, spec, make
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

    def add(self, name: str | None = None) -> Member:
        name = name or f"{self.role}-{self._next}"
        self._next += 1
        pg = None
        if self.spec.bundle:
            pg = self._reserve(1)
            ray.get(pg.ready(), timeout=self.pg_timeout_s)
        m = Member(name, self.make(name, self._options(pg, 0)), pg)
        self.members[name] = m
        return m

    def add_later(self) -> Pending | Member:
        """Ask for a member without waiting for the cluster to place it: `poll_pending` turns it
        into a member once placed (a member at once when the role reserves nothing)."""
        if not self.spec.bundle:
            return self.add()
        name = f"{self.role}-{self._next}"
        self._next += 1
        pg = self._reserve(1)
        self.pending[name] = p = Pending(name, pg, pg.ready())
        return p

    def poll_pending(self, timeout_s: float) -> tuple[list[Member], list[str]]:
        """(members placed since the last poll, names given up after `timeout_s` unplaced: their
        placement groups are removed, so nothing is left reserved)."""
        placed, expired = [], []
        for name, p in list(self.pending.items()):
            done, _ = ray.wait([p.ready], timeout=0)
            if done:
                del self.pending[name]
                m = Member(name, self.make(name, self._options(p.pg, 0)), p.pg)
                self.members[name] = m
                placed.append(m)
            elif time.perf_counter() - p.since > timeout_s:
                del self.pending[name]
                remove_placement_group(p.pg)
                expired.append(name)
        return placed, expired

    def cancel_pending(self, n: int) -> list[str]:
        """Give up the `n` newest pending members (a scale-down while they wait)."""
        names = list(self.pending)[::-1][:n]
        for name in names:
            remove_placement_group(self.pending.pop(name).pg)
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

    def restart(self, name: str, cause: str = "") -> Member:
        """Replace a dead or hung member (same name, same placement) after a backoff. The budget
        counts failures of the member, one per incarnation."""
        m = self.members[name]
        self.failures_total += 1
        if m.restarts >= self.spec.max_restarts:
            last = f"; last: {cause}" if cause else ""
            raise RoleFailure(f"{self.role} {name}: failed {m.restarts + 1} times (max_restarts={self.spec.max_restarts}){last}")
        try:
            ray.kill(m.actor, no_restart=True)  # a hung member must not answer late
        except Exception:  # noqa: BLE001 — already gone
            pass
        time.sleep(min(0.5 * 2 ** m.restarts, 10.0))
        m.restarts += 1
        self.restarts_total += 1
        m.actor = self.make(name, self._options(m.pg or self._gang_pg, m.bundle_index))
        m.started = time.time()
        return m

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
