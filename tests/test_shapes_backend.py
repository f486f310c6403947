"""The shapes backend: conditions, the tiny SD3 student, oracle and pretrained teachers, LoRA."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from danceopd import shapes_world as sw
from danceopd.backends import make_backend
from danceopd.backends.base import Row
from danceopd.backends.shapes import ShapesBackend
from danceopd.config import ConfigError, config_from_dict, load_config
from danceopd.fields import gaussian_velocity
from danceopd.lora import load_trainable_state_dict, trainable_state_dict


def _cfg(tmp_path: Path, lora: bool = False, **backend):
    return config_from_dict({
        "backend": {"name": "shapes", "num_layers": 1, **backend},
        "student": {"lora": {"enabled": lora}},
        "teachers": [
            {"name": "oracle", "kind": "oracle", "std": 0.01},
            {"name": "pre", "kind": "pretrained", "path": "teacher"},
        ],
        "routing": {"routes": [
            {"name": "t2i", "teacher": "oracle", "task": "t2i"},
            {"name": "local", "teacher": "oracle", "task": "local_edit", "requires_source_image": True},
            {"name": "global", "teacher": "pre", "task": "global_edit", "requires_source_image": True},
        ]},
        "data": {"path": "ds/data.csv"},
    }, base_dir=tmp_path)


def _rows(csv_path: Path) -> list[Row]:
    with csv_path.open(newline="") as f:
        return [Row(uid=r["uid"], task=r["task"], prompt=r["prompt"],
                    source_image=(csv_path.parent / r["source_image"]) if r["source_image"] else None,
                    target_image=csv_path.parent / r["target_image"], raw_task=r["raw_task"],
                    caption_dict=r["caption_dict"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shapes")
    rows = _rows(sw.write_shapes_dataset(tmp / "ds", n_per_task=4, seed=0))
    cfg = _cfg(tmp)
    backend = make_backend(cfg)
    backend.save_student(backend.build_student("random", seed=1), tmp / "teacher")
    return tmp, cfg, backend, rows


def test_make_backend_and_condition_layout(world):
    _, _, backend, rows = world
    assert isinstance(backend, ShapesBackend) and backend.state_shape == (3, 16, 16)
    cond = backend.encode(rows)
    assert cond.shape == (len(rows), len(sw.VOCAB) * 12 + 3 * 16 * 16 + 1) == (len(rows), backend.cond_dim)
    assert backend.packer.prompts(cond) == [r.prompt for r in rows]
    has = backend.packer.has_source(cond)
    assert has.tolist() == [r.source_image is not None for r in rows]
    assert backend.packer.source(cond)[~has].abs().sum() == 0
    null = backend.null_cond(cond)
    assert backend.packer.prompts(null) == [""] * len(rows)
    torch.testing.assert_close(backend.packer.source(null), backend.packer.source(cond))
    torch.testing.assert_close(null[:, -1], cond[:, -1])
    target = backend.data_target(rows)
    assert target.shape == (len(rows), 3, 16, 16) and target.abs().max() == 1.0


def test_student_predicts_and_round_trips_through_save_pretrained(world, tmp_path):
    _, _, backend, rows = world
    model = backend.build_student("random", seed=3)
    again = backend.build_student("random", seed=3)
    cond = backend.encode(rows)
    z, sigma = backend.noise(list(range(len(rows)))), torch.linspace(0.1, 0.9, len(rows))
    with torch.no_grad():
        v = backend.predict(model, z, sigma, cond)
        assert v.shape == z.shape and torch.isfinite(v).all()
        torch.testing.assert_close(backend.predict(again, z, sigma, cond), v, rtol=0, atol=0)
        backend.save_student(model, tmp_path / "student")
        assert (tmp_path / "student" / "diffusion_pytorch_model.safetensors").is_file()
        loaded = backend.build_student(str(tmp_path / "student"), seed=99)
        torch.testing.assert_close(backend.predict(loaded, z, sigma, cond), v, rtol=0, atol=0)
        # The text matters: a different prompt moves the prediction.
        assert (backend.predict(model, z, sigma, backend.null_cond(cond)) - v).abs().max() > 1e-4


def test_oracle_teacher_flows_noise_onto_the_ground_truth(world):
    _, cfg, backend, rows = world
    teacher = backend.build_teacher(cfg.teacher("oracle"), Path(cfg.base_dir))
    cond = backend.encode(rows)
    z = backend.noise([100 + i for i in range(len(rows))])
    sigmas = torch.linspace(1.0, 0.0, 33)
    for s0, s1 in zip(sigmas[:-1], sigmas[1:], strict=True):
        z = z + (s1 - s0) * teacher.velocity(z, s0.expand(len(rows)), cond)
    truth = torch.stack([torch.from_numpy(sw.ground_truth(r.prompt, None if r.source_image is None else sw.load_png(r.source_image)))
                         for r in rows])
    torch.testing.assert_close(truth, backend.data_target(rows))
    assert (z - truth).abs().max() < 0.05  # the flow map is mu + std*eps; std=0.01
    # Null condition: edits fall back to the source image, t2i to mid-grey.
    null_mu = teacher.targets(backend.null_cond(cond))
    for i, r in enumerate(rows):
        want = torch.zeros(3, 16, 16) if r.source_image is None else torch.from_numpy(sw.load_png(r.source_image))
        torch.testing.assert_close(null_mu[i], want)


def _truth(rows: list[Row]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(sw.ground_truth(r.prompt, None if r.source_image is None else sw.load_png(r.source_image)))
                        for r in rows])


def _demo_teachers(backend):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert cfg.backend.name == "shapes" and backend.size == cfg.backend.image_size
    return cfg, {t.name: backend.build_teacher(t, Path(cfg.base_dir)) for t in cfg.teachers}


def test_demo_oracles_are_specialists_so_softmix_is_not_hard_routing(world):
    """Each demo route's teacher knows only its task, so the softmix target (the weight-average of
    all routes' teachers, as the router computes it) is far from the hard-routed target."""
    _, _, backend, rows = world
    cfg, teachers = _demo_teachers(backend)
    total = sum(r.weight for r in cfg.routing.routes)
    for route in cfg.routing.routes:
        batch = [r for r in rows if r.task == route.task]
        assert batch, route.task
        cond = backend.encode(batch)
        z = backend.noise([200 + i for i in range(len(batch))])
        sigma = torch.linspace(0.2, 0.8, len(batch))
        hard = teachers[route.teacher].velocity(z, sigma, cond)
        soft = sum(r.weight / total * teachers[r.teacher].velocity(z, sigma, cond) for r in cfg.routing.routes)
        # Hard routing is the exact ground-truth field; softmix pulls every row away from it.
        torch.testing.assert_close(hard, gaussian_velocity(z, sigma, _truth(batch), teachers[route.teacher].std))
        rms = (hard - soft).pow(2).mean(dim=(1, 2, 3)).sqrt()
        assert rms.min() > 0.1, (route.name, rms)  # identical teachers give ~1e-7


