"""Verdicts on a benchmark's claims from per-seed paired differences.

A claim compares two rows trained with the same seeds and scored on the same prompts from the
same noise; its data are the per-seed differences d_s = ours_s - theirs_s. Over the n seeds:
mean, sample std (ddof = 1), a two-sided Student-t interval with n - 1 degrees of freedom, and
the paired t-test of "no difference" (d = min(margin, 0)). The claims of one family (for
ShapesBench: one setting, both budgets) are corrected with Holm's step-down: ordered by that p-value, the i-th smallest
(from 0) gets alpha / (m - i) while every smaller one was rejected at its own level, alpha / m
after the first that was not. Its interval is the 1 - alpha_i interval, and:

- held:         the interval's lower bound is above the claim's margin;
- refuted:      the upper bound is below min(margin, 0), or the whole interval lies inside the
                equivalence band (-band, band) stated in advance (a difference too small to matter);
- inconclusive: anything else (and any claim with fewer than two seeds: no interval).

Everything here is exact and dependency-free: the t distribution's CDF for integer degrees of
freedom is the finite series of Abramowitz & Stegun 26.7.3-4, its quantile found by bisection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.05


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with integer df >= 1."""
    if df != int(df) or df < 1:
        raise ValueError(f"t distribution: degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... ))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... )
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return 0.5 + math.copysign(a / 2, t)


def t_ppf(p: float, df: int) -> float:
    """The t quantile: t with P(T <= t) = p."""
    if not 0 < p < 1:
        raise ValueError(f"t quantile: probability must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_ppf(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2


def sample_std(x: list[float]) -> float:
    """Standard deviation with n - 1 in the denominator (0 for fewer than two values)."""
    n = len(x)
    if n < 2:
        return 0.0
    m = sum(x) / n
    return math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1))


def t_interval(x: list[float], level: float) -> tuple[float, float]:
    """Two-sided Student-t interval for the mean of x at `level` (x: at least two values)."""
    n = len(x)
    if n < 2:
        raise ValueError("t interval: needs at least two values")
    m = sum(x) / n
    half = t_ppf(1 - (1 - level) / 2, n - 1) * sample_std(x) / math.sqrt(n)
    return m - half, m + half


def t_pvalue(x: list[float], null: float = 0.0) -> float:
    """Two-sided one-sample t-test of mean(x) = null (nan for fewer than two values)."""
    n = len(x)
    if n < 2:
        return float("nan")
    m, se = sum(x) / n, sample_std(x) / math.sqrt(n)
    if se == 0:
        return 1.0 if m == null else 0.0
    return 2 * (1 - t_cdf(abs(m - null) / se, n - 1))


def holm(p: list[float]) -> list[float]:
    """Holm-adjusted p-values (nan counts as 1), in the input order."""
    q = [1.0 if math.isnan(v) else v for v in p]
    m, out, running = len(q), [0.0] * len(q), 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: q[j])):
        running = max(running, min(1.0, (m - rank) * q[i]))
        out[i] = running
    return out


def holm_alphas(p: list[float], alpha: float = ALPHA) -> list[float]:
    """Each claim's significance level under Holm's step-down, in the input order."""
    q = [1.0 if math.isnan(v) else v for v in p]
    m, out, open_ = len(q), [alpha / max(len(q), 1)] * len(q), True
    for rank, i in enumerate(sorted(range(m), key=lambda j: q[j])):
        out[i] = alpha / (m - rank) if open_ else alpha / m
        open_ = open_ and q[i] <= out[i]
    return out


@dataclass
class Claim:
    text: str
    diffs: list[float]  # per seed: ours - theirs, same seed and prompts on both sides
    seeds: list
    margin: float = 0.0  # held when the interval's lower bound is above it
    band: float | None = None  # refuted when the interval lies inside (-band, band)


def judge(claims: list[Claim], alpha: float = ALPHA) -> list[dict]:
    """The verdict of every claim of one family (Holm across them)."""
    p = [t_pvalue(c.diffs, min(c.margin, 0.0)) for c in claims]
    p_holm, alphas = holm(p), holm_alphas(p, alpha)
    out = []
    for c, p_i, ph, a in zip(claims, p, p_holm, alphas):
        n = len(c.diffs)
        rec = {"claim": c.text, "seeds": list(c.seeds), "diffs": [round(d, 6) for d in c.diffs], "n": n,
               "mean": round(sum(c.diffs) / n, 6) if n else None, "sd": round(sample_std(c.diffs), 6),
               "margin": c.margin, "band": c.band, "p": None if math.isnan(p_i) else round(p_i, 5),
               "p_holm": round(ph, 5), "level": round(1 - a, 5)}
        if n < 2:
            rec.update(ci=None, outcome="inconclusive", why="fewer than two seeds: no interval")
            out.append(rec)
            continue
        lo, hi = t_interval(c.diffs, 1 - a)
        rec["ci"] = [round(lo, 6), round(hi, 6)]
        if lo > c.margin:
            rec.update(outcome="held", why=f"lower bound {lo:+.3f} > margin {c.margin:g}")
        elif hi < min(c.margin, 0.0):
            rec.update(outcome="refuted", why=f"upper bound {hi:+.3f} < {min(c.margin, 0.0):g}")
        elif c.band is not None and -c.band < lo and hi < c.band:
            rec.update(outcome="refuted", why=f"interval inside the equivalence band ±{c.band:g}")
        else:
            rec.update(outcome="inconclusive", why=f"the interval is neither above {c.margin:g} nor below "
                       f"{min(c.margin, 0.0):g}" + (f" nor inside ±{c.band:g}" if c.band is not None else ""))
        out.append(rec)
    return out
