"""`--mode ray`: the DeepSpeed learner group and the evaluator actor."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NoReturn

import ray

from danceopd.storage import address
from services.runtime.actors import actor_env, learner_rank_actor
from services.runtime.failures import RoleFailure, first_line
from services.runtime.groups import ActorGroup, on
from services.runtime.placement import role_specs
from services.runtime.ports import free_port

if TYPE_CHECKING:  # annotations only: no import cycle, no cost
    from danceopd.config import Config

PROBE_S = 5.0  # a live rank answers `alive` in milliseconds, even mid-collective; a hung one never


START_ATTEMPTS = 3  # a gang that dies while starting (e.g. rank 0's port taken) is started again


def cause(e: BaseException) -> str:
    return f"died ({type(e).__name__})" if isinstance(e, ray.exceptions.RayActorError) else first_line(e)


class RayLearner:
    """W DeepSpeed ranks (one gang placement group). A step runs while the loop goes on.

    A rank cannot be rebuilt in place (its peers hold collective state), so a dead or failing
    rank ends the job at once, with one line naming the rank: its refs fail as soon as Ray
    sees the death, without waiting for the survivors' collective timeout. `--resume auto`
    continues from the last checkpoint.

    A call past its deadline names the first rank that does not answer a liveness probe (`alive`,
    in a concurrency group of its own), not the lowest rank not done: when one rank hangs, every
    healthy rank is blocked in the collective waiting for it, yet still answers the probe."""

    kind = "deepspeed"

    def __init__(self, cfg: Config, spec):
        from learner.deepspeed_learner import DeepSpeedLearner

        self.cfg = cfg
        self.num_gpus = cfg.learner.num_gpus
        env = {"env_vars": actor_env(cfg)}
        cls = ray.remote(concurrency_groups={"probe": 1})(learner_rank_actor(DeepSpeedLearner))
        self._addr = None
        self.failed: str | None = None
        self.group = ActorGroup("learner", spec, lambda name, opts: cls.options(**opts, runtime_env=env).remote(
            cfg, int(name.rsplit("-", 1)[1]), cfg.learner.world_size, *self._addr))
        self._refs, self._t0 = None, 0.0
        self._answered = False  # every rank answered once: there is a learner to stop in order
        self._pg, self._first = self.group.reserve_gang(cfg.learner.world_size)
        self._launch()

    def _launch(self) -> None:
        # Rank 0 listens on a free port of its own node: probe it inside rank 0's bundle.
        task = ray.remote(free_port).options(num_cpus=0, scheduling_strategy=on(self._pg, self._first))
        self._addr = ray.get(task.remote())
        self.group.add_gang()
        self.ranks = self.group.actors()

    def started(self) -> RayLearner:
        """Wait for the ranks the constructor launched (the fleet starts meanwhile). Another
        process may take rank 0's port before rank 0 binds it: a gang that dies while starting
        is started again, on a new port, before the job has anything to lose."""
        for attempt in range(1, START_ATTEMPTS):
            try:
                return self._wait_ranks()
            except RoleFailure:
                print(f"{self.failed}; starting the learner's ranks again ({attempt} of {START_ATTEMPTS - 1})", flush=True)
                self.failed = None
                for name in list(self.group.members):
                    self.group.remove(name)  # the gang's placement group stays reserved
                self._launch()
        return self._wait_ranks()

    def _wait_ranks(self) -> RayLearner:
        self.wait([r.get_version.remote() for r in self.ranks], "starting", self.cfg.sync.timeout_s + 600)
        self._answered = True
        return self

    def _fail(self, rank: int, what: str, cause: str) -> NoReturn:
        self.failed = f"learner learner-{rank}: {what}: {cause}"
        raise RoleFailure(self.failed + " (a rank cannot be rebuilt in place; rerun with --resume auto)") from None

    def _late(self, what: str, within: str, pending: list[int]) -> NoReturn:
        """A call not done within its deadline on ranks `pending`: probe every rank for up to
        PROBE_S; the first that does not answer (hung, stopped) or died is the failed rank. If
        all answer, the call is slow, not hung: say so, naming the ranks not done."""
        probes = [r.alive.remote() for r in self.ranks]
        answered, _ = ray.wait(probes, num_returns=len(probes), timeout=PROBE_S)
        late = f"not done within {within} and"
        for rank, ref in enumerate(probes):
            if ref not in answered:
                self._fail(rank, what, f"{late} hung: no answer to a liveness probe within {PROBE_S:g} s")
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001 — it died meanwhile
                self._fail(rank, what, f"{late} {cause(e)}")
        ranks = ", ".join(f"learner-{r}" for r in pending)
        self.failed = f"learner: {what}: not done within {within} on {ranks}; all ranks alive (they answer a liveness probe): slow, not hung"
        raise RoleFailure(self.failed)

    def wait(self, refs: list, what: str, timeout: float, fetch: bool = True) -> list | None:
        """Wait for one call per rank (rank order); the first failure names its rank at once."""
        t0, left = time.perf_counter(), dict(zip(refs, range(len(refs))))
        while left:
            done, _ = ray.wait(list(left), num_returns=1, timeout=max(0.0, timeout - (time.perf_counter() - t0)))
            if not done:
                self._late(what, f"{timeout:g} s", sorted(left.values()))
            for ref in done:
                rank = left.pop(ref)
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    self._fail(rank, what, cause(e))
        return ray.get(refs) if fetch else None

    @property
    def busy(self) -> bool:
        return self._refs is not None

    def pending(self) -> list:
        return list(self._refs or [])

    def start_step(self, handles: list) -> None:
        """Each rank gets its consecutive share of the step's batch refs (rank r: micro-batches
        r*A .. r*A+A-1) and fetches them itself: no batch passes through the driver."""
        per = len(handles) // len(self.ranks)
        self._t0 = time.perf_counter()
        self._refs = [r.train_refs.remote(*handles[i * per:(i + 1) * per]) for i, r in enumerate(self.ranks)]

    def poll_step(self, deadline_s: float) -> dict | None:
        done, _ = ray.wait(self._refs, num_returns=len(self._refs), timeout=0)
        for ref in done:  # a failed rank ends the step now, not when its peers' collective times out
            try:
                ray.get(ref)
            except Exception as e:  # noqa: BLE001
                self._fail(self._refs.index(ref), "step failed", cause(e))
        if len(done) < len(self._refs):
            if time.perf_counter() - self._t0 > deadline_s:
                self._late("step", f"deadlines.learner_step_s={deadline_s:g}",
                           [i for i, r in enumerate(self._refs) if r not in done])
            return None
        results = ray.get(self._refs)
        self._refs = None
        peak = max(r.get("peak_gpu_memory_bytes", 0) for r in results)  # the fullest rank's GPU
        return {**results[0], "peak_gpu_memory_bytes": peak}

    def export_ref(self):
        """Ref to rank 0's gathered weights, packed (danceopd/packed.py), and the other ranks'
        refs (ZeRO-3 gathers on all)."""
        refs = [r.export_packed.remote() for r in self.ranks]
        return refs[0], refs[1:]

    def publish(self, timeout: float):
        """The weights exported into the object store, once: rank 0's ref, after every rank took
        part (ZeRO-3 gathers)."""
        ref, others = self.export_ref()
        self.wait([ref, *others], "exporting weights", timeout, fetch=False)
        return ref

    # ---- the `collective` transport's side --------------------------------------------------
    def join_weight_group(self, backend: str, world: int, epoch: int, timeout: float):
        """Rank 0 opens the weight group on a free port of its node: (addr, port, its join ref)."""
        rank0 = self.ranks[0]
        addr, port = ray.get(rank0.free_port.remote(), timeout=timeout)
        return addr, port, rank0.join_weight_group.remote(backend, addr, port, 0, world, epoch, timeout)

    def broadcast(self, version: int) -> list:
        """Every rank exports (ZeRO-3 gathers); rank 0 sends: one ref per rank."""
        return [r.broadcast_weights.remote(version) for r in self.ranks]

    def export(self) -> dict:
        refs = [r.export_weights.remote() for r in self.ranks]
        return self.wait(refs, "exporting weights", self.cfg.sync.timeout_s)[0]

    def export_ema_ref(self):
        """Ref to rank 0's EMA (it alone keeps one; not a collective)."""
        return self.ranks[0].export_ema.remote()

    def export_ema(self) -> dict | None:
        return self.wait([self.export_ema_ref()], "exporting the EMA", self.cfg.sync.timeout_s)[0]

    def load_ema(self, state: dict) -> None:
        self.wait([self.ranks[0].load_ema.remote(state)], "loading the EMA", self.cfg.deadlines.learner_step_s)

    def _all(self, method: str, *args, timeout: float | None = None) -> list:
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        return self.wait(refs, method.replace("_", " "), timeout or self.cfg.deadlines.learner_step_s)

    def save(self, folder) -> list[str]:
        from learner.deepspeed_learner import checkpoint_files

        self._all("save_checkpoint", address(folder))  # on object storage: its URI, each rank uploads its own
        return checkpoint_files(len(self.ranks))

    def load(self, folder, weights: dict) -> None:
        self._all("load_checkpoint", address(folder))

    def load_weights(self, weights: dict) -> None:
        self._all("load_weights", ray.put(weights))

    def set_version(self, version: int) -> None:
        self._all("set_version", version)

    def shutdown(self) -> None:
        # Peers of a failed rank may hang in a collective, and ranks that never answered (a start
        # that failed) have nothing to finish: just kill them.
        if self.failed is None and self._answered:
            try:
                ray.get([r.shutdown.remote() for r in self.ranks], timeout=30)
            except Exception:  # noqa: BLE001 — best effort on the way out
                pass
        self.group.shutdown()


