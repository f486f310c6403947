"""Work orders: what the router hands a rollout worker — (route, sample, seed) per sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from danceopd.backends.base import Row


def sample_seed(job_seed: int, sample_index: int) -> int:
    """Per-sample seed from (job seed, global sample counter): a sample's noise and query
    states do not depend on which worker or batch produced it."""
    return int(np.random.SeedSequence([job_seed, sample_index]).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass(frozen=True)
class WorkItem:
    sample_index: int
    route: str
    row: Row
    seed: int
    group: int


@dataclass(frozen=True)
class WorkOrder:
    """One rollout batch to make. `ticket` numbers batches in hand-out order; with
    `on_stale: wait` a worker may start ticket b only with policy version >= step(b) - lag."""

    ticket: int
    items: tuple[WorkItem, ...]
