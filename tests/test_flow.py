import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from danceopd.fields import gaussian_velocity
from danceopd.flow import (
    cfg_combine,
    euler_step,
    forward_noise,
    gaussian_log_prob,
    integrate,
    sde_step,
    sde_step_mean_std,
    shift_sigmas,
    sigma_schedule,
    velocity_target,
)


@pytest.mark.parametrize("n", [1, 2, 16, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_schedule_equals_diffusers(n, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(n)
    ours = sigma_schedule(n, shift)
    assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    assert ours[0] == 1 and ours[-1] == 0 and bool((ours[:-1] > ours[1:]).all())


def test_zimage_grid_is_the_reference_trainers():
    """shift(i-th of linspace(1, 0, N+1)) for i < N with shift 3, then 0 — the reference's Z-Image
    grid (N = 16: 1.0, .978, .955, ..., .300, .167, 0), not diffusers' SD3 grid."""
    from danceopd.flow import sigma_grid

    ours = sigma_grid("zimage", 16, 3.0)
    assert ours.shape == (17,) and ours.dtype == torch.float32
    assert [round(float(x), 3) for x in ours[:3]] == [1.0, 0.978, 0.955]
    assert [round(float(x), 3) for x in ours[-3:]] == [0.3, 0.167, 0.0]
    u = torch.arange(16, dtype=torch.float64) / 16
    assert torch.allclose(ours[:16].double(), 3 * (1 - u) / (1 + 2 * (1 - u)), atol=1e-7, rtol=0)
    sd3 = sigma_grid("sd3", 16, 3.0)
    assert float(sd3[15]) == pytest.approx(0.0089, abs=1e-4) and float(ours[15]) > 0.16
    with pytest.raises(ValueError, match="sigma grid 'flux'"):
        sigma_grid("flux", 16, 3.0)


def test_the_worker_rolls_out_on_the_configured_grid(toy_raw, tmp_path):
    from danceopd.flow import sigma_grid
    from rollout_workers.worker import RolloutWorker
    from tests.conftest import cfg_for

    auto = RolloutWorker(cfg_for(toy_raw, tmp_path, "auto"))
    assert torch.equal(auto.sigmas, sigma_grid("sd3", 16, 3.0))  # the toy family's grid
    z = RolloutWorker(cfg_for(toy_raw, tmp_path, "z", method__sigma_grid="zimage"))
    assert torch.equal(z.sigmas, sigma_grid("zimage", 16, 3.0))


def test_shift_and_forward_noise_conventions():
    assert shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    x0, eps = torch.randn(3, 5), torch.randn(3, 5)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    z = forward_noise(x0, eps, sigma)
    assert torch.allclose(z[0], x0[0]) and torch.allclose(z[2], eps[2])
    # One exact Euler step along the straight path from sigma=1 to 0 lands on x0.
    v = velocity_target(x0, eps)
    assert torch.allclose(euler_step(eps, v, 1.0, 0.0), x0, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_gaussian_field_reaches_data_distribution(shift):
    g = torch.Generator().manual_seed(0)
    b, n = 20000, 200
    mu = torch.tensor([1.5, -2.0, 0.5, 0.0])
    std = torch.tensor([0.5, 1.0, 0.2, 2.0])
    z0 = torch.randn(b, 4, generator=g)

    def field(z, sigma, active):
        return gaussian_velocity(z, sigma, mu.expand_as(z), std)

    traj = integrate(field, z0, sigma_schedule(n, shift))
    assert len(traj.states) == n + 1 and traj.nfe == b * n
    x = traj.states[-1]
    # Tolerance = Monte Carlo + Euler bias. Mean: 5 standard errors (std / sqrt(B)) plus 0.01; the
    # field is affine in z, so Euler keeps the mean almost exactly (measured < 1e-6 with whitened
    # noise). Variance: the sample variance has relative sd sqrt(2/B) = 1%, so 5% (5 sd) plus 7%
    # for Euler, whose measured bias at N = 200 is <= 1.5% (shift 1) and <= 6.1% (shift 3, std
    # 0.2: shift 3 leaves a coarse last step from sigma ~0.009 to 0 where a narrow Gaussian is stiff).
    mean_tol = 5 * std / math.sqrt(b) + 0.01
    assert ((x.mean(0) - mu).abs() < mean_tol).all(), (x.mean(0), mu)
    rel_var_err = (x.var(0) / std**2 - 1).abs()
    assert (rel_var_err < 0.12).all(), rel_var_err


def test_sde_log_prob_matches_normal_density():
    g = torch.Generator().manual_seed(1)
    z, v, noise = (torch.randn(4, 3, 2, 2, generator=g) for _ in range(3))
    sigmas = sigma_schedule(8, 3.0)
    for i in (0, 3, 7):  # 0 exercises the sigma = 1 guard, 7 the last step to sigma = 0
        sigma, sigma_next = sigmas[i].expand(4), sigmas[i + 1].expand(4)
        z_next, mean, std = sde_step(z, v, sigma, sigma_next, 0.7, noise)
        assert torch.isfinite(std).all() and (std > 0).all()
        mean2, std2 = sde_step_mean_std(z, v, sigma, sigma_next, 0.7)
        assert torch.equal(mean, mean2) and torch.equal(std, std2)
        assert torch.allclose(z_next, mean + std * noise)
        expected = torch.distributions.Normal(mean.double(), std.double()).log_prob(z_next.double())
        lp = gaussian_log_prob(z_next, mean, std)
        assert lp.shape == (4,) and lp.dtype == torch.float32
        assert torch.allclose(lp.double(), expected.mean(dim=(1, 2, 3)), atol=1e-5)


def test_sde_guard_uses_schedule_max_below_one():
    sigmas = sigma_schedule(8, 3.0)
    z, v = torch.randn(2, 3), torch.randn(2, 3)
    _, std = sde_step_mean_std(z, v, sigmas[0], sigmas[1], 0.7)
    # Flow-GRPO: std_dev_t = eta * sqrt(1 / (1 - sigmas[1])) at sigma = 1.
    expected = 0.7 * math.sqrt(1 / (1 - sigmas[1].item())) * math.sqrt(1 - sigmas[1].item())
    assert std.item() == pytest.approx(expected, rel=1e-6)
    _, std_explicit = sde_step_mean_std(z, v, sigmas[0], sigmas[1], 0.7, sigma_max=sigmas[1])
    assert torch.equal(std, std_explicit)


def test_cfg_combine():
    u, c = torch.randn(5, 3) * 1e6, torch.randn(5, 3)
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    assert torch.allclose(cfg_combine(u, c, 4.0), u + 4.0 * (c - u))


def test_per_sample_stopping_matches_full_integration():
    """Each sample stops at its own `until`: its states up to there are bit-equal to a full
    rollout's, finished samples leave the batch (the field sees only the active ones) and the
    evaluations are sum(until), not B * max(until)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 6, generator=g) / 6
    seen = []

    def field(z, sigma, active):
        seen.append(active.tolist())
        return torch.tanh(z @ w) * (1 + sigma[:, None])

    z0 = torch.randn(8, 6, generator=g)
    sigmas = sigma_schedule(16, 3.0)
    full = integrate(field, z0, sigmas)
    assert len(seen) == 16 and full.nfe == 8 * 16
    until = torch.tensor([0, 5, 15, 16, 3, 3, 9, 1])
    seen.clear()
    part = integrate(field, z0, sigmas, until=until)
    assert part.nfe == int(until.sum()) and sum(len(a) for a in seen) == int(until.sum())
    assert seen[5] == [2, 3, 6]  # step 5 makes state 6: only samples with until > 5 take it
    for b, u in enumerate(until.tolist()):
        for i in range(u + 1):
            assert torch.equal(part.states[i][b], full.states[i][b])
        assert torch.equal(part.states[-1][b], full.states[u][b])  # frozen once it left
    with pytest.raises(ValueError, match="until"):
        integrate(field, z0, sigmas, until=17)


def test_sde_integration_draws_each_samples_noise_only_while_active():
    """The SDE path: z_{i+1} = mean + std * noise; the noise function is asked for the active rows."""
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, generator=g)
    sigmas = sigma_schedule(8, 3.0)
    noise_tab = torch.randn(8, 4, 3, generator=g)

    def field(z, sigma, active):
        return -z

    traj = integrate(field, z0, sigmas, until=torch.tensor([8, 2, 5, 8]), eta=0.7,
                     noise=lambda i, active: noise_tab[i, active])
    z = z0.clone()
    for i in range(8):
        z_next, _, _ = sde_step(z, -z, sigmas[i].expand(4), sigmas[i + 1].expand(4), 0.7, noise_tab[i])
        for b, u in enumerate([8, 2, 5, 8]):
            if i < u:
                assert torch.allclose(traj.states[i + 1][b], z_next[b], atol=1e-6)
                assert torch.allclose(traj.velocities[i][b], -z[b], atol=1e-6)
        z = z_next
    with pytest.raises(ValueError, match="noise"):
        integrate(field, z0, sigmas, eta=0.7)


def test_sde_with_the_exact_field_keeps_the_data_marginal():
    """The Flow-GRPO SDE shares the ODE's marginals: driven by the exact field of N(mu, std^2) it
    ends at that distribution. Fails if the drift's sign or the sqrt(dt) in its std is wrong."""
    g = torch.Generator().manual_seed(4)
    b, n = 20000, 100
    mu, std = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.3])
    z0 = torch.randn(b, 2, generator=g)
    noise = torch.randn(n, b, 2, generator=g)
    traj = integrate(lambda z, s, active: gaussian_velocity(z, s, mu.expand_as(z), std), z0,
                     sigma_schedule(n, 1.0), eta=0.7, noise=lambda i, active: noise[i, active])
    x = traj.states[-1]
    assert ((x.mean(0) - mu).abs() < 0.05).all(), x.mean(0)
    assert ((x.std(0) / std - 1).abs() < 0.15).all(), x.std(0)
