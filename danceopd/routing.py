"""Hard routing: each sample goes to exactly one route, drawn by weight from a seeded stream.

The policy owns its generator; `state_dict()` captures it exactly, so a resumed run continues
the identical route sequence.
"""

from __future__ import annotations

import numpy as np


class RoutePolicy:
    def __init__(self, routes: dict[str, float], seed: int):
        if not routes:
            raise ValueError("RoutePolicy: no routes")
        for name, w in routes.items():
            if w < 0:
                raise ValueError(f"route {name!r}: negative weight {w}")
        total = float(sum(routes.values()))
        if total <= 0:
            raise ValueError("RoutePolicy: all route weights are 0")
        self.names = list(routes)
        self.probs = np.array([routes[n] / total for n in self.names])
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def next(self, among: list[str] | None = None) -> str:
        """A route drawn by weight; `among`: only these routes (an accumulation group), their
        weights renormalised, from the same stream."""
        self.drawn += 1
        if among is None:
            return self.names[int(self.rng.choice(len(self.names), p=self.probs))]
        p = np.array([self.probs[self.names.index(n)] for n in among])
        return among[int(self.rng.choice(len(among), p=p / p.sum()))]

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "drawn": self.drawn, "names": list(self.names)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["names"]) != self.names:
            raise ValueError(f"route policy checkpoint has routes {state['names']}, config has {self.names}")
        self.rng.bit_generator.state = state["rng"]
        self.drawn = int(state["drawn"])
