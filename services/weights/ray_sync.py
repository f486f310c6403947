"""Weight sync in Ray mode: one contract (`services.runtime.contracts.WeightSync`), two
transports. The latest weights are the driver's: `pipeline.weights`.

- `ObjectStoreSync` (default): rank 0's exported state goes into the object store once; the
  pipeline keeps `(version, [ref])` (new and restarted workers are created with it) and every
  live worker gets `apply_weights([ref], v)`, queued behind its current batch. The gate counts
  the worker as holding v at once: every later order runs after the switch. Acknowledgements
  are checked without blocking the loop.
- `CollectiveSync`: learner rank 0 broadcasts in buckets over a gloo/NCCL group of itself and
  the workers (rebuilt when the fleet changes); synchronous.

Each record separates the transfer (worker-side fetch and apply) from the wait for the worker
to finish the batch it was rolling out when the push came.
"""

from __future__ import annotations

import time

import ray

from services.runtime.failures import first_line


class ObjectStoreSync:
    def __init__(self, sync, rollout, deadlines, learner, fleet, pipeline):
        self.learner, self.fleet, self.pipeline = learner, fleet, pipeline
        self.timeout_s = sync.timeout_s
        # A push is applied after the batches queued on the worker: allow for them.
        self.ack_deadline_s = sync.timeout_s + rollout.orders_per_worker * deadlines.rollout_s
        self.records: list[dict] = []
        self.pending: list[dict] = []

    def push(self, version: int) -> None:
        t0 = time.perf_counter()
        ref = self.learner.publish(self.timeout_s)
        self.pipeline.weights = (version, [ref])
        acks = {name: (actor.apply_weights.remote([ref], version), incarnation)
                for name, (actor, incarnation) in self.fleet.worker_handles().items()}
        for name in acks:
            self.pipeline.worker_version[name] = version
        self.pending.append({"version": version, "t0": t0, "acks": acks})

    def poll(self, block: bool = False) -> None:
        """Check acknowledgements without blocking the loop. An acknowledgement that raised, or
        one later than the worker's queued batches plus `sync.timeout_s` could explain, is that
        worker's failure: it is restarted with the latest weights (the gate must not believe it
        holds a version it never applied)."""
        for sync in list(self.pending):
            refs = [r for r, _ in sync["acks"].values()]
            _, waiting = ray.wait(refs, num_returns=len(refs), timeout=self.ack_deadline_s if block else 0)
            age = time.perf_counter() - sync["t0"]
            answers = []
            for name, (ref, incarnation) in list(sync["acks"].items()):
                if ref in waiting:
                    if age > self.ack_deadline_s:
                        del sync["acks"][name]
                        self.fleet.worker_failed(name, f"weight version {sync['version']} not applied within "
                                                 f"{self.ack_deadline_s:g} s", incarnation)
                    continue
                try:
                    answers.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    died = isinstance(e, ray.exceptions.RayActorError)
                    # A dead worker's replacement is created with the latest weights.
                    self.fleet.worker_failed(name, "died" if died else f"applying weights failed: {first_line(e)}",
                                             incarnation)
                del sync["acks"][name]
            sync.setdefault("answers", []).extend(answers)
            if sync["acks"]:
                continue
            self.pending.remove(sync)
            self.records.append(_record(sync["version"], time.perf_counter() - sync["t0"], sync["answers"]))

    def fleet_changed(self) -> None:
        pass  # new workers are created with the latest weights

    def close(self) -> None:
        pass


class CollectiveSync:
    def __init__(self, sync, rollout, deadlines, learner, fleet, pipeline):
        self.learner, self.fleet, self.pipeline = learner, fleet, pipeline
        self.timeout_s = sync.timeout_s
        self.backend = "nccl" if learner.num_gpus > 0 and rollout.num_gpus > 0 else "gloo"
        self.records: list[dict] = []
        self.members: set[str] = set()
        self.epoch = 0
        self.version = None

    def _rebuild(self, workers: dict) -> None:
        """(Re)build the broadcast group: learner rank 0 + the current rollout workers."""
        self.epoch += 1
        world = len(workers) + 1
        addr, port, rank0 = self.learner.join_weight_group(self.backend, world, self.epoch, self.timeout_s)
        refs = [rank0] + [a.join_weight_group.remote(self.backend, addr, port, i + 1, world, self.epoch, self.timeout_s)
                          for i, (a, _) in enumerate(workers.values())]
        ray.get(refs, timeout=self.timeout_s)
        self.members = set(workers)

    def push(self, version: int) -> None:
        from danceopd.collective import WeightSyncError

        self.version = version
        self.pipeline.weights = (version, None)  # no payload: joiners get a broadcast
        workers = self.fleet.worker_handles()
        if not workers:
            return  # nobody to send to yet; workers joining later trigger a broadcast
        t0 = time.perf_counter()
        for attempt in range(2):
            try:
                if self.members != set(workers):
                    self._rebuild(workers)
                sends = self.learner.broadcast(version)
                recvs = [a.receive_weights.remote() for a, _ in workers.values()]
                ray.get(sends, timeout=self.timeout_s)
                answers = ray.get(recvs, timeout=self.timeout_s)
                break
            except (WeightSyncError, ray.exceptions.RayError):
                if attempt:
                    raise
                self.members = set()  # a member died or timed out: rebuild and resend
                workers = self.fleet.worker_handles()
        for n in workers:
            self.pipeline.worker_version[n] = version
        self.records.append(_record(version, time.perf_counter() - t0, answers))

    def poll(self, block: bool = False) -> None:
        pass  # pushes are synchronous

    def fleet_changed(self) -> None:
        if self.version is not None and self.members != set(self.fleet.worker_handles()):
            self.push(self.version)  # joiners get the current weights now, not at the next step

    def close(self) -> None:
        pass


def _record(version: int, seconds: float, answers: list[dict]) -> dict:
    transfer = max((a["transfer_s"] for a in answers), default=0.0)
    return {"version": version, "seconds": seconds, "transfer_s": transfer, "wait_s": max(0.0, seconds - transfer),
            "bytes": answers[0]["bytes"] if answers else 0}