class RayEvaluation:
    """The evaluator in an actor of its own, off the learner's path: the learner only exports its
    weights into the object store (as for a weight push) and the actor samples and scores them.
    One evaluation runs and at most one waits, the newest (an older waiting one is skipped), so a
    slow evaluator never holds more than two weight versions. A failed evaluator stops evaluating
    (one line), never the job."""

    where = "evaluator actor"

    def __init__(self, cfg: Config):
        from danceopd.evaluate import Evaluator

        spec = role_specs(cfg)["evaluator"]
        opts = {**spec.actor_options(in_group=False), "runtime_env": {"env_vars": actor_env(cfg)}}
        self.actor = ray.remote(Evaluator).options(**opts).remote(cfg)
        self.ema = cfg.eval.weights == "ema"
        self.running = self.waiting = None  # (step, ref of its result) / (step, ref of its weights)
        self.skipped, self.failed = 0, None

    def submit(self, step: int, learner: RayLearner) -> None:
        if self.failed:
            return
        # queued on the ranks (rank 0 alone for the EMA) before their next step
        weights = learner.export_ema_ref() if self.ema else learner.export_ref()[0]
        if self.running is None:
            self.running = (step, self.actor.evaluate.remote(weights, step))
        else:
            self.skipped += self.waiting is not None
            self.waiting = (step, weights)

    def poll(self, wait_s: float = 0.0) -> list[dict]:
        """Finished evaluations; with `wait_s`, wait up to that long for every outstanding one."""
        out, t0 = [], time.perf_counter()
        while self.running is not None:
            step, ref = self.running
            done, _ = ray.wait([ref], timeout=max(0.0, wait_s - (time.perf_counter() - t0)))
            if not done:
                if wait_s:
                    print(f"evaluation of step {step}: not done within {wait_s:g} s; finishing without it", flush=True)
                break
            self.running = None
            try:
                out.append(ray.get(ref))
            except Exception as e:  # noqa: BLE001 — evaluation is not worth the job
                self.failed, self.waiting = first_line(e), None
                print(f"evaluator: step {step} failed, evaluation stops: {self.failed}", flush=True)
                break
            if self.waiting is not None:
                (wstep, weights), self.waiting = self.waiting, None
                self.running = (wstep, self.actor.evaluate.remote(weights, wstep))
        return out

    def shutdown(self) -> None:
        ray.kill(self.actor, no_restart=True)
