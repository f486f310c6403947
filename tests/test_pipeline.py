"""The rollout pipeline's bookkeeping, without Ray: gate, ticket FIFO, lost tickets, resume point."""

import pytest

from services.pipeline import RolloutPipeline


def pipe(per_step=2, steps=10, capacity=8, lag=0, on_stale="wait", workers=("a", "b"), depth=1):
    p = RolloutPipeline(per_step, steps, capacity, lag, on_stale, depth)
    p.worker_version.update(dict.fromkeys(workers, 0))
    return p


def issue(p, workers):
    """Hand out what the plan allows; returns (ticket, worker) pairs."""
    out = []
    for w in p.plan(list(workers)):
        t = p.next_ticket
        p.issue(t, w, samples=4)
        out.append((t, w))
    return out


def test_gate_on_policy_issues_exactly_one_step_with_current_weights():
    p = pipe(per_step=2, lag=0)
    assert [w for _, w in issue(p, "ab")] == ["a", "b"]  # positions 0, 1 -> step 0, version 0 ok
    assert issue(p, "ab") == []  # depth 1 at lag 0: both busy
    for t in (0, 1):
        p.completed(t, f"rb{t}", 0)
    assert issue(p, "ab") == []  # position 2 belongs to step 1: version 0 is too old at lag 0
    assert p.take().handles == ["rb0", "rb1"]
    p.stepped()
    p.worker_version.update(a=1, b=1)
    assert [t for t, _ in issue(p, "ab")] == [2, 3]


def test_a_worker_takes_its_next_order_while_its_last_batch_is_routed():
    p = pipe(per_step=2, lag=1, capacity=16)
    assert [t for t, _ in issue(p, "a")] == [0]
    assert issue(p, "a") == []  # one order per worker: busy rolling out
    p.rolled_out(0)
    assert [t for t, _ in issue(p, "a")] == [1]  # ticket 0 still in flight (routing), worker free
    assert set(p.in_flight) == {0, 1} and p.busy_workers() == {"a"}


