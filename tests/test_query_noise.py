"""The noise levels a query bias visits (issue 23, point 8): the exact sigma table, explicit query
laws (`method.query_bias` as a list) and the paper-matched ShapesBench ablation rows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from danceopd.config import ConfigError, config_from_dict, dump_config
from danceopd.flow import sigma_grid
from danceopd.queries import index_probabilities, select_queries, sigma_matched_law, sigma_visits

ROOT = Path(__file__).resolve().parent.parent
BENCH = sigma_grid("sd3", 8, 1.0).double().numpy()  # ShapesBench's grid
PAPER = sigma_grid("sd3", 16, 3.0).double().numpy()  # the reference's SD3.5 recipe
NAMED = ("low_t", "mid_t", "high_t", "uniform")


def _mc_sigmas(bias, sigmas, draws: int, seed: int) -> np.ndarray:
    """Sigmas of the states the real sampler picks (K = 1), one draw per call as a rollout does."""
    rng = np.random.default_rng(seed)
    n = len(sigmas) - 1
    return np.array([sigmas[select_queries(bias, n, 1, rng)[0]] for _ in range(draws)])


# ---- the sigma table --------------------------------------------------------------------------

def test_sigma_visits_hand_values():
    # Two states [1, s1]: low_t picks index 1 when u >= 1/2, P = 1 - I_.5(5, 2) = 1 - (6/32 - 5/64) = 57/64.
    two = sigma_grid("sd3", 2, 1.0).double().numpy()
    v = sigma_visits("low_t", two)
    assert v.mean == pytest.approx(7 / 64 * two[0] + 57 / 64 * two[1], abs=1e-12)
    assert v.q25 == v.median == v.q75 == two[1]  # 57/64 of the mass sits at the low state
    # uniform on the 8 evenly spaced states: the mean is the grid's mean, quartiles at the 2nd/4th/6th lowest
    u = sigma_visits("uniform", BENCH)
    assert u.mean == pytest.approx(BENCH[:-1].mean(), abs=1e-12)
    assert (u.q25, u.median, u.q75) == (BENCH[6], BENCH[4], BENCH[2])
    # the numbers: low_t visits 0.26 here and 0.48 on the paper's grid
    assert sigma_visits("low_t", BENCH).mean == pytest.approx(0.256, abs=1e-3)
    assert sigma_visits("low_t", PAPER).mean == pytest.approx(0.484, abs=1e-3)


@pytest.mark.parametrize("bias", NAMED)
def test_sigma_visits_match_the_real_sampler(bias):
    """Monte-Carlo draws of select_queries: mean and median within sampling error of the exact
    table (sd of sigma <= 0.5, 6000 draws: standard error <= 0.0065; tolerance 0.02)."""
    for sigmas in (BENCH, PAPER):
        s = _mc_sigmas(bias, sigmas, 6000, seed=11)
        v = sigma_visits(bias, sigmas)
        assert s.mean() == pytest.approx(v.mean, abs=0.02), (bias, len(sigmas))
        # the median of the draws is a grid sigma; the exact one is the same state (or its neighbour
        # when the cumulative probability sits within sampling error of 1/2)
        i = int(np.argmin(np.abs(sigmas - np.median(s))))
        j = int(np.argmin(np.abs(sigmas - v.median)))
        assert abs(i - j) <= 1, (bias, len(sigmas), np.median(s), v.median)


# ---- the sigma-matched law --------------------------------------------------------------------

@pytest.mark.parametrize("bias", NAMED)
def test_sigma_matched_law_visits_the_reference_sigmas(bias):
    law = sigma_matched_law(bias, BENCH, PAPER)
    assert law.shape == (8,) and (law >= 0).all() and law.sum() == pytest.approx(1, abs=1e-12)
    # exact mean: each reference state's mass is split linearly between its two neighbours here
    assert sigma_visits(law, BENCH).mean == pytest.approx(sigma_visits(bias, PAPER).mean, abs=1e-9)
    # and the real sampler drawing from it visits that mean (within sampling error)
    s = _mc_sigmas(list(law), BENCH, 6000, seed=5)
    assert s.mean() == pytest.approx(sigma_visits(bias, PAPER).mean, abs=0.02)
    # on the reference grid itself it is the index rule
    assert np.allclose(sigma_matched_law(bias, PAPER, PAPER), index_probabilities(bias, 16), atol=1e-12)


def test_sigma_matched_law_moves_each_state_to_its_two_neighbours():
    for j in range(16):  # a law with all its mass on the paper's state j
        one = np.eye(16)[j]
        law = sigma_matched_law(one, BENCH, PAPER)
        support = np.flatnonzero(law > 0)
        assert len(support) <= 2 and (len(support) == 1 or support[1] == support[0] + 1), (j, law)
        assert BENCH[support].min() <= PAPER[j] + 1e-12 and BENCH[support].max() >= PAPER[j] - 1e-12
        assert law @ BENCH[:-1] == pytest.approx(PAPER[j], abs=1e-12)
    # a reference sigma outside the grid's range goes to the nearer end state
    coarse = np.array([0.9, 0.5, 0.2, 0.0])
    assert np.allclose(sigma_matched_law(np.eye(16)[0], coarse, PAPER), [1, 0, 0])
    assert np.allclose(sigma_matched_law(np.eye(16)[15], coarse, PAPER), [0, 0, 1])
    with pytest.raises(ValueError, match="must decrease"):
        sigma_matched_law("low_t", BENCH[::-1], PAPER)


def test_explicit_laws_draw_valid_seeded_indices_from_their_support():
    law = [0.0, 0.5, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0]
    rng = np.random.default_rng(0)
    for k in (1, 2, 3):
        for _ in range(100):
            idx = select_queries(law, 8, k, rng)
            assert idx.dtype == np.int64 and idx.shape == (k,) and (np.diff(idx) > 0).all()
            assert set(idx.tolist()) <= {1, 3, 5}

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [select_queries(law, 8, 2, rng).tolist() for _ in range(30)]

    assert draw(3) == draw(3) and draw(3) != draw(4)
    for bad in ([0.5, 0.5], [-1.0] + [0.25] * 7, [0.0] * 8):
        with pytest.raises(ValueError, match="query law"):
            select_queries(bad, 8, 1, np.random.default_rng(0))


# ---- config ------------------------------------------------------------------------------------

def _cfg(toy_raw, tmp_path, **method):
    raw = {**toy_raw, "method": {**toy_raw["method"], "rollout_steps": 4, "k": 1, **method}}
    return config_from_dict(raw, base_dir=tmp_path)


def test_config_takes_an_explicit_law_and_refuses_bad_ones_in_one_line(toy_raw, tmp_path):
    cfg = _cfg(toy_raw, tmp_path, query_bias=[0.1, 0.2, 0.3, 0.4])
    assert cfg.method.query_bias == [0.1, 0.2, 0.3, 0.4]
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), base_dir=tmp_path)
    assert again.method.query_bias == cfg.method.query_bias  # the saved config reloads to the same law
    assert _cfg(toy_raw, tmp_path, query_bias="mid_t").method.query_bias == "mid_t"
    cases = {
        "nope": "method.query_bias: unknown query bias 'nope'",
        3: "method.query_bias: 3 is neither a query bias",
        (0.5, 0.5): "method.query_bias: 2 index probabilities for rollout_steps=4",
        (0.5, 0.5, 0.5, 0.5): "method.query_bias: the index probabilities sum to 2, not 1",
        (-0.5, 0.5, 0.5, 0.5): "method.query_bias: index probability -0.5 is not a number in [0, 1]",
        (True, 0.0, 0.0, 0.0): "method.query_bias: index probability True",
    }
    for bias, msg in cases.items():
        with pytest.raises(ConfigError) as e:
            _cfg(toy_raw, tmp_path, query_bias=list(bias) if isinstance(bias, tuple) else bias)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), (bias, str(e.value))
    with pytest.raises(ConfigError) as e:
        _cfg(toy_raw, tmp_path, k=3, query_bias=[0.5, 0.0, 0.5, 0.0])
    assert str(e.value) == ("method.k: 3 query states, but method.query_bias gives a positive probability to only 2 "
                            "of the 4 grid indices")


def test_a_rollout_worker_queries_the_explicit_law(toy_raw, tmp_path):
    """The production path (worker -> Method.queried -> select_queries): every row's state is one
    the law allows, with that state's sigma."""
    from danceopd.dataset import Dataset
    from danceopd.work import WorkItem, WorkOrder
    from rollout_workers.worker import RolloutWorker

    cfg = _cfg(toy_raw, tmp_path, name="danceopd", query_bias=[0.0, 0.7, 0.0, 0.3])
    worker = RolloutWorker(cfg)
    rows = Dataset.load(cfg.resolve(cfg.data.path)).rows[:12]
    order = WorkOrder(ticket=0, items=tuple(WorkItem(route="t2i", row=r, seed=100 + i, sample_index=i, group=i)
                                            for i, r in enumerate(rows)))
    rb = worker.rollout(order).to_pydict()
    assert set(rb["query_index"]) <= {1, 3} and len(rb["query_index"]) == 12
    grid = worker.sigmas.tolist()
    assert [grid[i] for i in rb["query_index"]] == pytest.approx(rb["sigma"])


