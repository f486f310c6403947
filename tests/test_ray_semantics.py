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
