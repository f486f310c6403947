"""Method objects: FlowOPD's estimator against a closed-form gradient, method dispatch."""

import numpy as np
import pytest
import torch

from danceopd.config import MethodConfig
from danceopd.flow import integrate, sde_step_mean_std, sigma_schedule
from danceopd.methods import METHODS, make_method

N, ETA, THETA_T = 8, 0.7, -1.0


def closed_form_grad(theta: float, method) -> float:
    """d/dtheta of E[sum_t KL_t] for the 1-D linear chain v_theta(z) = theta z, teacher
    v_T(z) = THETA_T z, z_0 ~ N(0, 1): the SDE mean is a z + c v, so E[z_t^2] follows exactly."""
    th = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    sig = sigma_schedule(N, 3.0)
    m, total = torch.tensor(1.0, dtype=torch.float64), 0.0
    for i in range(N):
        s, sn = sig[i:i + 1], sig[i + 1:i + 2]
        one, zero = torch.ones(1, 1), torch.zeros(1, 1)
        a = sde_step_mean_std(one, zero, s, sn, ETA)[0].double().squeeze()
        mean_c, std = sde_step_mean_std(zero, one, s, sn, ETA)
        c, std = mean_c.double().squeeze(), std.double().squeeze()
        t = {"sigma": s.double(), "sigma_next": sn.double()}
        k = method.kl_scale(std.reshape(1, 1), t).squeeze()
        total = total + k * (c * (th - THETA_T)) ** 2 * m
        m = (a + c * th) ** 2 * m + std**2
    total.backward()
    return float(th.grad)


def mc_grad(theta: float, cfg: MethodConfig, b: int, seed: int, drop_score: bool = False) -> float:
    """The production path: SDE rollout with the one integrator, the router-side annotation, the
    learner-side loss; returns N * d loss / d theta (the loss averages the N rows of a sample)."""
    method = make_method(cfg)
    g = torch.Generator().manual_seed(seed)
    sig = sigma_schedule(N, 3.0)
    z0 = torch.randn(b, 1, generator=g)
    noise = torch.randn(N, b, 1, generator=g)
    traj = integrate(lambda z, s, active: theta * z, z0, sig, eta=ETA, noise=lambda i, active: noise[i, active])
    rows = {
        "state": torch.cat(traj.states[:-1]), "next_state": torch.cat(traj.states[1:]),
        "rollout_velocity": torch.cat(traj.velocities),
        "sigma": sig[:-1].repeat_interleave(b), "sigma_next": sig[1:].repeat_interleave(b),
        "sample_index": torch.arange(b).repeat(N), "query_index": torch.arange(N).repeat_interleave(b),
        "group": torch.arange(b).repeat(N),
    }
    rows["target"] = THETA_T * rows["state"]
    rows["advantage"] = torch.from_numpy(method.annotate(rows)["advantage"])
    if drop_score:
        rows["advantage"] = torch.zeros_like(rows["advantage"])
    th = torch.tensor(theta, requires_grad=True)
    loss, _ = method.loss(th * rows["state"], rows)
    loss.backward()
    return N * float(th.grad)


@pytest.mark.parametrize("scale", ["variance", "step_variance"])
def test_flowopd_expected_update_descends_the_kl(scale):
    """Sign and magnitude of the Monte-Carlo update match the closed-form gradient of E[sum KL];
    the reference's detached per-step form (zero on-policy) and the reward-to-go surrogate alone
    (no pathwise term) both miss it."""
    theta = -0.3
    cfg = MethodConfig(name="flowopd", flowopd_reward_scale=scale, flowopd_adv_clamp=1e9, flowopd_eta=ETA)
    truth = closed_form_grad(theta, make_method(cfg))
    runs = [mc_grad(theta, cfg, 20000, seed) for seed in range(5)]
    est, se = float(np.mean(runs)), float(np.std(runs) / np.sqrt(len(runs)))
    assert abs(est - truth) < max(4 * se, 0.05 * abs(truth)), (est, truth, se)
    assert np.sign(est) == np.sign(truth) and abs(truth) > 0.1
    pathwise = float(np.mean([mc_grad(theta, cfg, 20000, seed, drop_score=True) for seed in range(5)]))
    score_only = est - pathwise  # what reward-to-go alone gives
    assert abs(score_only - truth) > 0.3 * abs(truth)
    detached = MethodConfig(name="flowopd", flowopd_reward_scale=scale, flowopd_adv_clamp=1e9,
                            flowopd_estimator="per_step_detached", flowopd_eta=ETA)
    per_step = float(np.mean([mc_grad(theta, detached, 20000, seed) for seed in range(5)]))
    assert abs(per_step - truth) > 0.5 * abs(truth), (per_step, truth)


