"""AutoscalePolicy: windows, bounds, resources and cooldown."""

from danceopd.config import AutoscaleConfig
from services.control.autoscale import AutoscalePolicy


def policy(**kw) -> AutoscalePolicy:
    base = dict(enabled=True, min_rollout_workers=1, max_rollout_workers=4, learner_idle_above=0.3,
                window_steps=3, cooldown_steps=5)
    base.update(kw)
    return AutoscalePolicy(AutoscaleConfig(**base))


def feed(p, steps, workers=1, idle=0.0, depth=0, capacity=8, free=True, start=1):
    """Observe `steps` learner steps with the same signals; the list of answers."""
    return [p.observe(s, idle, depth, capacity, workers, free) for s in range(start, start + steps)]


def test_disabled_never_acts():
    p = policy(enabled=False)
    assert feed(p, 20, idle=0.9) == [0] * 20
    assert feed(p, 20, depth=8, workers=3, start=21) == [0] * 20


def test_grows_after_the_idle_window():
    p = policy()
    assert feed(p, 3, idle=0.5) == [0, 0, 1]
    assert p.decisions[-1][:2] == (3, 1)
    assert "idle" in p.last_reason


def test_idle_window_must_be_consecutive():
    p = policy()
    assert feed(p, 2, idle=0.5) == [0, 0]
    assert feed(p, 1, idle=0.1, start=3) == [0]  # streak broken
    assert feed(p, 3, idle=0.5, start=4) == [0, 0, 1]


def test_threshold_is_strictly_above():
    p = policy(learner_idle_above=0.3)
    assert feed(p, 10, idle=0.3) == [0] * 10


def test_no_growth_without_free_resources_or_at_max():
    p = policy()
    assert feed(p, 10, idle=0.9, free=False) == [0] * 10
    # The window was met all along: growth follows as soon as resources free up.
    assert p.observe(11, 0.9, 0, 8, 1, True) == 1
    q = policy(max_rollout_workers=2)
    assert feed(q, 10, idle=0.9, workers=2) == [0] * 10


def test_shrinks_after_the_full_queue_window_but_not_below_min():
    p = policy()
    assert feed(p, 3, depth=8, workers=3) == [0, 0, -1]
    assert "full" in p.last_reason
    q = policy(min_rollout_workers=2)
    assert feed(q, 10, depth=8, workers=2) == [0] * 10
    r = policy()
    assert feed(r, 10, depth=9, capacity=8, workers=2)[2] == -1  # depth above capacity counts as full


def test_full_queue_blocks_growth_even_when_the_learner_is_idle():
    p = policy()
    out = feed(p, 3, idle=0.9, depth=8, workers=2)
    assert out == [0, 0, -1]  # full queue: more rollouts cannot help


def test_cooldown_after_an_action():
    p = policy(window_steps=2, cooldown_steps=5)
    assert feed(p, 2, idle=0.9) == [0, 1]  # acts at step 2
    # Steps 3..6 are inside the cooldown (2 + 5 = 7 is the first step allowed).
    assert feed(p, 4, idle=0.9, workers=2, start=3) == [0, 0, 0, 0]
    assert p.observe(7, 0.9, 0, 8, 2, True) == 1
    assert [d[0] for d in p.decisions] == [2, 7]


def test_windows_restart_after_an_action():
    p = policy(window_steps=3, cooldown_steps=0)
    assert feed(p, 3, idle=0.9) == [0, 0, 1]
    assert feed(p, 3, idle=0.9, workers=2, start=4) == [0, 0, 1]  # a fresh window, not the old streak


def test_one_observation_per_step():
    p = policy(window_steps=3)
    assert [p.observe(1, 0.9, 0, 8, 1, True) for _ in range(5)] == [0] * 5
    assert p.idle_streak == 1


def test_out_of_bounds_fleet_moves_back():
    p = policy(min_rollout_workers=2, max_rollout_workers=3, cooldown_steps=2)
    assert p.observe(1, 0.0, 0, 8, 1, True) == 1  # below min: no window needed
    assert p.observe(2, 0.0, 0, 8, 1, True) == 0  # cooldown
    assert p.observe(3, 0.0, 0, 8, 5, True) == -1  # above max
    q = policy(min_rollout_workers=2)
    assert q.observe(1, 0.0, 0, 8, 1, False) == 0  # below min but no room


def test_grow_then_shrink_scenario():
    """The learner starves with one worker, the fleet grows to three, then rollouts outpace the
    learner and the fleet shrinks back one at a time."""
    p = policy(window_steps=2, cooldown_steps=2, max_rollout_workers=3)
    workers, step, history = 1, 0, []
    for idle, depth in [(0.8, 0)] * 8 + [(0.0, 8)] * 8:
        step += 1
        workers += p.observe(step, idle, depth, 8, workers, True)
        history.append(workers)
    assert max(history) == 3
    assert history[-1] == 1
    assert all(abs(b - a) <= 1 for a, b in zip(history, history[1:]))
