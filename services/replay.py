"""ReplayQueue: bounded, staleness-aware FIFO of RoutedBatches between router and learner.

Backpressure: `put` refuses when `capacity` batches are held in memory (the producer waits),
unless a spill folder is configured, in which case overflow goes to Arrow IPC files and is read
back in order. `get(learner_version)` never hands out a batch older than `max_policy_lag`:
such batches are dropped and counted (reason `stale`).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow as pa

from danceopd.batch import num_samples, read_ipc, write_ipc


class ReplayQueue:
    def __init__(self, capacity: int, max_policy_lag: int, spill_dir: str | Path | None = None):
        self.capacity = capacity
        self.max_policy_lag = max_policy_lag
        self.spill_dir = Path(spill_dir) if spill_dir else None
        if self.spill_dir:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._items: collections.deque = collections.deque()  # pa.RecordBatch or Path (spilled)
        self._in_memory = 0
        self._spilled = 0
        self.put_samples = 0
        self.consumed_samples = 0
        self.dropped: dict[str, int] = collections.Counter()
        self.lags: list[int] = []

    def depth(self) -> int:
        return len(self._items)

    def full(self) -> bool:
        return self._in_memory >= self.capacity and self.spill_dir is None

    def put(self, rb: pa.RecordBatch) -> bool:
        if self._in_memory < self.capacity:
            self._items.append(rb)
            self._in_memory += 1
        elif self.spill_dir is not None:
            path = self.spill_dir / f"spill-{self._spilled:08d}.arrow"
            write_ipc(path, [rb])
            self._spilled += 1
            self._items.append(path)
        else:
            return False
        self.put_samples += num_samples(rb)
        return True

    def _pop(self) -> pa.RecordBatch:
        item = self._items.popleft()
        if isinstance(item, Path):
            rb = read_ipc(item)[0]
            item.unlink()
            return rb
        self._in_memory -= 1
        return item

    def get(self, learner_version: int) -> pa.RecordBatch | None:
        while self._items:
            rb = self._pop()
            lag = learner_version - min(rb.column("policy_version").to_pylist())
            if lag > self.max_policy_lag:
                self.dropped["stale"] += num_samples(rb)
                continue
            self.lags.append(lag)
            self.consumed_samples += num_samples(rb)
            return rb
        return None

    def drain(self, reason: str) -> int:
        """Drop everything left (e.g. `unconsumed` at the end of a job); returns samples dropped."""
        n = 0
        while self._items:
            n += num_samples(self._pop())
        self.dropped[reason] += n
        return n

    def stats(self) -> dict:
        return {"depth": self.depth(), "capacity": self.capacity, "put_samples": self.put_samples,
                "consumed_samples": self.consumed_samples, "dropped": dict(self.dropped),
                "max_lag_seen": max(self.lags, default=0)}
