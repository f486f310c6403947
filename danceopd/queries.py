"""Which trajectory states a rollout queries the teacher at.

Reference rule (DESIGN §1): index i = min(int(u N), N - 1) with u ~ Beta(5, 2) (``low_t``),
Beta(5, 5) (``mid_t``), Beta(2, 5) (``high_t``) or U(0, 1) (``uniform``). Index 0 is pure noise
and index N - 1 the least noisy state queried, so ``low_t`` (u near 1) favours low-noise states.
``stratified`` splits [0, 1) into K strata and draws u uniformly in each. A bias may also be an
explicit law: N probabilities, one per grid index (``sigma_matched_law`` builds one that visits the
noise levels a named rule visits on another grid).

All randomness comes from the caller's ``np.random.Generator`` so routes, queries and resumes are
reproducible and never disturb (or depend on) global RNG state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np
import torch

BETA_PARAMS: dict[str, tuple[int, int]] = {"low_t": (5, 2), "mid_t": (5, 5), "high_t": (2, 5), "uniform": (1, 1)}
BIASES = (*BETA_PARAMS, "stratified")
Bias = str | Sequence[float]  # a named rule, or P(index = i) for i = 0..N-1

# Rounds of rejection sampling before the fill; enough that the fill only triggers when K is close
# to N and some indices are nearly impossible (e.g. index 0 under low_t has probability ~6e-6).
_MAX_ROUNDS = 64


def beta_cdf(x: np.ndarray | float, a: int, b: int) -> np.ndarray:
    """Regularised incomplete beta I_x(a, b) for integer a, b >= 1:
    P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a)."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0)
    m = a + b - 1
    return sum(comb(m, j) * x**j * (1 - x) ** (m - j) for j in range(a, m + 1))


def _explicit_law(bias: Sequence[float], n: int) -> np.ndarray:
    p = np.asarray(bias, dtype=np.float64)
    if p.shape != (n,) or not np.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"query law: need {n} finite probabilities >= 0 with a positive sum, got {list(bias)!r}")
    return p / p.sum()


def index_probabilities(bias: Bias, n: int) -> np.ndarray:
    """Exact P(index = i), i = 0..n-1, of one draw (K = 1).

    ``stratified`` with K = 1 is one uniform draw; for any K, a uniformly chosen one of its K draws
    is U(0, 1) too, so its marginal per draw is ``uniform``'s. An explicit law is its own answer
    (normalised).
    """
    if not isinstance(bias, str):
        return _explicit_law(bias, n)
    if bias not in BIASES:
        raise ValueError(f"unknown query bias {bias!r} (known: {', '.join(BIASES)})")
    a, b = BETA_PARAMS.get(bias, (1, 1))
    # int(u n) = i  <=>  u in [i/n, (i+1)/n); the last bin also takes u in [(n-1)/n, 1].
    edges = beta_cdf(np.arange(n + 1) / n, a, b)
    edges[-1] = 1.0
    return np.diff(edges)


@dataclass(frozen=True)
class SigmaVisits:
    """The noise levels one query draw (K = 1) visits on a grid: mean sigma and the quartiles
    (the smallest grid sigma at which the probability of sigma <= it reaches 1/4, 1/2, 3/4)."""

    mean: float
    q25: float
    median: float
    q75: float


def sigma_visits(bias: Bias, sigmas) -> SigmaVisits:
    """Exact, not sampled: ``index_probabilities`` over the N states of a grid of N + 1 sigmas
    (the state at index i has sigma_i; the terminal sigma_N is never queried)."""
    sig = np.asarray(sigmas, dtype=np.float64)[:-1]
    p = index_probabilities(bias, len(sig))
    order = np.argsort(sig, kind="stable")
    cdf = np.cumsum(p[order])
    q = [float(sig[order][min(np.searchsorted(cdf, level - 1e-12), len(sig) - 1)]) for level in (0.25, 0.5, 0.75)]
    return SigmaVisits(float(p @ sig), *q)


