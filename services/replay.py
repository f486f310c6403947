"""ReplayQueue: bounded, staleness-aware FIFO of RoutedBatches between router and learner.

Backpressure: `put` refuses when `capacity` batches are held in memory (the producer waits),
unless a spill folder is configured, in which case overflow goes to Arrow IPC files and is read
back in order. The queue never hands out a batch older than `max_policy_lag` versions behind
the learner: such batches are dropped and counted (reason `stale`). `take` and `purge` also
say which tickets they consumed or dropped, so the training loop's accounting stays exact.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pyarrow as pa

from danceopd.batch import num_samples, read_ipc, write_ipc


class ReplayQueue:
    def __init__(self, capacity: int, max_policy_lag: int, spill_dir: str | Path | None = None, by_route: bool = False):
        self.capacity = capacity
        self.by_route = by_route  # routing.granularity update: a take is one route's batches
        self.max_policy_lag = max_policy_lag
        self.spill_dir = Path(spill_dir) if spill_dir else None
        if self.spill_dir:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        # entries: (policy_version, samples, ticket, RecordBatch or Path of a spill file, route)
        self._items: collections.deque = collections.deque()
        self._in_memory = 0
        self._spilled = 0
        self.put_samples = 0
        self.consumed_samples = 0
        self.dropped: dict[str, int] = collections.Counter()
        self.lag_counts: dict[int, int] = collections.Counter()

    def depth(self) -> int:
        return len(self._items)

    def put(self, rb: pa.RecordBatch) -> bool:
        version, samples = min(rb.column("policy_version").to_pylist()), num_samples(rb)
        ticket = rb.column("ticket")[0].as_py() if rb.num_rows else -1
        route = rb.column("route")[0].as_py() if rb.num_rows else ""
        if self._in_memory < self.capacity:
            item = rb
            self._in_memory += 1
        elif self.spill_dir is not None:
            item = self.spill_dir / f"spill-{self._spilled:08d}.arrow"
            write_ipc(item, [rb])
            self._spilled += 1
        else:
            return False
        self._items.append((version, samples, ticket, item, route))
        self.put_samples += samples
        return True

    def _load(self, item) -> pa.RecordBatch:
        if isinstance(item, Path):
            rb = read_ipc(item)[0]
            item.unlink()
            return rb
        self._in_memory -= 1
        return item

    def _drop_stale(self, learner_version: int) -> dict[int, int]:
        keep, dropped = collections.deque(), {}
        for entry in self._items:
            version, samples, ticket, item, _ = entry
            if learner_version - version > self.max_policy_lag:
                self._load(item)
                self.dropped["stale"] += samples
                dropped[ticket] = samples
            else:
                keep.append(entry)
        self._items = keep
        return dropped

    def purge(self, learner_version: int) -> dict:
        """Drop what is already too stale: {"dropped": {ticket: samples}, "depth": left}."""
        return {"dropped": self._drop_stale(learner_version), "depth": self.depth()}

    def take(self, n: int, learner_version: int) -> tuple[list[pa.RecordBatch], dict]:
        """The n oldest fresh batches (`by_route`: the n oldest of the oldest batch's route), or []
        (taking nothing) while there are fewer, and
        what happened: {"tickets": taken, "versions": their policy versions, "dropped": {ticket:
        samples} (too stale, dropped on the way)}."""
        dropped = self._drop_stale(learner_version)
        meta = {"tickets": [], "versions": [], "dropped": dropped}
        if self.by_route:  # the oldest batch's route; its n oldest batches, or nothing yet
            picked = [e for e in self._items if e[4] == self._items[0][4]][:n] if self._items else []
        else:
            picked = list(self._items)[:n]
        if len(picked) < n:
            return [], meta
        out = []
        chosen = {id(e) for e in picked}
        self._items = collections.deque(e for e in self._items if id(e) not in chosen)
        for version, samples, ticket, item, _ in picked:
            self.lag_counts[learner_version - version] += samples
            self.consumed_samples += samples
            meta["tickets"].append(ticket)
            meta["versions"].append(version)
            out.append(self._load(item))
        return out, meta

    def drain(self, reason: str) -> dict[int, int]:
        """Drop everything left (e.g. `unconsumed` at the end of a job): {ticket: samples}."""
        dropped = {}
        while self._items:
            _, samples, ticket, item, _ = self._items.popleft()
            self._load(item)
            dropped[ticket] = samples
        self.dropped[reason] += sum(dropped.values())
        return dropped

    def stats(self) -> dict:
        return {"depth": self.depth(), "capacity": self.capacity, "put_samples": self.put_samples,
                "consumed_samples": self.consumed_samples, "dropped": dict(self.dropped),
                "lag_counts": {str(k): v for k, v in sorted(self.lag_counts.items())},
                "max_lag_seen": max(self.lag_counts, default=0)}
