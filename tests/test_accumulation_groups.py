"""`routing.accumulation_groups`: every group gets an equal share of every optimizer update (the
reference's DiffusionOPD/FlowOPD G = M recipe), a route drawn by weight within each group from
the checkpointed route stream; with lag, `on_stale: drop` (a dropped batch refills its own
group), resume, and in both modes."""

import copy
import random
import threading

import pytest

from danceopd.checkpoint import latest_checkpoint
from danceopd.config import ConfigError
from services import loop as loops
from services.loop import TrainLoop
from services.pipeline import RolloutPipeline
from services.telemetry.progress import read_metrics
from tests.conftest import cfg_for, lean

ROUTES = ("t2i", "local_edit", "global_edit")  # configs/toy.yaml


def grouped(raw: dict, groups) -> dict:
    raw = copy.deepcopy(raw)
    raw["routing"]["accumulation_groups"] = groups
    return raw


def step_routes(cfg) -> list[set[str]]:
    return [set(rec["route_loss"]) for rec in read_metrics(cfg.output_path / "metrics.jsonl")[0]]


def train(cfg, mode: str = "local", resume_from=None, stall_s: float = 240) -> dict:
    """Run the job; one whose steps can never be assembled (a group left without batches) is
    stopped after `stall_s` and reported as stalled, instead of hanging the test run."""
    loop = TrainLoop(cfg, mode, resume_from=resume_from, show_progress=False)
    out = {}
    t = threading.Thread(target=lambda: out.update(summary=loop.run()), daemon=True)
    try:
        t.start()
        t.join(timeout=stall_s)
        if t.is_alive():
            loop.request_stop()
            t.join(timeout=60)
    finally:
        loop.shutdown()
    assert out.get("summary", {}).get("steps") == cfg.learner.steps, f"stalled at step {loop.step}: {pipeline_state(loop)}"
    return out["summary"]


def pipeline_state(loop) -> str:
    """What a stalled job's pipeline held, for the failure message."""
    p = loop.pipe
    return (f"queued={[(q.ticket, q.route, q.version) for q in p.queued.values()]} "
            f"ready={sorted(p.ready)} in_flight={sorted(p.in_flight)} owed={p.owed} "
            f"workers={p.worker_version} learner_busy={loop.learner.busy} accounting={p.accounting()}")


def order_route(order) -> str:
    (route,) = {it.route for it in order.items}  # an order is one micro-batch of one route
    return route


# ---- config ----------------------------------------------------------------------------------

def test_bare_names_are_groups_of_one_as_in_the_reference(toy_raw, tmp_path):
    cfg = cfg_for(grouped(toy_raw, ["t2i", ["local_edit", "global_edit"]]), tmp_path, "c", learner__grad_accum=2)
    assert cfg.routing.accumulation_groups == [["t2i"], ["local_edit", "global_edit"]]
    assert cfg_for(toy_raw, tmp_path, "c").routing.accumulation_groups is None  # default: one route per update


@pytest.mark.parametrize("groups, over, message", [
    ([["t2i"], ["local_edit"], ["global_edit"]], {"learner__grad_accum": 2, "learner__world_size": 2},
     "routing.accumulation_groups: 3 groups cannot share the 4 micro-batches of an update equally "
     "(learner.world_size x grad_accum = 4; make it a multiple of 3)"),
    ([["t2i", "nope"], ["local_edit", "global_edit"]], {}, "routing.accumulation_groups.0: unknown route 'nope'"),
    ([["t2i", "local_edit"], ["local_edit", "global_edit"]], {},
     "routing.accumulation_groups.1: route 'local_edit' is already in group 0"),
    ([["t2i"], ["local_edit"]], {}, "routing.accumulation_groups: route 'global_edit' is in no group"),
    ([["t2i", "local_edit", "global_edit"], []], {}, "routing.accumulation_groups.1: an empty group"),
    ([], {}, "routing.accumulation_groups: List should have at least 1 item"),
    ([["t2i"], ["local_edit", "global_edit"]], {"routing__granularity": "sample"},
     "routing.accumulation_groups: needs routing.granularity update"),
])
def test_bad_groups_are_refused_in_one_line(toy_raw, tmp_path, groups, over, message):
    with pytest.raises(ConfigError) as err:
        cfg_for(grouped(toy_raw, groups), tmp_path, "c", **{"learner__grad_accum": 2, **over})
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_a_group_whose_weights_are_all_zero_is_refused(toy_raw, tmp_path):
    raw = grouped(toy_raw, [["t2i", "local_edit"], ["global_edit"]])
    raw["routing"]["routes"][2]["weight"] = 0.0
    with pytest.raises(ConfigError, match=r"^routing.accumulation_groups.1: the weights of its routes are all 0"):
        cfg_for(raw, tmp_path, "c", learner__grad_accum=2)


