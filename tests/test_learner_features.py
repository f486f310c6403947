"""The learner's practitioner features: bf16 mixed precision (`learner.precision`), the lr schedule
(`learner.lr_schedule`, `warmup_steps`, `min_lr`) and the weights' EMA (`learner.ema_decay`,
`eval.weights`), in the plain learner, the local loop's checkpoints and the DeepSpeed learner."""

from __future__ import annotations

import math
import socket

import pytest
import torch

from danceopd.checkpoint import CheckpointError, checkpoint_dir, load_json, load_tensors
from danceopd.config import ConfigError
from learner.deepspeed_learner import DeepSpeedLearner, _ds_config
from learner.learner import Learner
from learner.schedule import lr_at
from learner.step import batch_loss
from services.checkpoints import student_weights
from services.loop import train
from services.telemetry.progress import read_metrics
from tests.conftest import cfg_for
from tests.test_deepspeed_learner import routed_batches


def closed_form_lr(kind: str, n: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """The documented curve, written out on its own: warm-up lr*n/w, then the decay whose last
    step (n = total) is min_lr."""
    if n <= warmup:
        return lr * n / warmup
    if kind == "constant":
        return lr
    p = (n - warmup) / (total - warmup)
    if kind == "linear":
        return lr - (lr - min_lr) * p
    return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
@pytest.mark.parametrize("warmup", [0, 4])
def test_lr_curve_is_the_closed_form(toy_raw, tmp_path, kind, warmup):
    cfg = cfg_for(toy_raw, tmp_path, "lr", learner__steps=40, learner__lr=0.01, learner__min_lr=0.001,
                  learner__lr_schedule=kind, learner__warmup_steps=warmup)
    lc = cfg.learner
    curve = [lr_at(lc, n) for n in range(1, 41)]
    want = [closed_form_lr(kind, n, 0.01, 0.001, warmup, 40) for n in range(1, 41)]
    assert curve == pytest.approx(want, rel=1e-12, abs=1e-15)
    if warmup:  # from 0 up: the first step is lr/w, the w-th exactly lr
        assert curve[0] == pytest.approx(0.01 / warmup) and curve[warmup - 1] == 0.01
    if kind == "constant":
        assert set(curve[warmup:]) == {0.01}
    else:  # the decay runs monotonically down to min_lr at the last step
        assert curve[-1] == pytest.approx(0.001) and all(a > b for a, b in zip(curve[warmup:], curve[warmup + 1:]))
    if kind == "cosine":
        mid = warmup + (40 - warmup) // 2
        assert curve[mid - 1] == pytest.approx(0.0055)  # halfway between lr and min_lr


def test_schedule_and_ema_keys_are_checked_in_one_line(toy_raw, tmp_path):
    bad = [({"learner__warmup_steps": 50, "learner__steps": 10}, "learner.warmup_steps: 50 is above learner.steps=10"),
           ({"learner__min_lr": 0.1}, "learner.min_lr: 0.1 is above learner.lr=0.002"),
           ({"learner__ema_decay": 1.0}, "learner.ema_decay: Input should be less than 1"),
           ({"learner__precision": "fp16"}, "learner.precision: Input should be 'fp32' or 'bf16'"),
           ({"eval__weights": "ema"}, "eval.weights: `ema` needs learner.ema_decay")]
    for over, msg in bad:
        with pytest.raises(ConfigError) as e:
            cfg_for(toy_raw, tmp_path, "bad", **over)
        assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)


def test_deepspeed_config_takes_bf16_at_zero_1_to_3_only(toy_raw, tmp_path):
    """ZeRO-1..3: DeepSpeed's bf16 mode; ZeRO-0 autocasts on fp32 weights (DeepSpeed's ZeRO-0 bf16
    would swap in its own optimizer wrapper); fp32: never."""
    def ds(stage, precision):
        return _ds_config(cfg_for(toy_raw, tmp_path, "ds", learner__zero_stage=stage, learner__precision=precision))

    for stage in (1, 2, 3):
        assert ds(stage, "bf16")["bf16"] == {"enabled": True} and ds(stage, "fp32")["bf16"] == {"enabled": False}
        assert ds(stage, "bf16")["fp16"] == {"enabled": False}
    assert ds(0, "bf16")["bf16"] == {"enabled": False}


def adam_first_step(after: dict, before: dict) -> float:
    """The largest weight change of a first AdamW step (no weight decay): m/sqrt(v) is sign(g), so
    every weight with a gradient moves by the step's lr."""
    return max((after[k] - before[k]).abs().max().item() for k in before)


