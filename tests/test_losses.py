import pytest
import torch

from danceopd.config import MethodConfig
from danceopd.flow import sde_step, sigma_schedule
from danceopd.losses import group_normalise, per_route_mean
from danceopd.methods import make_method


def compute_loss(cfg, pred, batch):
    """The learner's path: the method's annotation (upstream, from the rollout and the teacher)
    then its loss."""
    method = make_method(cfg)
    if "query_index" in batch:
        batch = {**batch, **{k: torch.from_numpy(v) for k, v in method.annotate(batch).items()}}
    return method.loss(pred, batch)


def flowopd_terms(cfg, pred, batch):
    method = make_method(cfg)
    adv = torch.from_numpy(method.annotate(batch)["advantage"])
    return {**method.terms(pred, {**batch, "advantage": adv}), "advantage": adv}

METHODS = ["danceopd", "diffusionopd", "offpolicy", "sft", "softmix", "flowopd"]


def make_batch(rows=6, shape=(3, 2, 2), seed=0, groups=2):
    """Rows as a rollout would produce them: state at sigma_i, next_state from the SDE step."""
    g = torch.Generator().manual_seed(seed)
    sigmas = sigma_schedule(8, 3.0)
    idx = torch.arange(rows) % 8
    sigma, sigma_next = sigmas[idx], sigmas[idx + 1]
    state = torch.randn(rows, *shape, generator=g)
    rollout_velocity = torch.randn(rows, *shape, generator=g)
    target = torch.randn(rows, *shape, generator=g)
    noise = torch.randn(rows, *shape, generator=g)
    next_state, _, _ = sde_step(state, rollout_velocity, sigma, sigma_next, 0.7, noise)
    return {
        "state": state, "sigma": sigma, "sigma_next": sigma_next, "cond": torch.randn(rows, 4, generator=g),
        "target": target, "weight": torch.full((rows,), 0.5), "sample_index": torch.arange(rows) // 2,
        "next_state": next_state, "rollout_velocity": rollout_velocity,
        "group": torch.arange(rows) % groups, "query_index": idx.clone(),
    }


@pytest.mark.parametrize("method", METHODS)
def test_zero_iff_pred_equals_target(method):
    cfg = MethodConfig(name=method)
    batch = make_batch()
    if method == "flowopd":
        # Zero KL reward <=> old student's transition mean equals the teacher's.
        batch["rollout_velocity"] = batch["target"].clone()
    loss, per_row = compute_loss(cfg, batch["target"].clone().requires_grad_(), batch)
    assert loss.item() == 0 and (per_row == 0).all()
    pred = (batch["target"] + 0.1).requires_grad_()
    if method == "flowopd":
        batch["rollout_velocity"] = pred.detach().clone()
    loss, per_row = compute_loss(cfg, pred, batch)
    assert loss.item() > 0 and per_row.shape == (6,) and not per_row.requires_grad


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_pred_not_target_side(method):
    cfg = MethodConfig(name=method)
    batch = make_batch()
    # Teacher / rollout tensors arrive with requires_grad set; compute_loss must detach them.
    for key in ("target", "rollout_velocity", "next_state", "state"):
        batch[key] = batch[key].clone().requires_grad_()
    pred = (batch["rollout_velocity"].detach() + 0.05 * torch.randn(6, 3, 2, 2)).requires_grad_()
    loss, _ = compute_loss(cfg, pred, batch)
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    for key in ("target", "rollout_velocity", "next_state", "state"):
        assert batch[key].grad is None, key


def test_flowopd_on_policy_ratio_is_one_and_still_has_gradient():
    cfg = MethodConfig(name="flowopd", flowopd_groups=1, flowopd_estimator="per_step_detached")
    batch = make_batch()
    pred = batch["rollout_velocity"].clone().requires_grad_()
    t = flowopd_terms(cfg, pred, batch)
    assert torch.equal(t["ratio"], torch.ones(6))
    loss, per_row = compute_loss(cfg, pred, batch)
    assert torch.allclose(loss, -t["advantage"].mean()) and torch.allclose(per_row, -t["advantage"])
    loss.backward()
    # Known reference behaviour 1: ratio == 1 but the gradient flows through logp_new.
    assert pred.grad.abs().sum() > 0


