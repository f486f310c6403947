"""Router: the single authority on route draws and work hand-out, in the driver.

It owns the RoutePolicy, the data-sampling generator and the ticket counter (checkpointed with
the pipeline), and hands out work orders. Scoring a rollout against the teachers of its routes
is `router.scoring.Scorer`'s job: stateless, so it can run in actors that are restarted freely.
"""

from __future__ import annotations

import numpy as np

from danceopd.dataset import Dataset
from danceopd.routing import RoutePolicy
from danceopd.work import WorkItem, WorkOrder, sample_seed


class Router:
    """`routing`: the RoutingConfig; `per_update`: batches of one optimizer update (granularity
    `update`: all of them share one route, or with `accumulation_groups` each group's equal,
    consecutive share of them does); `group_size`: rollouts per prompt (the method's)."""

    def __init__(self, routing, dataset: Dataset, seed: int, per_update: int, group_size: int = 1):
        self.dataset = dataset
        self.seed = seed
        self.routes = {r.name: r for r in routing.routes}
        self.policy = RoutePolicy({r.name: r.weight for r in routing.routes}, seed=seed)
        self.data_rng = np.random.Generator(np.random.PCG64([seed, 1]))
        self.group_size = group_size
        self.next_sample = 0
        self.next_ticket = 0
        self.per_update = per_update if routing.granularity == "update" else 0
        # Accumulation groups: None draws among all routes (one route per update).
        self.groups: list[list[str] | None] = [list(g) for g in routing.accumulation_groups or []] or [None]
        if self.per_update % len(self.groups):
            raise ValueError(f"routing.accumulation_groups: {len(self.groups)} groups cannot share {per_update} batches equally")
        # The open update: one route per group, drawn when it opens, and its orders still to hand out.
        self.update_routes: list[str] = []
        self.update_left = 0
        # Router state as it was before each outstanding ticket was issued: a checkpoint taken
        # while later tickets are still in flight resumes from the first unconsumed one.
        self._before: dict[int, dict] = {}

    # ---- work hand-out ------------------------------------------------------------------
    def next_orders(self, n: int, batch_size: int, owed: list[str] = ()) -> list[WorkOrder]:
        """`n` orders in one call (one round trip for the whole hand-out). `owed` routes first:
        replacements for lost or dropped batches of an update that is still short (fresh data,
        the same route, the open group untouched)."""
        owed = list(owed)[:n]
        return [self.next_order(batch_size, owed[i] if i < len(owed) else None) for i in range(n)]

    def _order_route(self, owed: str | None) -> str | None:
        """The route every item of this order shares (granularity update), or None (per sample).
        An update's orders go to its groups in turn, each group's share consecutive."""
        if owed is not None:
            return owed
        if not self.per_update:
            return None
        if self.update_left == 0:
            self.update_routes = [self.policy.next(g) for g in self.groups]
            self.update_left = self.per_update
        slot = self.per_update - self.update_left
        self.update_left -= 1
        return self.update_routes[slot * len(self.groups) // self.per_update]

    def next_order(self, batch_size: int, owed: str | None = None) -> WorkOrder:
        groups = self.group_size
        self._before[self.next_ticket] = self.state_dict()
        order_route = self._order_route(owed)
        items = []
        while len(items) < batch_size:
            route = order_route or self.policy.next()
            row = self.dataset.sample(self.routes[route].task, self.data_rng)
            group = self.next_sample
            for _ in range(groups):  # a group: the same prompt rolled out with distinct seeds
                idx = self.next_sample
                self.next_sample += 1
                items.append(WorkItem(idx, route, row, sample_seed(self.seed, idx), group))
        order = WorkOrder(self.next_ticket, tuple(items))
        self.next_ticket += 1
        return order

    # ---- state --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "data_rng": self.data_rng.bit_generator.state,
                "next_sample": self.next_sample, "next_ticket": self.next_ticket,
                "update_routes": list(self.update_routes), "update_left": self.update_left}

    def state_before(self, ticket: int) -> dict:
        """The state to resume from when tickets < `ticket` are consumed and later ones are not."""
        return self._before.get(ticket) or self.state_dict()

    def forget_before(self, ticket: int) -> None:
        for t in [t for t in self._before if t < ticket]:
            del self._before[t]

    def close_update(self) -> None:
        """The next order opens a new update (a resume re-issues whole updates)."""
        self.update_left = 0

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.data_rng.bit_generator.state = state["data_rng"]
        self.next_sample = int(state["next_sample"])
        self.next_ticket = int(state["next_ticket"])
        if "update_routes" in state:
            self.update_routes, self.update_left = list(state["update_routes"]), int(state["update_left"])
        else:  # a checkpoint from before accumulation groups: one route per update
            route = state.get("group_route", "")
            self.update_routes, self.update_left = [route] if route else [], int(state.get("group_left", 0))
