"""The rollout pipeline: the one ledger of a job's batches, in the driver.

Pure Python — no Ray, no clock — so the logic both modes run is unit-tested on its own. It holds
tickets, routes, versions, the replay contents (each routed batch's handle: an object ref in Ray
mode, the batch itself in one process) and the latest weights; nothing else keeps a copy.

- Every rollout batch is a *ticket*, numbered by the router in hand-out order.
- **Gate** (`on_stale: wait`): the batch at consumption position p is trained on at step
  p // per_step, so it may be issued to a worker holding version v only if
  v >= p // per_step - max_policy_lag. Positions count tickets that are not lost, so losing a
  ticket only moves later ones earlier (never past their bound). `on_stale: drop` never waits;
  `take` drops what is too stale.
- **Backpressure**: batches in flight + waiting for their turn + queued never exceed the replay
  capacity, and no more are issued than the remaining steps need.
- **Ticket order**: routed batches join the replay queue in ticket order (a lost ticket is
  skipped), so what the learner consumes does not depend on which worker was faster.
- **One route per update** (`by_route`, routing.granularity update): a lost or dropped batch
  leaves its update short, so its route is *owed*: the next order handed out is of that route.
  Losing or dropping frees the capacity slot the replacement takes, so this never deadlocks;
  a step takes the oldest queued batch's route once it has a full step queued.
  With accumulation groups (`groups`: route -> group) the same holds per group: a step takes,
  for every group, per_step / groups batches of the route of that group's oldest queued batch;
  no route is in two groups, so an owed route refills its own group's share.
- **Non-finite values** never reach the learner's weights: a routed batch with NaN/Inf in its
  teacher's answer is refused before the replay queue, and a learner step that went non-finite
  is skipped (not a step: the counter stays, its batches are dropped). Either way the samples
  are dropped as `nonfinite`, the positions given back (as for a lost ticket) and the routes
  owed; the counts in a row are returned, for the loop to end a run of them.
- **Resume point**: the first ticket not yet consumed; the router's state from just before it
  is what a checkpoint stores.

Sample accounting (`counts`): issued = produced + lost + in flight, and
produced = consumed + dropped + queued (waiting for their turn or in the replay queue). At the
end of a job both close with nothing in flight or queued: queued batches are dropped as
`unconsumed`, and batches still in flight when a graceful stop's grace runs out are closed as
produced and dropped as `stopped` (never learned on; a resume re-issues them).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass


@dataclass
class Ticket:
    ticket: int
    worker: str
    samples: int
    rolled_out: bool = False  # the worker is done with it (it is being routed)


@dataclass
class Queued:
    """A routed batch in the replay queue (or waiting for its turn to enter it)."""

    ticket: int
    samples: int
    version: int  # the oldest policy version of its rows
    route: str
    handle: object


@dataclass
class Take:
    """What one learner step consumes: handles in ticket order, and what was dropped on the way."""

    handles: list
    tickets: list[int]
    versions: list[int]
    dropped: dict[int, int]  # ticket -> samples, too stale (on_stale: drop)


class RolloutPipeline:
    def __init__(self, per_step: int, total_steps: int, capacity: int, max_lag: int, on_stale: str = "wait",
                 depth: int = 1, by_route: bool = False, groups: dict[str, int] | None = None):
        if capacity < per_step:
            raise ValueError(f"replay.capacity: {capacity} batches cannot hold one learner step ({per_step} batches)")
        self.per_step, self.total_steps = per_step, total_steps
        self.capacity, self.max_lag, self.on_stale = capacity, max_lag, on_stale
        self.depth = depth  # orders one worker may hold (running + queued behind it)
        self.by_route = by_route
        self.group_of = groups or {}  # route -> accumulation group (none: every route in group 0)
        self.n_groups = max(self.group_of.values(), default=0) + 1
        if per_step % self.n_groups:
            raise ValueError(f"routing.accumulation_groups: {self.n_groups} groups cannot share {per_step} batches equally")
        self.routes: dict[int, str] = {}  # ticket -> route, for tickets not yet consumed
        self.owed: list[str] = []  # routes of lost / dropped batches, handed out next
        self.step = 0  # learner steps done: the job's one step counter (the weight version too)
        self.position = 0  # tickets issued and not lost (consumed ones included)
        self.next_ticket = 0  # the ticket the next order must carry
        self.next_put = 0  # the next ticket to enter the replay queue
        self.in_flight: dict[int, Ticket] = {}
        self.ready: dict[int, Queued] = {}  # routed, waiting for its turn
        self.queued: dict[int, Queued] = {}  # the replay queue (insertion = ticket order)
        self.training: list[Queued] = []  # the batches of the learner step in progress
        self.holes: set[int] = set()  # tickets that will never enter the replay queue (lost, refused)
        self.worker_version: dict[str, int] = {}
        self.weights: tuple[int, object] | None = None  # (version, payload) of the latest push
        self.counts = collections.Counter(issued=0, produced=0, lost=0, consumed=0)
        self.dropped: collections.Counter = collections.Counter()  # reason -> samples
        self.lag_counts: collections.Counter = collections.Counter()  # lag -> samples consumed
        # role -> route -> routed batches refused (teacher) / learner steps skipped (learner)
        self.nonfinite: dict[str, collections.Counter] = {"teacher": collections.Counter(), "learner": collections.Counter()}
        self.refused_in_a_row: collections.Counter = collections.Counter()  # route -> refused since its last good batch
        self.skipped_in_a_row = 0  # learner steps skipped since the last one done

    # ---- issuing ------------------------------------------------------------------------
    def held(self) -> int:
        """Batches between hand-out and consumption."""
        return len(self.in_flight) + len(self.ready) + len(self.queued)

    def needed(self) -> int:
        """Batches the job still needs beyond those held: the step in training counts as
        consumed (its batches left the queue before the step counter moves), else an order
        beyond the job's last step is handed out and, by route, holds the room an owed
        replacement needs."""
        return (self.total_steps - self.step) * self.per_step - len(self.training) - self.held()

    def gate_allows(self, worker: str, position: int) -> bool:
        if self.on_stale == "drop":
            return True
        return self.worker_version[worker] >= position // self.per_step - self.max_lag

    def plan(self, workers: list[str]) -> list[str]:
        """Which workers get an order now, in hand-out order (round robin, one per round)."""
        room = min(self.capacity - self.held(), self.needed())
        if room <= 0:
            return []  # the common case on a busy loop: nothing to hand out
        load = collections.Counter(t.worker for t in self.in_flight.values() if not t.rolled_out)
        out: list[str] = []
        while len(out) < room:
            added = False
            for w in workers:
                if len(out) >= room:
                    break
                if load[w] < self.depth and self.gate_allows(w, self.position + len(out)):
                    load[w] += 1
                    out.append(w)
                    added = True
            if not added:
                break
        return out

    def take_owed(self, n: int) -> list[str]:
        """Routes the next `n` orders must have (replacements first); they stay owed until issued."""
        return self.owed[:n] if self.by_route else []

    def issue(self, ticket: int, worker: str, samples: int, route: str = "") -> None:
        if ticket != self.next_ticket:
            raise RuntimeError(f"pipeline: ticket {ticket} handed out, expected {self.next_ticket}")
        if self.owed and route == self.owed[0]:
            self.owed.pop(0)
        self.routes[ticket] = route
        self.in_flight[ticket] = Ticket(ticket, worker, samples)
        self.next_ticket += 1
        self.position += 1
        self.counts["issued"] += samples

    def busy_workers(self) -> set[str]:
        return {t.worker for t in self.in_flight.values() if not t.rolled_out}

    def rolled_out(self, ticket: int) -> None:
        """The worker finished this batch: it may take the next order while this one is routed."""
        self.in_flight[ticket].rolled_out = True

    # ---- arrivals and losses -------------------------------------------------------------
    def completed(self, ticket: int, handle, version: int) -> None:
        """Ticket's routed batch (`handle`) is done; its rows were made with weights `version`."""
        t = self.in_flight.pop(ticket)
        route = self.routes.get(ticket, "")
        self.ready[ticket] = Queued(ticket, t.samples, version, route, handle)
        self.counts["produced"] += t.samples
        self.refused_in_a_row.pop(route, None)
        self._advance()

    def lose(self, ticket: int) -> Ticket:
        """A ticket whose batch will never arrive (its worker died or timed out)."""
        t = self._hole(ticket)
        self.counts["lost"] += t.samples
        return t

    def refuse(self, ticket: int, route: str) -> int:
        """Ticket's routed batch held NaN/Inf (its teacher's answer for `route`): produced, then
        dropped before the replay queue. Returns `route`'s batches refused in a row."""
        t = self._hole(ticket)
        self.counts["produced"] += t.samples
        self.dropped["nonfinite"] += t.samples
        self.nonfinite["teacher"][route] += 1
        self.refused_in_a_row[route] += 1
        return self.refused_in_a_row[route]

    def _hole(self, ticket: int) -> Ticket:
        """A ticket that will never enter the replay queue: skipped in ticket order, later
        positions moved earlier, its route owed."""
        t = self.in_flight.pop(ticket)
        self.holes.add(ticket)
        self._owe(self.routes.pop(ticket, ""))
        self.position -= 1
        self._advance()
        return t

    def _advance(self) -> None:
        """Routed batches join the replay queue in ticket order; a lost or refused ticket is skipped."""
        while self.next_put in self.ready or self.next_put in self.holes:
            if self.next_put in self.ready:
                self.queued[self.next_put] = self.ready.pop(self.next_put)
            else:
                self.holes.discard(self.next_put)
            self.next_put += 1

    def _owe(self, route: str) -> None:
        if self.by_route and route:
            self.owed.append(route)

    # ---- consumption -----------------------------------------------------------------------
    def _drop(self, tickets, reason: str) -> dict[int, int]:
        out = {}
        for t in tickets:
            q = self.queued.pop(t)
            self.dropped[reason] += q.samples
            if reason == "stale":
                self._owe(self.routes.get(t, ""))
            self.routes.pop(t, None)
            out[t] = q.samples
        return out

    def purge(self) -> dict[int, int]:
        """Drop queued batches too stale for the current step ({ticket: samples})."""
        return self._drop([t for t, q in self.queued.items() if self.step - q.version > self.max_lag], "stale")

    def _pick(self) -> list[Queued]:
        items = list(self.queued.values())  # ticket order
        if not self.by_route:
            return items[:self.per_step] if len(items) >= self.per_step else []
        share, picked = self.per_step // self.n_groups, []
        for g in range(self.n_groups):  # each group: its oldest batch's route, that route's oldest batches
            mine = [q for q in items if self.group_of.get(q.route, 0) == g]
            mine = [q for q in mine if q.route == mine[0].route][:share] if mine else []
            if len(mine) < share:
                return []
            picked += mine
        return sorted(picked, key=lambda q: q.ticket)

    def can_learn(self) -> bool:
        return bool(self._pick())

    def take(self) -> Take | None:
        """One learner step's batches (too-stale ones dropped first), or None while there are
        too few. The learner trains on them at version `step`."""
        dropped = self.purge()
        picked = self._pick()
        if not picked:
            return Take([], [], [], dropped) if dropped else None
        for q in picked:
            del self.queued[q.ticket]
            self.routes.pop(q.ticket, None)
            self.counts["consumed"] += q.samples
            self.lag_counts[self.step - q.version] += q.samples
        self.training = picked
        return Take([q.handle for q in picked], [q.ticket for q in picked], [q.version for q in picked], dropped)

    def drain(self, reason: str = "unconsumed") -> dict[int, int]:
        """Everything still queued or waiting its turn is dropped (the end of a job)."""
        for t in sorted(self.ready):
            self.queued[t] = self.ready.pop(t)
        return self._drop(list(self.queued), reason)

    def abandon(self, reason: str = "stopped") -> dict[int, int]:
        """Batches still in flight when the job ends without them (a graceful stop whose grace
        ran out): closed as produced and dropped, so the accounting closes ({ticket: samples}).
        Not owed: the checkpoint's resume point is at or before the first of them."""
        out = {}
        for t in sorted(self.in_flight):
            out[t] = self.in_flight.pop(t).samples
            self.routes.pop(t, None)
            self.counts["produced"] += out[t]
            self.dropped[reason] += out[t]
        return out

    def stepped(self) -> None:
        self.step += 1
        self.training, self.skipped_in_a_row = [], 0

    def skip_step(self) -> int:
        """The learner skipped the step it was given (NaN/Inf prediction, loss or gradients): not
        a step. Its batches are dropped instead of consumed, their positions given back and their
        routes owed, so the step is taken again on fresh batches. Returns the steps skipped in a row."""
        for q in self.training:
            self.counts["consumed"] -= q.samples
            self.lag_counts[self.step - q.version] -= q.samples
            self.dropped["nonfinite"] += q.samples
            self._owe(q.route)
        self.lag_counts = +self.lag_counts  # no zero entries
        for route in sorted({q.route for q in self.training}):
            self.nonfinite["learner"][route] += 1
        self.position -= len(self.training)
        self.training = []
        self.skipped_in_a_row += 1
        return self.skipped_in_a_row

    def first_unconsumed(self) -> int:
        """Tickets before this one are consumed, dropped or lost; the router state from just
        before it is the resume point."""
        pending = list(self.in_flight) + list(self.ready) + list(self.queued)
        return min(pending, default=self.next_ticket)

    def resume(self, step: int, next_ticket: int) -> None:
        self.step = step
        self.position = step * self.per_step
        self.next_ticket = self.next_put = next_ticket

    def accounting(self) -> dict:
        queued = sum(q.samples for q in self.queued.values()) + sum(q.samples for q in self.ready.values())
        return {**self.counts, "dropped": dict(self.dropped), "queued": queued,
                "in_flight": sum(t.samples for t in self.in_flight.values())}

    def nonfinite_counts(self) -> dict[str, dict[str, int]]:
        """{role: {route: count}}: teacher batches refused, learner steps skipped (NaN/Inf)."""
        return {role: dict(c) for role, c in self.nonfinite.items()}

    def replay_stats(self) -> dict:
        return {"depth": len(self.queued), "capacity": self.capacity, "dropped": dict(self.dropped),
                "lag_counts": {str(k): v for k, v in sorted(self.lag_counts.items())},
                "max_lag_seen": max(self.lag_counts, default=0)}


def as_calls(plan: list[str], orders: list, depth: int) -> list[tuple[str, list]]:
    """The orders of one hand-out (`plan[i]` gets `orders[i]`) as calls: each worker's orders in
    hand-out order, in calls of up to half of what a worker holds (`depth`, at least one), so
    one call waits on the worker while the one before runs (the worker never waits for the
    driver between calls) and Ray's cost per call is shared by the orders in it."""
    size = max(1, depth // 2)
    by_worker: dict[str, list] = {}
    for worker, order in zip(plan, orders, strict=True):
        by_worker.setdefault(worker, []).append(order)
    return [(w, os[i:i + size]) for w, os in by_worker.items() for i in range(0, len(os), size)]
