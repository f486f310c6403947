"""The rollout pipeline's bookkeeping: tickets, the staleness gate, ticket order, lost tickets.

Pure Python — no Ray, no clock — so the logic both modes run is unit-tested on its own.

- Every rollout batch is a *ticket*, numbered by the router in hand-out order.
- **Gate** (`on_stale: wait`): the batch at consumption position p is trained on at step
  p // per_step, so it may be issued to a worker holding version v only if
  v >= p // per_step - max_policy_lag. Positions count tickets that are not lost, so losing a
  ticket only moves later ones earlier (never past their bound). `on_stale: drop` never waits;
  the replay queue drops what is too stale when it is taken.
- **Backpressure**: batches in flight + waiting for their turn + queued never exceed the replay
  capacity, and no more are issued than the remaining steps need.
- **Ticket order**: routed batches enter the replay queue in ticket order (a lost ticket is
  skipped), so what the learner consumes does not depend on which worker was faster.
- **One route per update** (`by_route`, routing.granularity update): a lost or dropped batch
  leaves its update short, so its route is *owed*: the next order handed out is of that route.
  Losing or dropping frees the capacity slot the replacement takes, so this never deadlocks;
  the learner starts a step once the oldest queued batch's route has a full step queued.
- **Resume point**: the first ticket not yet consumed; the router's state from just before it
  is what a checkpoint stores.

Sample accounting (`counts`): issued = produced + lost + in flight, and
produced = consumed + dropped + queued (waiting for their turn or in the replay queue).
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


class RolloutPipeline:
    def __init__(self, per_step: int, total_steps: int, capacity: int, max_lag: int, on_stale: str = "wait",
                 depth: int = 1, by_route: bool = False):
        if capacity < per_step:
            raise ValueError(f"replay.capacity: {capacity} batches cannot hold one learner step ({per_step} batches)")
        self.per_step, self.total_steps = per_step, total_steps
        self.capacity, self.max_lag, self.on_stale = capacity, max_lag, on_stale
        self.depth = depth  # orders one worker may hold (running + queued behind it)
        self.by_route = by_route
        self.routes: dict[int, str] = {}  # ticket -> route, for tickets not yet consumed
        self.owed: list[str] = []  # routes of lost / dropped batches, handed out next
        self.step = 0  # learner steps done
        self.position = 0  # tickets issued and not lost (consumed ones included)
        self.next_ticket = 0  # the ticket the next order must carry
        self.next_put = 0  # the next ticket to enter the replay queue
        self.in_flight: dict[int, Ticket] = {}
        self.ready: dict[int, tuple[Ticket, object]] = {}  # routed, waiting for its turn
        self.queued: dict[int, int] = {}  # ticket -> samples, in the replay queue (insertion = ticket order)
        self.lost: set[int] = set()
        self.worker_version: dict[str, int] = {}
        self.counts = collections.Counter(issued=0, produced=0, lost=0, consumed=0)
        self.dropped: collections.Counter = collections.Counter()  # reason -> samples

    # ---- issuing ------------------------------------------------------------------------
    def held(self) -> int:
        """Batches between hand-out and consumption."""
        return len(self.in_flight) + len(self.ready) + len(self.queued)

    def enough_issued(self, extra: int = 0) -> bool:
        return self.step * self.per_step + self.held() + extra >= self.total_steps * self.per_step

    def gate_allows(self, worker: str, position: int) -> bool:
        if self.on_stale == "drop":
            return True
        return self.worker_version[worker] >= position // self.per_step - self.max_lag

    def plan(self, workers: list[str]) -> list[str]:
        """Which workers get an order now, in hand-out order (round robin, one per round)."""
        load = collections.Counter(t.worker for t in self.in_flight.values() if not t.rolled_out)
        out: list[str] = []
        while True:
            added = False
            for w in workers:
                n = len(out)
                if self.held() + n >= self.capacity or self.enough_issued(n):
                    return out
                if load[w] < self.depth and self.gate_allows(w, self.position + n):
                    load[w] += 1
                    out.append(w)
                    added = True
            if not added:
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
    def completed(self, ticket: int, handle) -> None:
        t = self.in_flight.pop(ticket)
        self.ready[ticket] = (t, handle)
        self.counts["produced"] += t.samples

    def lose(self, ticket: int) -> Ticket:
        """A ticket whose batch will never arrive (its worker died or timed out)."""
        t = self.in_flight.pop(ticket)
        self.lost.add(ticket)
        self._owe(ticket)
        self.routes.pop(ticket, None)
        self.position -= 1
        self.counts["lost"] += t.samples
        return t

    def to_replay(self) -> list[object]:
        """Routed batches that may enter the replay queue now, in ticket order."""
        out = []
        while self.next_put in self.ready or self.next_put in self.lost:
            if self.next_put in self.ready:
                t, handle = self.ready.pop(self.next_put)
                self.queued[t.ticket] = t.samples
                out.append(handle)
            else:
                self.lost.discard(self.next_put)
            self.next_put += 1
        return out

    # ---- consumption -----------------------------------------------------------------------
    def took(self, taken: list[int], dropped: dict[int, int] | None = None, reason: str = "stale") -> None:
        """The replay queue handed `taken` tickets to the learner and dropped `dropped`."""
        for t in taken:
            self.counts["consumed"] += self.queued.pop(t)
            self.routes.pop(t, None)
        for t, samples in (dropped or {}).items():
            self.queued.pop(t)
            self.dropped[reason] += samples
            if reason == "stale":
                self._owe(t)
            self.routes.pop(t, None)

    def _owe(self, ticket: int) -> None:
        if self.by_route and self.routes.get(ticket):
            self.owed.append(self.routes[ticket])

    def stepped(self) -> None:
        self.step += 1

    def can_learn(self) -> bool:
        if not self.by_route or len(self.queued) < self.per_step:
            return len(self.queued) >= self.per_step
        head = self.routes.get(next(iter(self.queued)))
        return sum(1 for t in self.queued if self.routes.get(t) == head) >= self.per_step

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
        queued = sum(self.queued.values()) + sum(t.samples for t, _ in self.ready.values())
        return {**self.counts, "dropped": dict(self.dropped), "queued": queued,
                "in_flight": sum(t.samples for t in self.in_flight.values())}