def test_flowopd_advantages_without_baseline_are_nonpositive_and_groups_compare_one_timestep():
    cfg = MethodConfig(name="flowopd", flowopd_groups=1, flowopd_adv_clamp=1e9)
    for seed in range(5):
        batch = make_batch(seed=seed)
        t = flowopd_terms(cfg, batch["rollout_velocity"].clone(), batch)
        assert (t["advantage"] <= 0).all()
    batch = make_batch(rows=12, groups=2)
    batch["query_index"] = torch.arange(12) % 3  # 2 groups x 2 samples x 3 timesteps
    batch["sample_index"] = torch.arange(12) // 3
    batch["group"] = torch.arange(12) // 6
    grouped = flowopd_terms(MethodConfig(name="flowopd", flowopd_groups=2), batch["rollout_velocity"], batch)
    adv = grouped["advantage"]
    assert (adv > 0).any() and (adv < 0).any()  # the group baseline centres them
    for gid in (0, 1):
        for q in (0, 1):  # normalised per (group, timestep): mean 0 at each timestep of a group
            sel = (batch["group"] == gid) & (batch["query_index"] == q)
            assert abs(adv[sel].mean().item()) < 1e-5 and adv[sel].abs().max() > 0.5


def _reference_reward(batch, eta: float, per_dt: bool) -> torch.Tensor:
    """The reference trainer's FlowOPD reward, row by row in float64 from its formulas
    (worldbench/DanceOPD danceopd/core/flowopd.py: `sde_step` gives the transition mean and
    diffusion_std = eta sqrt(sigma / (1 - sigma)), sigma in the denominator replaced by sigma_next
    at sigma = 1; `clipped_policy_loss` gives -mean((mu_s - mu_T)^2) / (2 diffusion_std^2)).
    per_dt: also divide by the step's dt (our `step_variance`: the exact Gaussian KL of the step)."""
    out = []
    for i in range(len(batch["sigma"])):
        s, sn = float(batch["sigma"][i]), float(batch["sigma_next"][i])
        d2 = eta**2 * s / (1 - (sn if s >= 1 else s))  # diffusion_std^2
        dt = sn - s  # negative
        # mu = z (1 + d2 / (2s) dt) + v (1 + d2 (1 - s) / (2s)) dt: the state term cancels
        dmu = (batch["rollout_velocity"][i].double() - batch["target"][i].double()) * (1 + d2 * (1 - s) / (2 * s)) * dt
        out.append(-(dmu**2).mean() / (2 * d2 * (-dt if per_dt else 1.0)))
    return torch.stack(out)


