"""The Ray semantics the runtime's concurrency rests on, as 20-line experiments (services/runtime/
ray_fleet.py's module doc). If a Ray upgrade changes one, this fails before the fleet silently
serialises again."""

import time

import pytest

pytestmark = pytest.mark.ray


def _sleeper(ray):
    @ray.remote(num_cpus=0)
    class Sleeper:
        def work(self, _arg=None, seconds: float = 0.6) -> float:
            time.sleep(seconds)
            return time.perf_counter()

        def now(self, _arg=None) -> float:
            return time.perf_counter()

    return Sleeper


def test_calls_to_different_actors_run_concurrently(ray_local):
    ray = ray_local
    actors = [_sleeper(ray).remote() for _ in range(4)]
    ray.get([a.now.remote() for a in actors])
    t0 = time.perf_counter()
    ray.get([a.work.remote() for a in actors])
    assert time.perf_counter() - t0 < 4 * 0.6 * 0.6  # ~0.6 s, not 2.4 s


def test_an_unfinished_ref_argument_holds_up_later_calls_of_a_sequential_actor(ray_local):
    """The hazard: why the loop hands an actor only finished refs on the data path."""
    ray = ray_local
    slow, seq = _sleeper(ray).remote(), _sleeper(ray).remote()
    ray.get([slow.now.remote(), seq.now.remote()])
    t0 = time.perf_counter()
    blocked = seq.now.remote(slow.work.remote(seconds=1.0))
    later = seq.now.remote()  # has no dependency, yet runs only after `blocked`
    assert ray.get(later) - t0 >= 0.9
    ray.get(blocked)


def test_a_threaded_actor_overlaps_calls_from_one_caller(ray_local):
    """The router is threaded: batches from the one loop are routed at once, and an unfinished
    argument of one call does not hold up the others."""
    ray = ray_local
    threaded = _sleeper(ray).options(max_concurrency=4).remote()
    slow = _sleeper(ray).remote()
    ray.get([threaded.now.remote(), slow.now.remote()])
    t0 = time.perf_counter()
    ray.get([threaded.work.remote() for _ in range(4)])
    assert time.perf_counter() - t0 < 4 * 0.6 * 0.6
    t0 = time.perf_counter()
    blocked = threaded.now.remote(slow.work.remote(seconds=1.0))
    assert ray.get(threaded.now.remote()) - t0 < 0.5
    ray.get(blocked)


def test_a_ref_inside_a_list_is_not_fetched_before_the_call(ray_local):
    """Weight pushes pass [ref] so the worker times the transfer itself."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def kind(args):
        return type(args[0]).__name__

    assert ray.get(kind.remote([ray.put(1)])) == "ObjectRef"


def test_a_probe_group_answers_while_the_default_group_is_blocked_and_a_stopped_process_does_not(ray_local):
    """The learner rank's liveness probe (services/runtime/ray_learner.py, `alive`): a method in a
    concurrency group of its own answers while a default-group call is blocked (a rank waiting in a
    collective for a hung peer); the default group still runs one call at a time, in submission
    order (what the rest of the runtime relies on); a SIGSTOPped process answers nothing."""
    import os
    import signal

    ray = ray_local

    @ray.remote(num_cpus=0, concurrency_groups={"probe": 1})
    class Rank:
        def __init__(self):
            self.log = []

        def work(self, i: int, seconds: float) -> int:
            self.log.append(("start", i))
            time.sleep(seconds)
            self.log.append(("end", i))
            return i

        @ray.method(concurrency_group="probe")
        def alive(self) -> tuple[int, list]:
            return os.getpid(), list(self.log)

    rank = Rank.remote()
    pid, _ = ray.get(rank.alive.remote())
    blocked = rank.work.remote(0, 3.0)
    later = [rank.work.remote(i, s) for i, s in enumerate((0.2, 0.0, 0.1, 0.0), start=1)]
    while ray.get(rank.alive.remote(), timeout=5)[1] == []:  # until the blocking call has begun
        time.sleep(0.02)
    t0 = time.perf_counter()
    assert ray.get(rank.alive.remote(), timeout=5) == (pid, [("start", 0)])  # answered mid-call
    assert time.perf_counter() - t0 < 1.0 and not ray.wait([blocked], timeout=0)[0]
    assert ray.get([blocked, *later]) == [0, 1, 2, 3, 4]
    assert ray.get(rank.alive.remote())[1] == [(e, i) for i in range(5) for e in ("start", "end")]  # in order, one at a time
    os.kill(pid, signal.SIGSTOP)
    try:
        assert not ray.wait([rank.alive.remote()], timeout=1.0)[0]  # hung: no answer
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_packed_state_is_read_from_the_object_store_without_a_copy(ray_local):
    """danceopd/packed.py rests on this: numpy arrays come back as read-only views of shared
    memory (no copy), torch tensors as fresh writable copies."""
    import torch

    from danceopd.packed import pack_state, unpack_state

    state = {"w": torch.randn(64, 64), "h": torch.randn(64, 64).to(torch.bfloat16)}
    ray = ray_local
    got = ray.get(ray.put(pack_state(state)))
    assert not got["w"].flags.writeable and not got["h"].data.flags.writeable
    assert ray.get(ray.put(state))["w"].is_contiguous()  # torch: unpickled into new memory, writable
    back = unpack_state(got)
    assert torch.equal(back["w"], state["w"]) and torch.equal(back["h"], state["h"])