# ---- router: the hand-out --------------------------------------------------------------------

def test_every_update_gives_each_group_an_equal_consecutive_share(toy_raw, tmp_path):
    """per_step 6 (2 ranks x grad_accum 3), groups [t2i, local_edit] and [global_edit]: orders
    0-2 of each update share one route of the first group, drawn by weight; 3-5 global_edit."""
    cfg = cfg_for(grouped(toy_raw, [["t2i", "local_edit"], ["global_edit"]]), tmp_path, "r",
                  learner__grad_accum=3, learner__world_size=2)
    router = loops.make_router(cfg, 6)
    routes = [order_route(o) for o in router.next_orders(5, 4) + router.next_orders(55, 4)]  # hand-outs of any size
    updates = [routes[i:i + 6] for i in range(0, 60, 6)]
    for u in updates:
        assert len(set(u[:3])) == 1 and u[0] in ("t2i", "local_edit") and u[3:] == ["global_edit"] * 3, u
    assert {u[0] for u in updates} == {"t2i", "local_edit"}  # drawn by weight, not fixed
    assert router.policy.drawn == 20  # one draw per group per update, from the one checkpointed stream


def test_router_state_resumes_mid_update_and_reads_old_checkpoints(toy_raw, tmp_path):
    cfg = cfg_for(grouped(toy_raw, [["t2i", "local_edit"], ["global_edit"]]), tmp_path, "r", learner__grad_accum=4)
    a, b = loops.make_router(cfg, 4), loops.make_router(cfg, 4)
    a.next_orders(5, 4)  # the second update is open: 3 of its 4 orders still to come
    state = a.state_dict()
    assert state["update_left"] == 3 and len(state["update_routes"]) == 2
    b.load_state_dict(state)
    assert [order_route(o) for o in a.next_orders(11, 4)] == [order_route(o) for o in b.next_orders(11, 4)]
    # a checkpoint written before accumulation groups held one route and the orders left
    old = {k: v for k, v in state.items() if k not in ("update_routes", "update_left")}
    flat = loops.make_router(cfg_for(toy_raw, tmp_path, "f", learner__grad_accum=4), 4)
    flat.load_state_dict({**old, "group_route": "local_edit", "group_left": 2})
    assert [order_route(o) for o in flat.next_orders(2, 4)] == ["local_edit"] * 2


# ---- pipeline: a step covers every group, drops refill their own group ------------------------

def test_a_step_takes_each_groups_share_and_a_dropped_batch_refills_its_group():
    """3 groups of one route, per_step 3: a stale-dropped `b` is owed, handed out next, and the
    step waits for it instead of training on a or c twice."""
    p = RolloutPipeline(per_step=3, total_steps=10, capacity=9, max_lag=0, on_stale="drop", by_route=True,
                        groups={"a": 0, "b": 1, "c": 2})
    p.worker_version.update(w=0)
    for t, r in enumerate("abcabc"):
        p.issue(t, "w", 4, route=r)
    for t in range(6):
        p.completed(t, f"h{t}", 0 if t in (0, 1, 2, 4) else 1)  # b of the second update: old weights
    assert p.take().tickets == [0, 1, 2]
    p.stepped()
    take = p.take()
    assert take.dropped == {4: 4} and not take.handles and p.owed == ["b"]
    p.issue(6, "w", 4, route="b")  # the replacement, same route, so same group
    assert not p.can_learn()  # a and c alone are not a step
    p.completed(6, "h6", 1)
    assert p.take().tickets == [3, 5, 6]