def test_oracle_specialist_is_exact_on_its_task_and_drops_the_text_elsewhere(world):
    _, _, backend, rows = world
    cfg, teachers = _demo_teachers(backend)
    everything = backend.build_teacher(cfg.teachers[0].model_copy(update={"tasks": None}), Path(cfg.base_dir))
    cond = backend.encode(rows)
    z, sigma = backend.noise([300 + i for i in range(len(rows))]), torch.full((len(rows),), 0.4)
    truth, null_mu = _truth(rows), everything.targets(backend.null_cond(cond))
    for t in cfg.teachers:
        assert t.tasks is not None and len(t.tasks) == 1
        teacher = teachers[t.name]
        own = torch.tensor([r.task in t.tasks for r in rows])
        assert own.any() and (~own).any()
        mu = teacher.targets(cond)
        torch.testing.assert_close(mu[own], truth[own], rtol=0, atol=0)
        torch.testing.assert_close(mu[~own], null_mu[~own], rtol=0, atol=0)  # source image / mid-grey
        v = teacher.velocity(z, sigma, cond)
        torch.testing.assert_close(v[own], gaussian_velocity(z, sigma, truth, t.std)[own])
        torch.testing.assert_close(v[own], everything.velocity(z, sigma, cond)[own])
        assert (v[~own] - everything.velocity(z, sigma, cond)[~own]).abs().amax(dim=(1, 2, 3)).min() > 0.1
    bad = cfg.teachers[0].model_copy(update={"tasks": ["t2i", "inpaint"]})
    with pytest.raises(ValueError, match=f"teacher {bad.name}: unknown ShapesBench task 'inpaint'"):
        backend.build_teacher(bad, Path(cfg.base_dir))
    raw = {"backend": {"name": "shapes"}, "data": {"path": "d.csv"},
           "routing": {"routes": [{"name": "r", "teacher": "pre", "task": "t2i"}]},
           "teachers": [{"name": "o", "kind": "oracle", "tasks": ["t2i"]}, {"name": "pre", "kind": "pretrained", "path": "t", "tasks": ["t2i"]}]}
    with pytest.raises(ConfigError, match="teachers.1.tasks: only oracle teachers"):
        config_from_dict(raw)