def test_plain_learner_steps_with_the_scheduled_lr(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "plain", learner__steps=10, learner__warmup_steps=4, learner__lr_schedule="cosine")
    micro = routed_batches(cfg, 1)
    learner = Learner(cfg)
    w0 = learner.export_weights()
    out = learner.train_step(micro)
    assert out["lr"] == lr_at(cfg.learner, 1) == pytest.approx(0.002 / 4)
    assert adam_first_step(learner.export_weights(), w0) == pytest.approx(0.002 / 4, rel=1e-3)
    for n in range(2, 8):
        out = learner.train_step(micro)
        assert out["lr"] == lr_at(cfg.learner, n) == learner.optimizer.param_groups[0]["lr"]


def test_bf16_on_cpu_autocasts_the_forward_and_keeps_fp32_weights(toy_raw, tmp_path):
    cfg = cfg_for(toy_raw, tmp_path, "bf16", learner__precision="bf16")
    micro = routed_batches(cfg, 1)
    learner = Learner(cfg)
    seen = []
    for layer in (learner.model.net[0], learner.model.net[-1]):
        layer.register_forward_hook(lambda m, i, o: seen.append((m.weight.dtype, i[0].dtype, o.dtype)))
    loss, _, bad = batch_loss(learner.backend, learner.model, learner.method, micro[0], precision=learner.cfg.learner.precision)
    # fp32 weights and inputs, a bf16 matmul; the loss itself is fp32
    assert seen == [(torch.float32, torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16, torch.bfloat16)]
    assert loss.dtype == torch.float32 and bad is None
    fp32, _, _ = batch_loss(learner.backend, learner.model, learner.method, micro[0])
    assert fp32.item() != loss.item() and fp32.item() == pytest.approx(loss.item(), rel=2e-2)  # bf16 was in effect
    w0 = learner.export_weights()
    out = learner.train_step(micro)
    assert out["skipped"] is None and out["version"] == 1
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    states = [t for s in learner.optimizer.state.values() for t in s.values() if t.dim() > 0]
    assert states and all(t.dtype == torch.float32 for t in states)
    assert any(not torch.equal(w0[k], v) for k, v in learner.export_weights().items())


def test_ema_is_the_running_average_of_the_weights(toy_raw, tmp_path):
    decay = 0.7
    cfg = cfg_for(toy_raw, tmp_path, "ema", learner__ema_decay=decay)
    batches = routed_batches(cfg, 3)
    learner = Learner(cfg)
    expect = {k: v.double() for k, v in learner.export_weights().items()}  # it starts at the initial weights
    assert all(torch.equal(learner.export_ema()[k], v.float()) for k, v in expect.items())
    for i in range(6):
        learner.train_step([batches[i % 3]])
        w = learner.export_weights()
        expect = {k: decay * expect[k] + (1 - decay) * w[k].double() for k in w}
    ema = learner.export_ema()
    assert ema.keys() == expect.keys() and all(v.dtype == torch.float32 for v in ema.values())
    assert max((ema[k].double() - expect[k]).abs().max().item() for k in ema) <= 1e-6
    assert max((ema[k] - w[k]).abs().max().item() for k in ema) > 1e-3  # an average, not the weights
    assert Learner(cfg_for(toy_raw, tmp_path, "off")).export_ema() is None


def step_lrs(cfg) -> list[float]:
    steps, _ = read_metrics(cfg.output_path / "metrics.jsonl")
    return [s["lr"] for s in steps]


def test_local_resume_continues_the_lr_curve_and_the_ema(toy_raw, tmp_path):
    """An uninterrupted run against one resumed from its step-4 checkpoint: the same lr per step,
    the same final weights and EMA, bit for bit."""
    over = dict(learner__steps=12, learner__lr_schedule="cosine", learner__warmup_steps=3, learner__min_lr=0.0002,
                learner__ema_decay=0.8, checkpoint__every=4, checkpoint__keep=3, eval__enabled=False)
    full = cfg_for(toy_raw, tmp_path, "full", **over)
    train(full, show_progress=False)
    curve = step_lrs(full)
    assert curve == [lr_at(full.learner, n) for n in range(1, 13)] and len(set(curve)) > 6

    mid = checkpoint_dir(full.output_path, 4)
    assert "ema.safetensors" in load_json(mid / "COMPLETE")["files"]
    resumed = cfg_for(toy_raw, tmp_path, "resumed", **over)
    train(resumed, resume_from=mid, show_progress=False)
    assert step_lrs(resumed) == curve[4:]
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_tensors(checkpoint_dir(c.output_path, 12) / name) for c in (full, resumed))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema, model = (load_tensors(checkpoint_dir(full.output_path, 12) / n) for n in ("ema.safetensors", "model.safetensors"))
    assert any(not torch.equal(ema[k], model[k]) for k in ema)


