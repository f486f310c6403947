"""Device placement: a rollout stays on the student's device across its Euler steps, and the
learner moves each micro-batch to the model's device once.

On a GPU a host round trip per step (a `.cpu()`, `.item()`, `.numpy()`, or a `.to(device)` of
the state or the sigmas inside the loop) stalls the step. This machine has no GPU, so the tests
count those calls: the count of a rollout must not grow with its number of steps. And the meta
device stands in for a GPU (every op runs, nothing computes): a rollout whose model is there must
keep its states there.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import pytest
import torch

from danceopd.config import config_from_dict
from danceopd.device import model_device
from danceopd.flow import integrate, sigma_schedule
from danceopd.work import WorkItem, WorkOrder

TRANSFERS = ("cpu", "cuda", "item", "numpy")  # each a host round trip on a GPU tensor


def _names_a_device(args, kwargs) -> bool:
    """Tensor.to(...) that moves between devices (a device, a device string, another tensor's
    device), not a dtype cast."""
    if "device" in kwargs:
        return True
    return bool(args) and isinstance(args[0], (torch.device, str, torch.Tensor))


@contextlib.contextmanager
def counted_transfers():
    """Counts, by name, the calls that move a tensor between host and device."""
    counts: collections.Counter = collections.Counter()
    saved = {name: getattr(torch.Tensor, name) for name in (*TRANSFERS, "to")}

    def wrap(name):
        orig = saved[name]

        def f(self, *args, **kwargs):
            if name != "to" or _names_a_device(args, kwargs):
                counts[name] += 1
            return orig(self, *args, **kwargs)

        return f

    try:
        for name in saved:
            setattr(torch.Tensor, name, wrap(name))
        yield counts
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def _field(z, sigma, active):
    return -z * (1 + sigma.reshape(-1, 1))


@pytest.mark.parametrize("sde", [False, True])
def test_the_integrator_moves_nothing_per_step(sde):
    """The same batch over N and 2N steps (samples stopping early, SDE noise too): the same
    transfers, all of them before the first step."""
    counts = []
    for n in (8, 16):
        z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
        until = [n, n // 2, 1, n, 0]
        noise = torch.randn(n, 5, 3, generator=torch.Generator().manual_seed(1))
        kw = {"eta": 0.7, "noise": lambda i, active: noise[i, active]} if sde else {}  # noqa: B023
        with counted_transfers() as c:
            traj = integrate(_field, z, sigma_schedule(n, 3.0), until, **kw)
        assert len(traj.states) == n + 1 and traj.nfe == sum(until)
        counts.append(dict(c))
    assert counts[0] == counts[1], f"transfers grow with the steps: {counts[0]} at 8 steps, {counts[1]} at 16"


def toy_cfg(toy_raw, tmp_path, n: int, method: str):
    raw = {**toy_raw, "method": {**toy_raw["method"], "name": method, "rollout_steps": n, "k": 1},
           "rollout": {**toy_raw["rollout"], "early_stop": True}}
    return config_from_dict(raw, base_dir=tmp_path)


def order_of(cfg, n_items: int = 6) -> WorkOrder:
    from danceopd.dataset import Dataset

    rows = Dataset.load(cfg.resolve(cfg.data.path)).rows[:n_items]
    items = [WorkItem(route="t2i", row=r, seed=100 + i, sample_index=i, group=i) for i, r in enumerate(rows)]
    return WorkOrder(ticket=0, items=tuple(items))


@pytest.mark.parametrize("method", ["danceopd", "flowopd"])
def test_a_rollout_worker_moves_nothing_per_step(toy_raw, tmp_path, method):
    """A real worker's rollout (ODE with early stop; the SDE with its noise) of N and of 2N steps:
    the same transfers (its rows go to the host once, at the end)."""
    from rollout_workers.worker import RolloutWorker

    counts = []
    for n in (8, 16):
        worker = RolloutWorker(toy_cfg(toy_raw, tmp_path, n, method))
        order = order_of(worker.cfg)
        with counted_transfers() as c:
            rb = worker.rollout(order)
        assert rb.num_rows >= len(order.items)
        counts.append(dict(c))
    assert counts[0] == counts[1], f"transfers grow with the steps: {counts[0]} at 8 steps, {counts[1]} at 16"


@pytest.mark.parametrize("method", ["danceopd", "flowopd"])
def test_rollout_states_live_on_the_model_device(toy_raw, tmp_path, method):
    """The student on another device (meta, a GPU's stand-in): the noise goes there and every
    state and velocity of the trajectory stays there."""
    from rollout_workers.worker import RolloutWorker

    worker = RolloutWorker(toy_cfg(toy_raw, tmp_path, 8, method))
    worker.model.to("meta")
    worker.device = model_device(worker.model)
    order = order_of(worker.cfg)
    seeds = [it.seed for it in order.items]
    cond = worker.backend.encode([it.row for it in order.items])
    idx = [worker.method.queried(8, s) for s in seeds]
    traj = worker._trajectory(worker.method, worker.backend.noise(seeds), cond, seeds, idx)
    assert {t.device.type for t in traj.states + traj.velocities} == {"meta"}
    assert len(traj.states) == 1 + max(worker.method.steps_needed(i, 8, True) for i in idx)


def test_the_learner_moves_each_micro_batch_to_the_models_device(toy_raw, tmp_path, monkeypatch):
    """The plain learner hands `batch_loss` its model's device (it moves the batch there once)."""
    import learner.learner as plain
    from rollout_workers.worker import RolloutWorker

    cfg = toy_cfg(toy_raw, tmp_path, 8, "danceopd")
    rb = RolloutWorker(cfg).rollout(order_of(cfg))
    rb = rb.set_column(rb.schema.get_field_index("target"), "target", rb.column("state"))  # any finite target
    seen = []
    real = plain.batch_loss

    def spy(backend, model, method, batch, device=None, *rest):
        seen.append(device)
        return real(backend, model, method, batch, device, *rest)

    monkeypatch.setattr(plain, "batch_loss", spy)
    lrn = plain.Learner(cfg)
    metrics = lrn.train_step([rb])
    assert seen == [model_device(lrn.model)] and np.isfinite(metrics["loss"])


def test_summary_reports_throughput_step_time_and_peak_gpu_memory_per_role(toy_raw, tmp_path):
    from services.loop import train
    from tests.conftest import cfg_for

    cfg = cfg_for(toy_raw, tmp_path, "run", learner__steps=3, checkpoint__every=0, eval__enabled=False)
    s = train(cfg, show_progress=False)
    produced = s["accounting"]["produced"]
    # wall_s is rounded to 1 ms: at thousands of samples/s (a 30 ms local run) that is samples
    slack = 0.01 * produced + 0.001 * s["rollout_samples_per_s"] + 0.01
    assert produced > 0 and abs(s["rollout_samples_per_s"] * s["wall_s"] - produced) <= slack
    assert s["teacher_rows_per_s"] > 0 and 0 < s["learner_step_seconds_mean"] < s["wall_s"]
    assert s["peak_gpu_memory_bytes"] == {"rollout": 0, "teacher": 0, "learner": 0}  # no CUDA here; the router holds no model