def sigma_matched_law(bias: Bias, sigmas, ref_sigmas) -> np.ndarray:
    """A law over the N states of the grid ``sigmas`` (N + 1 sigmas) that visits the noise levels
    ``bias`` visits on the reference grid ``ref_sigmas``: each reference state's probability is
    shared between the two states of this grid whose sigmas bracket its sigma, in proportion to
    closeness (linear interpolation), so the mean sigma is the reference's exactly; a reference
    sigma outside this grid's range goes to the nearer end state. On the reference grid itself it
    is ``index_probabilities``."""
    sig = np.asarray(sigmas, dtype=np.float64)[:-1]
    ref = np.asarray(ref_sigmas, dtype=np.float64)[:-1]
    if (np.diff(sig) >= 0).any():
        raise ValueError("sigma_matched_law: the grid's sigmas must decrease")
    q = index_probabilities(bias, len(ref))
    law = np.zeros(len(sig))
    if len(sig) == 1:
        law[0] = 1.0
        return law
    asc = sig[::-1]  # np.interp needs increasing abscissae
    pos = np.interp(np.clip(ref, asc[0], asc[-1]), asc, np.arange(len(sig)))  # fractional ascending position
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, len(sig) - 1)
    frac = pos - lo
    np.add.at(law, len(sig) - 1 - lo, q * (1 - frac))
    np.add.at(law, len(sig) - 1 - hi, q * frac)
    return law


def _draw(bias: Bias, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    if not isinstance(bias, str):
        return rng.choice(n, size=k, p=bias).astype(np.int64)
    if bias == "stratified":
        u = (np.arange(k) + rng.random(k)) / k
    elif bias == "uniform":
        u = rng.random(k)
    else:
        u = rng.beta(*BETA_PARAMS[bias], size=k)
    return np.minimum((u * n).astype(np.int64), n - 1)


def select_queries(bias: Bias, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """K unique sorted indices in [0, n - 1].

    Duplicates are rejected and redrawn (i.e. sampling without replacement from the rule), for at
    most ``_MAX_ROUNDS`` rounds; any still missing are then filled from the unused indices with
    probabilities proportional to ``index_probabilities`` — the same law, drawn from the same
    generator, so the result stays deterministic per seed and the loop is bounded.
    """
    if not isinstance(bias, str):
        bias = _explicit_law(bias, n)  # checked once, normalised
    elif bias not in BIASES:
        raise ValueError(f"unknown query bias {bias!r} (known: {', '.join(BIASES)})")
    if not 1 <= k <= n:
        raise ValueError(f"select_queries: need 1 <= k <= n, got k={k}, n={n}")
    if k == n:
        return np.arange(n, dtype=np.int64)
    chosen: list[int] = []
    for _ in range(_MAX_ROUNDS):
        for i in _draw(bias, n, k, rng).tolist():  # draw order, so first-come keeps the rule's law
            if i not in chosen:
                chosen.append(i)
                if len(chosen) == k:
                    return np.sort(np.asarray(chosen, dtype=np.int64))
    rest = np.setdiff1d(np.arange(n), chosen)
    p = index_probabilities(bias, n)[rest]
    p = p / p.sum() if p.sum() > 0 else None
    fill = rng.choice(rest, size=k - len(chosen), replace=False, p=p)
    return np.sort(np.concatenate([np.asarray(chosen, dtype=np.int64), fill.astype(np.int64)]))


def diffusionopd_weights(sigmas: torch.Tensor, uniform_dt: bool) -> torch.Tensor:
    """Per-state weights w_i of DiffusionOPD over the N states of a schedule of N + 1 sigmas:
    dt_i^2 / 2 with dt_i = sigma_i - sigma_{i+1}, or the reference's constant 0.5 / N^2."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    n = sigmas.numel() - 1
    if uniform_dt:
        return torch.full((n,), 0.5 / n**2, dtype=torch.float32)
    dt = sigmas[:-1] - sigmas[1:]
    return dt**2 / 2