def test_flowopd_reward_scale_and_clamp():
    """`variance` is the reference's reward: the squared mean difference over 2 sigma_t^2
    (sigma_t the SDE's diffusion coefficient); `step_variance` over 2 sigma_t^2 dt. Both against
    the formula written out above, not against each other; the advantage is clamped to
    +-flowopd_adv_clamp."""
    batch = make_batch()
    assert float(batch["sigma"][0]) == 1.0  # the sigma = 1 guard is exercised too
    per_step = dict(name="flowopd", flowopd_estimator="per_step_detached", flowopd_adv_clamp=1e9)
    r_var = flowopd_terms(MethodConfig(**per_step), batch["rollout_velocity"], batch)["advantage"]
    r_step = flowopd_terms(MethodConfig(**per_step, flowopd_reward_scale="step_variance"), batch["rollout_velocity"], batch)["advantage"]
    eta = MethodConfig().flowopd_eta
    torch.testing.assert_close(r_var.double(), _reference_reward(batch, eta, per_dt=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(r_step.double(), _reference_reward(batch, eta, per_dt=True), rtol=1e-4, atol=0)
    clamped = flowopd_terms(MethodConfig(name="flowopd", flowopd_estimator="per_step_detached", flowopd_adv_clamp=0.01),
                            batch["rollout_velocity"], batch)["advantage"]
    assert torch.allclose(clamped, r_var.clamp(-0.01, 0.01)) and (r_var < -0.01).any()


def test_flowopd_clip_bounds_the_off_policy_ratio():
    cfg = MethodConfig(name="flowopd", flowopd_clip=1e-4)
    batch = make_batch()
    pred = (batch["rollout_velocity"] + 0.5).requires_grad_()
    t = flowopd_terms(cfg, pred, batch)
    a, r = t["advantage"], t["ratio"].detach()
    expected = torch.maximum(-a * r, -a * r.clamp(1 - 1e-4, 1 + 1e-4))
    assert torch.allclose(t["surrogate"].detach(), expected)


def test_group_normalise():
    r = torch.tensor([1.0, 3.0, -2.0, -2.0, 5.0])
    g = torch.tensor([0, 0, 1, 1, 2])
    a = group_normalise(r, g)
    assert torch.allclose(a[:2], torch.tensor([-1.0, 1.0]), atol=1e-5)
    assert torch.equal(a[2:], torch.zeros(3))  # constant groups and singletons carry no signal


@pytest.mark.parametrize("method", ["danceopd", "diffusionopd", "offpolicy", "sft", "softmix"])
def test_weighted_sum_normalises_by_distinct_samples(method):
    cfg = MethodConfig(name=method)
    g = torch.Generator().manual_seed(5)
    target = torch.randn(2, 5, generator=g)
    pred = torch.randn(2, 5, generator=g)
    # Two samples, one row each, weight 1.
    one = {"target": target, "weight": torch.ones(2), "sample_index": torch.tensor([0, 1])}
    # The same two samples, each queried twice at the same state with weight 1/2 (K = 2).
    two = {"target": target.repeat_interleave(2, 0), "weight": torch.full((4,), 0.5),
           "sample_index": torch.tensor([0, 0, 1, 1])}
    l1, _ = compute_loss(cfg, pred, one)
    l2, _ = compute_loss(cfg, pred.repeat_interleave(2, 0), two)
    assert torch.allclose(l1, l2)
    assert torch.allclose(l1, ((pred - target) ** 2).mean(1).mean())


def test_per_route_mean():
    out = per_route_mean(torch.tensor([1.0, 2.0, 3.0, 5.0]), ["t2i", "edit", "t2i", "edit"])
    assert out == {"t2i": 2.0, "edit": 3.5}
    with pytest.raises(ValueError):
        per_route_mean(torch.tensor([1.0]), ["a", "b"])


def test_flowopd_reward_to_go_credits_later_transitions():
    """A row's advantage sums the rewards of the later transitions of its own trajectory."""
    import torch

    from danceopd.losses import reward_to_go

    reward = torch.tensor([-1.0, -2.0, -4.0, -10.0, -20.0])
    sample = torch.tensor([0, 0, 0, 1, 1])
    query = torch.tensor([0, 1, 2, 0, 1])
    assert reward_to_go(reward, sample, query).tolist() == [-6.0, -4.0, 0.0, -20.0, 0.0]


def test_sft_condition_dropout_drops_text_per_sample_and_keeps_the_rest(toy_raw, tmp_path):
    """sft with cond_dropout: a seeded share of samples carries the null condition (text dropped,
    task / source part kept), so the trained model has an unconditional branch."""
    from danceopd.batch import tensor
    from rollout_workers.worker import RolloutWorker
    from services.loop import make_router
    from tests.conftest import cfg_for

    def conds(p, name):
        cfg = cfg_for(toy_raw, tmp_path, name, method__name="sft", method__cond_dropout=p, method__k=1)
        router = make_router(cfg, 1)
        worker = RolloutWorker(cfg)
        rb = worker.rollout(router.next_order(256))
        return worker.backend, tensor(rb, "cond")

    backend, full = conds(0.0, "p0")
    _, none = conds(1.0, "p1")
    _, half = conds(0.5, "p05")
    assert torch.equal(none, backend.null_cond(full))  # every text dropped, the task one-hot kept
    dropped = (half != full).any(dim=1)
    assert torch.equal(half[dropped], backend.null_cond(full)[dropped])
    assert 0.35 < dropped.float().mean() < 0.65
    _, again = conds(0.5, "p05b")
    assert torch.equal(again, half)  # seeded per sample
