"""Weight sync in Ray mode: one contract (`services.runtime.contracts.WeightSync`), two
transports. The latest weights are the driver's: `pipeline.weights`.

- `ObjectStoreSync` (default): rank 0's exported state goes into the object store once; the
  pipeline keeps `(version, [ref])`: new and restarted workers are created with it, and every
  order handed out from then on carries it, so a worker applies it before its next batch with no
  call of its own. The gate counts every live worker as holding v at once: every later order
  runs after the switch.
- `CollectiveSync`: learner rank 0 broadcasts in buckets over a gloo/NCCL group of itself and
  the workers (rebuilt when the fleet changes); synchronous.

Each record separates the transfer (worker-side fetch and apply) from the wait for the worker
to finish the batch it was rolling out when the push came.
"""

from __future__ import annotations

import time

import ray


class ObjectStoreSync:
    """A push costs no call per worker: the weights ride on every later order (`Fleet.submit`
    passes the pipeline's latest), and each worker applies them before its next batch. A push is
    recorded once every worker that was live at the push reported it applied (`applied`)."""

    def __init__(self, sync, rollout, deadlines, learner, fleet, pipeline):
        self.learner, self.fleet, self.pipeline = learner, fleet, pipeline
        self.timeout_s = sync.timeout_s
        self.records: list[dict] = []
        self.pending: dict[int, dict] = {}  # version -> {t0, waiting: {worker: incarnation}, answers}

    def push(self, version: int) -> None:
        t0 = time.perf_counter()
        ref = self.learner.publish(self.timeout_s)
        self.pipeline.weights = (version, [ref])
        live = {name: inc for name, (_, inc) in self.fleet.worker_handles().items()}
        for name in live:  # every order from now on carries v: the gate counts them as holding it
            self.pipeline.worker_version[name] = version
        self.pending[version] = {"t0": t0, "waiting": live, "answers": []}

    def applied(self, ev) -> None:
        """Worker `ev.worker` applied `ev.version` (and so every older pending version too)."""
        for version, p in self.pending.items():
            if version <= ev.version and p["waiting"].pop(ev.worker, None) is not None:
                p["answers"].append({"transfer_s": ev.transfer_s if version == ev.version else 0.0, "bytes": ev.nbytes})
        self._complete()

    def poll(self, block: bool = False) -> None:
        """Workers replaced or retired since a push will never apply it (a restarted one starts
        with the latest weights): stop waiting for them. `block`: the job ends, and a push that
        some workers never needed (no order came after it) is recorded with those that did."""
        if not self.pending:
            return  # the common case: called every loop iteration
        live = {name: inc for name, (_, inc) in self.fleet.worker_handles().items()}
        for p in self.pending.values():
            for name, inc in list(p["waiting"].items()):
                if live.get(name) != inc:
                    del p["waiting"][name]
        self._complete(final=block)

    def _complete(self, final: bool = False) -> None:
        for version, p in sorted(self.pending.items()):
            if p["waiting"] and not final:
                continue
            del self.pending[version]
            if p["answers"]:
                self.records.append(_record(version, time.perf_counter() - p["t0"], p["answers"]))

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

    def applied(self, ev) -> None:
        pass  # a broadcast is applied when it returns

    def fleet_changed(self) -> None:
        if self.version is not None and self.members != set(self.fleet.worker_handles()):
            self.push(self.version)  # joiners get the current weights now, not at the next step

    def close(self) -> None:
        pass


def _record(version: int, seconds: float, answers: list[dict]) -> dict:
    transfer = max((a["transfer_s"] for a in answers), default=0.0)
    return {"version": version, "seconds": seconds, "transfer_s": transfer, "wait_s": max(0.0, seconds - transfer),
            "bytes": answers[0]["bytes"] if answers else 0}