def test_pretrained_teacher_is_frozen_and_matches_its_folder(world):
    tmp, cfg, backend, rows = world
    teacher = backend.build_teacher(cfg.teacher("pre"), Path(cfg.base_dir))
    assert not any(p.requires_grad for p in teacher.model.parameters())
    student = backend.build_student(str(tmp / "teacher"), seed=0)
    cond, z, sigma = backend.encode(rows), backend.noise([1] * len(rows)), torch.full((len(rows),), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(teacher.velocity(z, sigma, cond), backend.predict(student, z, sigma, cond))


def test_lora_student_trains_only_adapters(world, tmp_path):
    tmp, _, _, rows = world
    backend = ShapesBackend(_cfg(tmp, lora=True))
    model = backend.build_student("random", seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sd = trainable_state_dict(model)
    assert set(sd) == set(trainable)
    cond, z, sigma = backend.encode(rows), backend.noise(list(range(len(rows)))), torch.full((len(rows),), 0.7)
    with torch.no_grad():
        before = backend.predict(model, z, sigma, cond)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = (backend.predict(model, z, sigma, cond) - backend.data_target(rows)).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = backend.predict(model, z, sigma, cond)
    assert (after - before).abs().max() > 1e-5
    # Trained adapters load back into a fresh LoRA student, and a merged save keeps the predictions.
    fresh = backend.build_student("random", seed=0)
    load_trainable_state_dict(fresh, trainable_state_dict(model))
    backend.save_student(model, tmp_path / "lora")
    merged = backend.build_student(str(tmp_path / "lora"), seed=5)
    with torch.no_grad():
        torch.testing.assert_close(backend.predict(fresh, z, sigma, cond), after)
        torch.testing.assert_close(backend.predict(merged, z, sigma, cond), after, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown key"):
        load_trainable_state_dict(fresh, {**sd, "nope.lora_A.weight": torch.zeros(1)})


def test_lora_on_the_toy_mlp():
    from danceopd.backends.toy import ToyMLP
    from danceopd.config import LoraConfig
    from danceopd.lora import apply_lora

    model = apply_lora(ToyMLP(4, 6, 32), LoraConfig(enabled=True, target_modules=["net.0", "net.2"]))
    assert sorted(trainable_state_dict(model)) == sorted(
        f"net.{i}.lora_{ab}.default.weight" for i in (0, 2) for ab in "AB")
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(ToyMLP(4, 6, 32), LoraConfig(enabled=True, target_modules=["to_q"]))


def test_clear_errors_for_bad_rows(world, tmp_path):
    _, _, backend, rows = world
    edit = next(r for r in rows if r.source_image is not None)
    with pytest.raises(ValueError, match=f"row {edit.uid}: source image .* not found"):
        backend.encode([Row(edit.uid, edit.task, edit.prompt, source_image=tmp_path / "missing.png")])
    sw.save_png(np.zeros((3, 32, 32), np.float32), tmp_path / "big.png")
    with pytest.raises(ValueError, match=f"row {edit.uid}: target image .*big.png is 32x32, expected 16x16"):
        backend.data_target([Row(edit.uid, edit.task, edit.prompt, target_image=tmp_path / "big.png")])
    with pytest.raises(ValueError, match="row x: prompt word 'purple'"):
        backend.encode([Row("x", "t2i", "a purple circle")])
    with pytest.raises(ValueError, match="not a save_pretrained model folder"):
        backend.build_student(str(tmp_path / "nothing"), seed=0)


@pytest.mark.subprocess
def test_too_small_images_and_toy_stay_free_of_diffusers(tmp_path):
    with pytest.raises(ValueError, match="image_size 12 is too small"):
        ShapesBackend(_cfg(tmp_path, image_size=12))
    import subprocess
    import sys

    code = ("import sys; from danceopd.config import config_from_dict; from danceopd.backends import make_backend; "
            "make_backend(config_from_dict({'teachers': [{'name': 't'}], 'routing': {'routes': [{'name': 'r', 'teacher': 't', 'task': 'x'}]}, "
            "'data': {'path': 'd.csv'}})); assert 'diffusers' not in sys.modules and 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_the_student_sees_word_order(world):
    """Swapping the two colours of a prompt is another scene; without token positions SD3's
    permutation-equivariant text attention saw the same input (velocities 3.6e-7 apart)."""
    _, _, backend, _ = world
    model = backend.build_student("random", seed=2)
    a = Row(uid="a", task="t2i", prompt="a red circle at top left on a blue background")
    b = Row(uid="b", task="t2i", prompt="a blue circle at top left on a red background")
    c = Row(uid="c", task="t2i", prompt="a green circle at top left on a blue background")  # one word changed
    z, s = backend.noise([1, 1, 1]), torch.tensor([0.5, 0.5, 0.5])
    with torch.no_grad():
        v = backend.predict(model, z, s, backend.encode([a, b, c]))
    swapped, one_word = (v[0] - v[1]).abs().max(), (v[0] - v[2]).abs().max()
    assert swapped > 0.05 * one_word, (swapped, one_word)  # without positions: 1e-7