def test_every_method_has_an_object_and_unknown_names_fail():
    assert set(METHODS) == {"danceopd", "diffusionopd", "flowopd", "offpolicy", "sft", "softmix"}
    for name in METHODS:
        assert make_method(MethodConfig(name=name)).name == name
    with pytest.raises(ValueError, match="unknown method"):
        make_method(MethodConfig.model_construct(name="nope"))


def test_diffusionopd_defaults_to_the_reference_constant_weight():
    m = make_method(MethodConfig(name="diffusionopd", rollout_steps=16))
    sig = sigma_schedule(16, 3.0)
    idx = m.queried(16, seed=0)
    assert idx.tolist() == list(range(16))
    assert m.row_weights(idx, sig) == [pytest.approx(0.5 / 256)] * 16
    dt = make_method(MethodConfig(name="diffusionopd", rollout_steps=16, uniform_dt=False)).row_weights(idx, sig)
    assert dt[14] == pytest.approx(float((sig[14] - sig[15]) ** 2 / 2))


class _LinearBackend:
    """predict(model, z, sigma, cond) = model * z + cond: enough to see which branches are used."""

    def predict(self, model, z, sigma, cond):
        return model * z + cond

    def null_cond(self, cond):
        return torch.zeros_like(cond)


def test_learner_prediction_applies_the_rollout_guidance():
    """With rollout_cfg_scale != 1 the learner regresses the guided field (reference); with
    learner_guidance false the unguided one; data methods never guide."""
    t = {"state": torch.ones(2, 3), "sigma": torch.ones(2), "cond": torch.full((2, 3), 2.0)}
    be, model = _LinearBackend(), torch.tensor(1.0)
    guided = make_method(MethodConfig(rollout_cfg_scale=3.0)).predict(be, model, t)
    assert torch.allclose(guided, torch.full((2, 3), 1.0 + 3.0 * 2.0))  # u + 3 (c - u)
    plain = make_method(MethodConfig(rollout_cfg_scale=3.0, learner_guidance=False)).predict(be, model, t)
    assert torch.allclose(plain, torch.full((2, 3), 3.0))
    sft = make_method(MethodConfig(name="sft", rollout_cfg_scale=3.0)).predict(be, model, t)
    assert torch.allclose(sft, torch.full((2, 3), 3.0))


def test_teacher_cfg_target_is_uncond_plus_scale_times_difference(toy_raw, tmp_path):
    """target = v(z, null) + a (v(z, c) - v(z, null)), with the edit's task/source part kept in
    the unconditional branch (only the text is dropped)."""
    from router.teacher import Teacher
    from tests.conftest import cfg_for

    cfg = cfg_for(toy_raw, tmp_path, "cfg")
    teacher = Teacher(cfg, cfg.routing.routes[1].teacher)
    g = torch.Generator().manual_seed(0)
    rows = 6
    cond = torch.zeros(rows, teacher.backend.cond_dim)
    cond[:, 1] = 1.0  # local_edit task part
    cond[torch.arange(rows), len(teacher.backend.tasks) + torch.arange(rows) % 4] = 1.0  # class text
    z, sigma = torch.randn(rows, teacher.backend.dim, generator=g), torch.full((rows,), 0.5)
    null = teacher.backend.null_cond(cond)
    assert torch.equal(null[:, : len(teacher.backend.tasks)], cond[:, : len(teacher.backend.tasks)])
    assert null[:, len(teacher.backend.tasks):].abs().sum() == 0
    v_c, v_u = teacher.field.velocity(z, sigma, cond), teacher.field.velocity(z, sigma, null)
    assert (v_c - v_u).abs().max() > 0.1
    got = torch.from_numpy(teacher.query(z.numpy(), sigma.numpy(), cond.numpy(), 3.0))
    torch.testing.assert_close(got, v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