# ---- ShapesBench -------------------------------------------------------------------------------

def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    return shapesbench


def test_bench_lists_the_paper_matched_query_rows(capsys):
    sb = _bench()
    plan = sb.PRESETS["full"]
    rows = sb.rows_of(plan)
    for bias in ("low_t", "mid_t", "high_t", "uniform"):  # paper_uniform: runnable, not in the full plan (no claim)
        ab = f"paper_{bias}"
        assert (f"danceopd+{ab}" in rows) == (bias != "uniform") and sb.row_label(f"danceopd+{ab}") == f"ablation: query bias {bias}, paper's σ"
        for setting in plan.settings:
            raw = sb.student_cfg(plan, Path("/w"), setting, "danceopd", ab, 0, Path("/w/o"))
            law = raw["method"]["query_bias"]
            assert len(law) == plan.rollout_steps and raw["method"]["shift"] == plan.shift  # the benchmark's own grid
            cfg = config_from_dict(raw)
            here = sigma_grid("sd3", cfg.method.rollout_steps, cfg.method.shift)
            assert sigma_visits(cfg.method.query_bias, here).mean == pytest.approx(sigma_visits(bias, PAPER).mean,
                                                                                    abs=1e-6)
        # the index-rule rows are unchanged: the main row low_t, the ablations by name
        assert sb.student_cfg(plan, Path("/w"), "t2i_edit", "danceopd", None, 0, Path("/w/o"))["method"]["query_bias"] \
            == "low_t"
    assert sb.student_cfg(plan, Path("/w"), "t2i_edit", "danceopd", "mid_t", 0, Path("/w/o"))["method"]["query_bias"] \
        == "mid_t"
    assert sb.PAPER_GRID == ("sd3", 16, 3.0)
    assert sb.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "ablation: query bias low_t, paper's σ" in out
    assert "| `low_t` (index rule) | 0.256 [0.14, 0.29, 0.43] | 0.484 [0.32, 0.52, 0.67] |" in out
    assert "| `paper_low_t` (σ-matched) | 0.484" in out
    text = "\n".join(sb.query_noise_lines(plan))
    assert "configs/paper/sd35_realism_absorption.yaml" in text and "`low_t` 0.26 here vs 0.48 there" in text