def test_each_group_follows_its_oldest_route_across_updates():
    """Group 0 draws t2i then local_edit; a short t2i share waits for its replacement while the
    next update's local_edit batches are queued (one route per group per step)."""
    p = RolloutPipeline(per_step=4, total_steps=10, capacity=12, max_lag=5, by_route=True,
                        groups={"t2i": 0, "local_edit": 0, "global_edit": 1})
    p.worker_version.update(w=0)
    for t, r in enumerate(["t2i", "t2i", "global_edit", "global_edit", "local_edit", "local_edit",
                           "global_edit", "global_edit"]):
        p.issue(t, "w", 1, route=r)
    p.lose(1)
    for t in (0, 2, 3, 4, 5, 6, 7):
        p.completed(t, t, 0)
    assert not p.can_learn() and p.take_owed(1) == ["t2i"]
    p.issue(8, "w", 1, route="t2i")
    p.completed(8, 8, 0)
    assert p.take().tickets == [0, 2, 3, 8]
    p.stepped()
    assert p.take().tickets == [4, 5, 6, 7]


def test_no_order_beyond_the_last_step_while_it_trains():
    """The last step's batches leave the queue when it starts; until it is done they still count,
    else a surplus order of another route takes the room an owed replacement needs (a stall)."""
    p = RolloutPipeline(per_step=2, total_steps=2, capacity=4, max_lag=5, by_route=True, groups={"a": 0, "b": 1})
    p.worker_version.update(w=0)
    for t, r in enumerate("abab"):
        p.issue(t, "w", 1, route=r)
        p.completed(t, t, 0)
    assert p.take().tickets == [0, 1]  # step 0 training, step 1 queued: the job needs nothing more
    assert p.plan(["w"]) == []


def simulate(seed: int, router, groups: dict, steps: int = 8, per_step: int = 6, workers: int = 2) -> int:
    """A job driven like the loop with random arrival order, slow weight pick-up (so batches go
    stale and are dropped and replaced) and learner steps of random length; the steps it did."""
    rng = random.Random(seed)
    p = RolloutPipeline(per_step, steps, 2 * per_step, 1, "drop", depth=4, by_route=True, groups=groups)
    names = [f"w{i}" for i in range(workers)]
    p.worker_version.update({w: 0 for w in names})
    made_with, learning = {}, 0
    for _ in range(3000):
        if p.step == steps:
            break
        plan = p.plan(names)
        for w, order in zip(plan, router.next_orders(len(plan), 1, p.take_owed(len(plan)))):
            p.issue(order.ticket, w, 1, order_route(order))
            made_with[order.ticket] = p.worker_version[w]
        for t in [t for t in list(p.in_flight) if rng.random() < 0.3]:
            p.rolled_out(t)
            p.completed(t, t, made_with.pop(t))
        for w in names:
            if rng.random() < 0.2:
                p.worker_version[w] = p.step
        if not p.in_flight and p.queued and not p.can_learn():
            p.purge()
        if learning:
            learning -= 1
            if not learning:
                p.stepped()
        elif (take := p.take()) is not None and take.handles:
            learning = rng.randint(1, 4)
    return p.step