def test_gate_with_lag_one_runs_ahead_by_exactly_one_step():
    p = pipe(per_step=2, lag=1, capacity=16, depth=2)
    got = issue(p, "ab")
    # two orders per worker, positions 0..3 are steps 0 and 1: version 0 is within lag 1 of both
    assert issue(p, "ab") == []  # both workers hold two orders
    assert [t for t, _ in got] == [0, 1, 2, 3] and [w for _, w in got] == ["a", "b", "a", "b"]
    assert all(p.worker_version[w] >= t // 2 - 1 for t, w in got)


def test_capacity_and_remaining_steps_bound_what_is_issued():
    p = pipe(per_step=2, lag=3, capacity=3, workers="abc", depth=2)
    assert len(issue(p, "abc")) == 3  # capacity 3, although depth allows 6
    p2 = pipe(per_step=2, steps=1, lag=3, capacity=16, workers="abc", depth=2)
    assert len(issue(p2, "abc")) == 2  # one step of two batches is all the job needs


def test_replay_order_is_ticket_order_whatever_finishes_first():
    p = pipe(per_step=2, lag=1, capacity=16, depth=2)
    issue(p, "ab")
    p.completed(2, "rb2", 0)
    p.completed(1, "rb1", 0)
    assert list(p.queued) == [] and not p.can_learn()  # ticket 0 has not arrived: nothing may overtake it
    p.completed(0, "rb0", 0)
    assert [q.handle for q in p.queued.values()] == ["rb0", "rb1", "rb2"]
    p.completed(3, "rb3", 0)
    assert p.take().handles == ["rb0", "rb1"] and p.take().handles == ["rb2", "rb3"]


def test_a_lost_ticket_is_skipped_and_moves_later_positions_earlier():
    p = pipe(per_step=2, lag=0, capacity=16)
    issue(p, "ab")
    p.completed(1, "rb1", 0)
    lost = p.lose(0)
    assert lost.worker == "a" and p.position == 1
    assert [q.handle for q in p.queued.values()] == ["rb1"]  # 0 will never come: 1 goes in
    # position 1 is free again: a replacement for the lost batch is still step 0 (version 0 ok)
    assert [t for t, _ in issue(p, "ab")] == [2]
    acct = p.accounting()
    assert acct["issued"] == 12 and acct["lost"] == 4 and acct["produced"] == 4 and acct["in_flight"] == 4


def test_first_unconsumed_ticket_skips_consumed_lost_and_dropped():
    p = pipe(per_step=2, lag=1, capacity=16, on_stale="drop", depth=2)
    issue(p, "ab")  # tickets 0..3
    assert p.first_unconsumed() == 0
    p.lose(0)
    for t, version in ((1, 2), (2, 0), (3, 2)):
        p.completed(t, f"rb{t}", version)
    assert p.first_unconsumed() == 1
    p.stepped()
    p.stepped()  # at step 2, ticket 2 (version 0) is beyond lag 1
    take = p.take()
    assert take.tickets == [1, 3] and take.handles == ["rb1", "rb3"] and take.dropped == {2: 4}
    assert p.first_unconsumed() == p.next_ticket == 4
    assert p.replay_stats()["lag_counts"] == {"0": 8}
    acct = p.accounting()
    assert acct["consumed"] == 8 and acct["dropped"] == {"stale": 4} and acct["lost"] == 4
    assert acct["issued"] == acct["produced"] + acct["lost"]
    assert acct["produced"] == acct["consumed"] + sum(acct["dropped"].values()) + acct["queued"]


def test_drop_mode_never_waits_for_weights():
    p = pipe(per_step=1, lag=0, on_stale="drop", capacity=16)
    assert len(issue(p, "ab")) == 2
    for t in (0, 1):
        p.completed(t, t, 0)
    assert len(issue(p, "ab")) == 2  # version 0 everywhere, yet step 2 and 3 batches are issued


def test_resume_restarts_tickets_and_positions():
    p = pipe(per_step=2, lag=0)
    p.resume(step=5, next_ticket=11)
    p.worker_version.update(a=5, b=5)
    assert [t for t, _ in issue(p, "ab")] == [11, 12]
    assert p.position == 12  # 10 consumed before the resume + 2 now
    with pytest.raises(RuntimeError, match="ticket 99 handed out, expected 13"):
        p.issue(99, "a", 4)


def test_capacity_below_one_step_is_refused():
    with pytest.raises(ValueError, match="replay.capacity: 2 batches cannot hold one learner step"):
        RolloutPipeline(per_step=4, total_steps=1, capacity=2, max_lag=0)


def test_by_route_a_lost_or_dropped_batch_is_owed_and_learning_waits_for_its_route():
    """granularity update: a lost/dropped batch's route is handed out next (its update is short),
    and a step starts only when the oldest queued batch's route has a full step queued."""
    p = RolloutPipeline(per_step=2, total_steps=10, capacity=8, max_lag=0, by_route=True)
    p.worker_version.update(a=0, b=0)
    for t, r in enumerate("AABB"):
        p.issue(t, "ab"[t % 2], 4, route=r)
    p.lose(1)
    assert p.owed == ["A"] and p.take_owed(3) == ["A"]
    for t in (0, 2, 3):
        p.completed(t, f"h{t}", 0 if t == 2 else 1)
    assert not p.can_learn()  # A (the oldest) has one of two; B's full step waits behind it
    p.issue(4, "a", 4, route="A")
    assert p.owed == []
    p.completed(4, "h4", 1)
    assert p.can_learn()
    p.stepped()
    take = p.take()  # B's ticket 2 (version 0) is dropped as stale at step 1: B is owed now
    assert take.tickets == [0, 4] and take.dropped == {2: 4}
    assert p.owed == ["B"]
    flat = RolloutPipeline(per_step=2, total_steps=10, capacity=8, max_lag=0)
    flat.worker_version.update(a=0)
    flat.issue(0, "a", 4, route="A")
    flat.lose(0)
    assert flat.owed == [] and flat.take_owed(2) == []


def test_replay_by_route_takes_the_oldest_routes_batches():
    def filled(by_route, routes, start=0, p=None):
        p = p or RolloutPipeline(per_step=2, total_steps=10, capacity=8, max_lag=0, by_route=by_route)
        p.worker_version.update(a=0)
        for t, r in enumerate(routes, start):
            p.issue(t, "a", 1, route=r)
            p.completed(t, f"rb{t}", 0)
        return p

    p = filled(True, "ABAB")
    assert p.take().tickets == [0, 2]
    assert p.take().tickets == [1, 3]
    filled(True, "ABB", 4, p)
    assert p.take() is None and len(p.queued) == 3  # the oldest is A and A has one batch: wait
    assert filled(False, "ABAB").take().tickets == [0, 1]


def test_drain_drops_queued_and_waiting_batches_and_the_accounting_closes():
    p = pipe(per_step=2, lag=1, capacity=16, depth=2)
    issue(p, "ab")  # tickets 0..3
    for t in (0, 2):
        p.completed(t, t, 0)  # 2 waits for ticket 1
    assert set(p.queued) == {0} and set(p.ready) == {2}
    assert p.drain() == {0: 4, 2: 4}
    acct = p.accounting()
    assert acct["dropped"] == {"unconsumed": 8} and acct["queued"] == 0 and acct["in_flight"] == 8
    assert p.owed == []  # unconsumed batches are not re-issued


def test_abandon_drops_batches_still_in_flight_and_the_accounting_closes():
    """A graceful stop's grace ran out: what is still in flight is dropped as `stopped`."""
    from tests.test_ray_runtime import assert_accounting_closes

    p = pipe(per_step=2, lag=1, capacity=16, depth=2)
    issue(p, "ab")  # tickets 0..3
    p.completed(1, 1, 0)  # waits for ticket 0
    assert p.abandon() == {0: 4, 2: 4, 3: 4}
    p.drain()
    acct = p.accounting()
    assert acct["dropped"] == {"stopped": 12, "unconsumed": 4} and acct["consumed"] == 0
    assert_accounting_closes(acct)
    assert p.owed == [] and p.first_unconsumed() == p.next_ticket == 4


@pytest.mark.parametrize("depth,expect", [
    (1, [("a", [0]), ("a", [2]), ("b", [1])]),  # one order a call
    (2, [("a", [0]), ("a", [2]), ("b", [1])]),  # one runs, one waits: still one a call
    (4, [("a", [0, 2]), ("b", [1])]),
    (8, [("a", [0, 2]), ("b", [1])]),
])
def test_a_workers_orders_go_in_calls_of_half_its_depth_in_hand_out_order(depth, expect):
    from services.pipeline import as_calls

    assert as_calls(["a", "b", "a"], [0, 1, 2], depth) == expect


def test_a_hand_out_of_four_orders_to_a_worker_holding_four_is_two_calls_of_two():
    from services.pipeline import as_calls

    assert as_calls(["w"] * 4, [10, 11, 12, 13], 4) == [("w", [10, 11]), ("w", [12, 13])]
