"""The benchmark's verdict rule (bench/verdicts.py): Student-t quantiles and p-values against closed
forms, published tables and the density integrated numerically; the sample std, the interval and Holm's correction by hand;
the three outcomes on constructed differences."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import verdicts as v  # noqa: E402

# two-sided 95 % and 99 % quantiles (t_{0.975}, t_{0.995}) from the standard printed tables
TABLE = {3: (3.182446, 5.840909), 4: (2.776445, 4.604095), 5: (2.570582, 4.032143), 10: (2.228139, 3.169273),
         30: (2.042272, 2.749996)}


def _cdf_by_integration(t: float, df: int, steps: int = 20000) -> float:
    """0.5 + the integral of Student's density from 0 to t (Simpson's rule)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    f = [c * (1 + (t * i / steps) ** 2 / df) ** (-(df + 1) / 2) for i in range(steps + 1)]
    return 0.5 + t / steps / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))


def test_t_quantiles_match_closed_forms_tables_and_the_density():
    for p in (0.6, 0.9, 0.975, 0.99, 0.995, 0.999, 1 - 0.05 / 16):
        assert v.t_ppf(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert v.t_ppf(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert v.t_ppf(1 - p, 7) == pytest.approx(-v.t_ppf(p, 7), rel=1e-12)
    for df, (q95, q99) in TABLE.items():
        assert v.t_ppf(0.975, df) == pytest.approx(q95, abs=1e-6)
        assert v.t_ppf(0.995, df) == pytest.approx(q99, abs=1e-6)
    for df in (1, 2, 3, 4, 7, 12, 31):  # the odd and the even series against the density itself
        for t in (-4.0, -0.7, 0.0, 0.3, 1.7, 5.0, 12.0):
            assert v.t_cdf(t, df) == pytest.approx(_cdf_by_integration(t, df), abs=1e-9), (df, t)
    with pytest.raises(ValueError, match="degrees of freedom"):
        v.t_cdf(1.0, 2.5)


def test_sample_std_interval_and_p_value_by_hand():
    x = [1.0, 2.0, 3.0]
    assert v.sample_std(x) == pytest.approx(1.0)  # sum of squares 2 over n - 1 = 2 (the population std: 0.816)
    assert v.sample_std([4.0]) == 0.0
    lo, hi = v.t_interval(x, 0.95)
    half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} sd / sqrt(n)
    assert lo == pytest.approx(2 - half, abs=1e-6) and hi == pytest.approx(2 + half, abs=1e-6)
    t = 2 / (1 / math.sqrt(3))  # df 2: two-sided p = 1 - |t| / sqrt(2 + t^2)
    assert v.t_pvalue(x) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9)
    assert v.t_pvalue(x, 2.0) == pytest.approx(1.0)
    assert v.t_pvalue([0.1, 0.1, 0.1]) == 0.0 and v.t_pvalue([0.0, 0.0]) == 1.0
    assert math.isnan(v.t_pvalue([0.3]))


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04: 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
    assert v.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert v.holm([0.2, 0.001, 0.04, 0.03]) == pytest.approx([0.2, 0.004, 0.09, 0.09])
    assert v.holm([0.6, float("nan")]) == pytest.approx([1.0, 1.0])
    # levels: 0.001 <= 0.05/4 rejected, 0.03 > 0.05/3 stops the step-down: the rest get 0.05/4
    assert v.holm_alphas([0.2, 0.001, 0.04, 0.03]) == pytest.approx([0.0125, 0.0125, 0.0125, 0.05 / 3])
    assert v.holm_alphas([0.001, 0.002, 0.004]) == pytest.approx([0.05 / 3, 0.05 / 2, 0.05])


def _one(diffs, margin=0.0, band=None):
    return v.judge([v.Claim("c", diffs, list(range(len(diffs))), margin, band)])[0]


def test_three_outcomes_on_constructed_differences():
    held = _one([0.10, 0.12, 0.11, 0.09, 0.13])
    assert held["outcome"] == "held" and held["ci"][0] > 0 and held["level"] == 0.95
    assert _one([0.10, 0.12, 0.11, 0.09, 0.13], margin=0.2)["outcome"] == "inconclusive"  # above 0, not the margin
    assert _one([-0.10, -0.12, -0.11, -0.09])["outcome"] == "refuted"
    equal = _one([0.001, -0.002, 0.0015, 0.0, -0.001, 0.0005], band=0.02)
    assert equal["outcome"] == "refuted" and "equivalence" in equal["why"]
    assert _one([0.001, -0.002, 0.0015, 0.0, -0.001, 0.0005])["outcome"] == "inconclusive"  # no band stated
    assert _one([0.10, -0.05, 0.08], band=0.02)["outcome"] == "inconclusive"
    one = _one([0.5])
    assert one["outcome"] == "inconclusive" and one["ci"] is None
    # a non-inferiority claim: held above the margin, refuted only below it
    assert _one([-0.01, 0.0, -0.02, -0.01], margin=-0.05)["outcome"] == "held"
    assert _one([-0.10, -0.11, -0.09, -0.10], margin=-0.05)["outcome"] == "refuted"
    assert _one([-0.04, -0.07, -0.05], margin=-0.05)["outcome"] == "inconclusive"


def test_holm_turns_a_lone_verdict_inconclusive_in_its_family():
    """ShapesBench's first full table, setting (b) at equal updates (per-seed edit success, seeds
    0, 1, 2): DanceOPD minus off-policy is positive on every seed, p 0.022 alone; with the
    claims beside it (naive p 0.11, best OPD p 0.64) Holm's first level is 0.05 / 3."""
    off = [0.078125, 0.046875, 0.05859375]
    naive = [0.02734375, 0.12109375, 0.07421875]
    best = [-0.04296875, -0.01171875, 0.0234375]
    alone = _one(off, band=0.02)
    assert alone["outcome"] == "held" and alone["p"] == pytest.approx(0.0215, abs=5e-4)
    fam = v.judge([v.Claim(n, d, [0, 1, 2], 0.0, 0.02) for n, d in (("naive", naive), ("off", off), ("best", best))])
    assert [c["outcome"] for c in fam] == ["inconclusive"] * 3
    assert fam[0]["p"] == pytest.approx(0.111, abs=1e-3)
    assert fam[1]["p_holm"] == pytest.approx(3 * alone["p"], rel=1e-3) and fam[1]["level"] == pytest.approx(1 - 0.05 / 3, abs=1e-5)
    assert fam[1]["ci"][0] < 0 < alone["ci"][0]