def test_random_schedules_with_stale_drops_always_finish(toy_raw, tmp_path):
    """The Ray job that once stalled at its last step, as a pure schedule: three groups of one
    route, two ranks x grad_accum 3, lag 1 with `on_stale: drop`, over many random schedules."""
    cfg = cfg_for(grouped(toy_raw, list(ROUTES)), tmp_path, "sim", learner__grad_accum=3, learner__world_size=2)
    groups = {r: i for i, g in enumerate(cfg.routing.accumulation_groups) for r in g}
    stalled = [s for s in range(200) if simulate(s, loops.make_router(cfg, 6), groups) != 8]
    assert not stalled, f"stalled with seeds {stalled}"


def test_groups_must_divide_a_step():
    with pytest.raises(ValueError, match="3 groups cannot share 4 batches"):
        RolloutPipeline(per_step=4, total_steps=1, capacity=4, max_lag=0, by_route=True, groups={"a": 0, "b": 1, "c": 2})


# ---- the loop: local and Ray ------------------------------------------------------------------

@pytest.mark.slow
def test_local_every_step_covers_every_group_with_lag_and_drop(toy_raw, tmp_path):
    """Three groups, grad_accum 3, lag 1 with `on_stale: drop` and workers running ahead, so
    batches really are dropped and re-issued: every step still trains on all three routes, and
    the step's loss is the mean of the route losses (equal shares: the reference's average)."""
    cfg = cfg_for(grouped(toy_raw, list(ROUTES)), tmp_path, "loc", learner__steps=20, learner__grad_accum=3,
                  replay__capacity=12, checkpoint__every=0, sync__max_policy_lag=1, sync__on_stale="drop",
                  rollout__orders_per_worker=4)
    summary = train(cfg, stall_s=120)
    assert summary["replay"]["dropped"].get("stale", 0) > 0 and summary["replay"]["max_lag_seen"] == 1
    rows = read_metrics(cfg.output_path / "metrics.jsonl")[0]
    assert len(rows) == 20 and all(set(r["route_loss"]) == set(ROUTES) for r in rows), [r["route_loss"] for r in rows]
    for r in rows:
        assert r["loss"] == pytest.approx(sum(r["route_loss"].values()) / 3, rel=1e-5)
    assert summary["accounting"]["consumed"] == 20 * 3 * cfg.rollout.batch_size


@pytest.mark.slow
def test_resume_continues_the_identical_group_route_sequence(toy_raw, tmp_path):
    raw = grouped(toy_raw, [["t2i", "local_edit"], ["global_edit"]])
    common = dict(learner__grad_accum=2, checkpoint__every=5)
    full = cfg_for(raw, tmp_path, "full", learner__steps=12, **common)
    train(full)
    part = cfg_for(raw, tmp_path, "part", learner__steps=5, **common)
    train(part)
    resumed = cfg_for(raw, tmp_path, "part", learner__steps=12, **common)
    train(resumed, resume_from=latest_checkpoint(part.output_path))
    routes = step_routes(full)
    assert step_routes(resumed)[-12:] == routes
    assert all(len(r) == 2 and "global_edit" in r for r in routes)
    assert {"t2i", "local_edit"} <= set().union(*routes[5:])  # the draw after the resume point matters


@pytest.mark.slow
def test_ray_every_step_covers_every_group_on_every_rank(ray_local, toy_raw, tmp_path):
    """Two ranks x grad_accum 3 = 6 micro-batches, two per group (the groups straddle the ranks),
    two rollout workers, lag 1 with `on_stale: drop`."""
    cfg = cfg_for(grouped(lean(toy_raw), list(ROUTES)), tmp_path, "ray", learner__steps=12, learner__grad_accum=3,
                  learner__world_size=2, rollout__workers=2, rollout__batch_size=8, replay__capacity=12,
                  checkpoint__every=0, sync__max_policy_lag=1, sync__on_stale="drop")
    summary = train(cfg, mode="ray")
    rows = step_routes(cfg)
    assert len(rows) == 12 and all(r == set(ROUTES) for r in rows), rows
    assert summary["replay"]["max_lag_seen"] <= 1
    assert summary["accounting"]["consumed"] == 12 * 6 * 8
