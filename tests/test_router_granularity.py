"""The router's route hand-out: `routing.granularity` update (one route per optimizer update)
versus sample (a route per sample), owed replacements, and its checkpointed state."""

import threading

from danceopd.checkpoint import latest_checkpoint, load_json, save_json
from services import loop as loops
from services.loop import TrainLoop
from tests.conftest import cfg_for


def make_router(cfg):
    return loops.make_router(cfg, cfg.learner.world_size * cfg.learner.grad_accum)


def order_routes(orders) -> list[set[str]]:
    return [{it.route for it in o.items} for o in orders]


def test_update_granularity_gives_per_step_consecutive_orders_one_route(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "r", learner__grad_accum=2, learner__world_size=2, rollout__batch_size=8)
    router = make_router(cfg)
    routes = order_routes(router.next_orders(7, 8) + router.next_orders(17, 8))  # hand-outs of any size
    assert all(len(r) == 1 for r in routes), routes
    flat = [next(iter(r)) for r in routes]
    groups = [flat[i:i + 4] for i in range(0, 24, 4)]  # per_step = world_size * grad_accum = 4
    assert all(len(set(g)) == 1 for g in groups), groups
    assert len({g[0] for g in groups}) > 1  # groups draw their route by weight, not one forever
    assert router.policy.drawn == 6  # one draw per update


def test_owed_routes_come_first_and_leave_the_open_group_alone(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "r", learner__grad_accum=3)
    a, b = make_router(cfg), make_router(cfg)
    a.next_orders(1, 4)
    b.next_orders(1, 4)
    got = a.next_orders(4, 4, owed=["global_edit", "t2i"])
    assert [next(iter(r)) for r in order_routes(got[:2])] == ["global_edit", "t2i"]
    # the replacements drew fresh data but did not advance the group: the rest of a matches b
    assert order_routes(got[2:]) == order_routes(b.next_orders(2, 4))
    assert len({it.sample_index for o in got for it in o.items}) == 16  # fresh samples


def test_sample_granularity_mixes_routes_within_an_order(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "r", learner__grad_accum=2, routing__granularity="sample")
    routes = order_routes(make_router(cfg).next_orders(4, 32))
    assert all(len(r) > 1 for r in routes), routes


def test_state_dict_round_trip_reproduces_the_sequence_mid_update(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "r", learner__grad_accum=3, rollout__batch_size=4)
    a = make_router(cfg)
    a.next_orders(4, 4)  # the second update is open: 2 of its 3 orders still to come
    state = a.state_dict()
    assert state["update_left"] == 2
    b = make_router(cfg)
    b.load_state_dict(state)
    rest_a, rest_b = a.next_orders(9, 4), b.next_orders(9, 4)
    assert [o.ticket for o in rest_a] == [o.ticket for o in rest_b]
    assert [[(it.sample_index, it.route, it.row) for it in o.items] for o in rest_a] == \
           [[(it.sample_index, it.route, it.row) for it in o.items] for o in rest_b]
    assert a.state_before(5)["update_left"] == 1  # what a checkpoint at ticket 5 stores


def test_resume_from_a_checkpoint_with_an_open_update_does_not_hang(toy_raw, tmp_path):
    """A checkpoint's router state can sit inside an update (on_stale: drop or a lost batch let
    a later ticket of the route be consumed first). A resumed run re-issues whole updates from
    there, so the open one is closed; else the job's last update stays short and it never ends."""
    part = cfg_for(toy_raw, tmp_path, "open", learner__steps=3, learner__grad_accum=2, checkpoint__every=3)
    TrainLoop(part, show_progress=False).run()
    ck = latest_checkpoint(part.output_path)
    state = load_json(ck / "state.json")
    assert state["router"]["update_left"] == 0  # no loss, no drop: a checkpoint sits between updates
    state["router"].update(update_left=1, update_routes=["t2i"])
    save_json(ck / "state.json", state)
    resumed = cfg_for(toy_raw, tmp_path, "open", learner__steps=6, learner__grad_accum=2, checkpoint__every=0)
    loop = TrainLoop(resumed, resume_from=ck, show_progress=False)
    out = {}
    t = threading.Thread(target=lambda: out.update(summary=loop.run()), daemon=True)
    t.start()
    t.join(timeout=60)
    if t.is_alive():
        loop.request_stop()
        t.join(timeout=30)
    loop.shutdown()
    assert out.get("summary", {}).get("steps") == 6 and loop.step == 6, "resumed run hung on a short update"