def test_ema_turned_on_at_a_resume_starts_from_the_checkpoints_weights(toy_raw, tmp_path, capsys):
    plain = cfg_for(toy_raw, tmp_path, "plain", learner__steps=2, checkpoint__every=2, eval__enabled=False)
    train(plain, show_progress=False)
    ckpt = checkpoint_dir(plain.output_path, 2)
    assert not (ckpt / "ema.safetensors").exists()
    more = cfg_for(toy_raw, tmp_path, "more", learner__steps=3, learner__ema_decay=0.5, checkpoint__every=3,
                   eval__enabled=False)
    train(more, resume_from=ckpt, show_progress=False)
    assert "holds no ema.safetensors (trained without learner.ema_decay): the EMA starts from its weights" in capsys.readouterr().err
    start, end = load_tensors(ckpt / "model.safetensors"), checkpoint_dir(more.output_path, 3)
    w, ema = load_tensors(end / "model.safetensors"), load_tensors(end / "ema.safetensors")
    assert all(torch.allclose(ema[k], 0.5 * start[k] + 0.5 * w[k], atol=1e-7) for k in ema)


def test_eval_weights_ema_evaluates_and_samples_the_average(toy_raw, tmp_path):
    from danceopd.evaluate import Evaluator

    cfg = cfg_for(toy_raw, tmp_path, "evalema", learner__steps=4, learner__ema_decay=0.5, eval__weights="ema",
                  checkpoint__every=4, eval__prompts=2)
    train(cfg, show_progress=False)
    ckpt = checkpoint_dir(cfg.output_path, 4)
    _, evals = read_metrics(cfg.output_path / "metrics.jsonl")
    assert [e["step"] for e in evals] == [0, 4]
    assert student_weights(cfg, ckpt) == ckpt / "ema.safetensors"
    evaluator = Evaluator(cfg)
    of = {n: evaluator.evaluate(load_tensors(ckpt / n), 4)["routes"] for n in ("ema.safetensors", "model.safetensors")}
    assert evals[-1]["eval"] == of["ema.safetensors"] != of["model.safetensors"]

    online = cfg_for(toy_raw, tmp_path, "evalema", learner__ema_decay=0.5)
    assert student_weights(online, ckpt) == ckpt / "model.safetensors"
    (ckpt / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no ema.safetensors .*--set eval.weights=online"):
        student_weights(cfg, ckpt)


# ---- DeepSpeed (CPU, gloo, one rank as a Ray actor) ------------------------------------------------

class ProbedLearner(DeepSpeedLearner):
    """The DeepSpeed learner with what a test reads from inside its engine."""

    def step_seeing(self, micro) -> tuple[dict, list]:
        """A train_step, with the (weight, input, output) dtypes its first layer saw."""
        seen = []
        handle = self.engine.module.net[0].register_forward_hook(lambda m, i, o: seen.append(
            [str(t).removeprefix("torch.") for t in (m.weight.dtype, i[0].dtype, o.dtype)]))
        try:
            return self.train_step(micro), seen
        finally:
            handle.remove()

    def dtypes(self) -> dict:
        opt = self.engine.optimizer
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", [])
        states = [t for s in opt.optimizer.state.values() for t in s.values() if t.dim() > 0]
        return {"working": sorted({str(p.dtype) for p in self.engine.module.parameters()}),
                "master": sorted({str(t.dtype) for t in masters}), "adam": sorted({str(t.dtype) for t in states}),
                "lr": self.engine.get_lr()}


def spawn_probed(ray, cfg):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ray.remote(num_cpus=1)(ProbedLearner).remote(cfg, 0, 1, "127.0.0.1", port)


def ds_cfg(toy_raw, tmp_path, **learner):
    learner = {"steps": 10, "warmup_steps": 4, "lr_schedule": "linear", "ema_decay": 0.6, **learner}
    return cfg_for(toy_raw, tmp_path, "ds", rollout__batch_size=16, **{f"learner__{k}": v for k, v in learner.items()})


def test_deepspeed_step_uses_the_scheduled_lr_and_keeps_the_ema(ray_local, toy_raw, tmp_path):
    cfg = ds_cfg(toy_raw, tmp_path, zero_stage=2)
    micro = routed_batches(cfg, 1)
    rank = spawn_probed(ray_local, cfg)
    try:
        w = ray_local.get(rank.export_weights.remote())
        expect = {k: v.double() for k, v in w.items()}
        for n in range(1, 6):
            out = ray_local.get(rank.train_step.remote(micro))
            new = ray_local.get(rank.export_weights.remote())
            assert out["lr"] == lr_at(cfg.learner, n) and ray_local.get(rank.dtypes.remote())["lr"] == [out["lr"]]
            if n == 1:  # the optimizer itself stepped with it: a first AdamW step moves by its lr
                assert adam_first_step(new, w) == pytest.approx(0.002 / 4, rel=1e-3)
            expect = {k: 0.6 * expect[k] + 0.4 * new[k].double() for k in new}
        ema = ray_local.get(rank.export_ema.remote())
        assert max((ema[k].double() - expect[k]).abs().max().item() for k in ema) <= 1e-6
    finally:
        ray_local.get(rank.shutdown.remote())
        ray_local.kill(rank)


def test_deepspeed_bf16_keeps_fp32_master_weights_and_resumes_exactly(ray_local, toy_raw, tmp_path):
    """ZeRO-3 in DeepSpeed's bf16 mode on CPU: bf16 working weights and forward, fp32 master weights,
    AdamW states and exports; rank 0's EMA over the gathered weights; a checkpoint restores it all."""
    cfg = ds_cfg(toy_raw, tmp_path, zero_stage=3, precision="bf16")
    micro = routed_batches(cfg, 2)
    rank = spawn_probed(ray_local, cfg)
    try:
        out, seen = ray_local.get(rank.step_seeing.remote(micro[:1]))
        assert out["skipped"] is None and seen == [["bfloat16", "float32", "bfloat16"]]
        d = ray_local.get(rank.dtypes.remote())
        assert d["working"] == ["torch.bfloat16"] and d["master"] == d["adam"] == ["torch.float32"]
        w = ray_local.get(rank.export_weights.remote())
        assert {v.dtype for v in w.values()} == {torch.float32}
        assert all(torch.equal(v, v.bfloat16().float()) for v in w.values())  # the bf16 working weights
        folder = tmp_path / "ckpt"
        ray_local.get(rank.save_checkpoint.remote(str(folder)))
        assert load_json(folder / "engine.json")["precision"] == "bf16"
        ema = ray_local.get(rank.export_ema.remote())
        a = ray_local.get(rank.train_step.remote(micro[1:]))
        wa, ea = ray_local.get([rank.export_weights.remote(), rank.export_ema.remote()])
        ray_local.get(rank.load_checkpoint.remote(str(folder)))
        ray_local.get(rank.load_ema.remote(ema))
        b = ray_local.get(rank.train_step.remote(micro[1:]))
        wb, eb = ray_local.get([rank.export_weights.remote(), rank.export_ema.remote()])
        assert a["loss"] == b["loss"] and a["lr"] == b["lr"] == lr_at(cfg.learner, 2)
        assert all(torch.equal(wa[k], wb[k]) and torch.equal(ea[k], eb[k]) for k in wa)
    finally:
        ray_local.get(rank.shutdown.remote())
        ray_local.kill(rank)


@pytest.mark.slow
def test_ray_mode_resumes_a_local_checkpoints_ema_and_lr_curve(ray_local, toy_raw, tmp_path):
    """local -> ray: rank 0's EMA continues from the local checkpoint's (the closed form from that
    EMA and the new weights), the lr curve from its step, and the ray evaluator scores the EMA
    (eval.weights: ema)."""
    from danceopd.evaluate import Evaluator

    over = dict(learner__steps=6, learner__lr_schedule="linear", learner__warmup_steps=2, learner__min_lr=0.0005,
                learner__ema_decay=0.75, eval__weights="ema", eval__prompts=2, checkpoint__every=1, learner__world_size=1)
    local = cfg_for(toy_raw, tmp_path, "local", **{**over, "learner__steps": 4, "eval__enabled": False})
    train(local, show_progress=False)
    ckpt4 = checkpoint_dir(local.output_path, 4)
    remote = cfg_for(toy_raw, tmp_path, "ray", **over)
    train(remote, mode="ray", resume_from=ckpt4, show_progress=False)
    assert step_lrs(remote) == [lr_at(remote.learner, 5), lr_at(remote.learner, 6)] == pytest.approx([0.000875, 0.0005])
    ema = load_tensors(ckpt4 / "ema.safetensors")
    for step in (5, 6):
        w = load_tensors(checkpoint_dir(remote.output_path, step) / "model.safetensors")
        ema = {k: 0.75 * ema[k] + 0.25 * w[k] for k in ema}
    ema6 = load_tensors(checkpoint_dir(remote.output_path, 6) / "ema.safetensors")
    assert all(torch.allclose(ema6[k], ema[k], rtol=0, atol=1e-7) for k in ema6)
    _, evals = read_metrics(remote.output_path / "metrics.jsonl")
    assert evals[-1]["step"] == 6 and evals[-1]["eval"] == Evaluator(remote).evaluate(ema6, 6)["routes"]
