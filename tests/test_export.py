"""`danceopd export` (danceopd/export.py): a checkpoint's student as folders diffusers loads.

Checkpoints are written by the real save path (services.checkpoints.save, a real local learner)
after the learner's trainable weights moved by seeded noise, as training would move them. The
exports are loaded back with the diffusers classes (`from_pretrained`, `load_lora_weights`) and
one transformer forward on the same inputs is compared with the learner's own student."""

import filecmp
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tests.conftest import ROOT, cfg_for


def save_checkpoint(cfg, scale: float = 0.05, step: int = 3):
    """(checkpoint folder, the learner's student) after moving every trainable weight."""
    from services import checkpoints
    from services.runtime.local import LocalLearner

    learner = LocalLearner(cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in learner.learner.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    snap = SimpleNamespace(run_id="run-x", step=step, mode="local", accounting={})
    return Path(checkpoints.save(cfg, snap, learner, {"next_ticket": 0})), learner.learner.model.eval()


def cli(*args):
    from services.cli import app

    return CliRunner().invoke(app, ["export", *map(str, args)])


def one_error_line(res) -> str:
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: export: "), res.output
    return lines[0]


# ---- refusals before anything is loaded (toy: the fast lane) --------------------------------------

def test_toy_student_is_refused_in_one_line(toy_raw, tmp_path):
    ckpt, _ = save_checkpoint(cfg_for(toy_raw, tmp_path, "run"))
    line = one_error_line(cli(ckpt, "--out", tmp_path / "out"))
    assert "toy student is no diffusers model" in line and "(export: shapes, sd3, zimage)" in line
    assert not (tmp_path / "out").exists()


def test_incomplete_or_damaged_checkpoint_is_refused(toy_raw, tmp_path):
    ckpt, _ = save_checkpoint(cfg_for(toy_raw, tmp_path, "run"))
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    line = one_error_line(cli(ckpt, "--out", tmp_path / "out"))
    assert "the checkpoint is damaged: model.safetensors is" in line
    (ckpt / "COMPLETE").unlink()
    assert "not a complete checkpoint folder (no COMPLETE)" in one_error_line(cli(ckpt, "--out", tmp_path / "out"))
    assert "no such checkpoint folder" in one_error_line(cli(tmp_path / "nope", "--out", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ---- shapes: the student's model folder -------------------------------------------------------------

@pytest.fixture
def shapes_cfg(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["student"] = {"init": "random", "lora": {"enabled": True, "rank": 4, "alpha": 8}}
    return cfg_for(raw, tmp_path, "run")


@pytest.mark.slow
def test_shapes_export_is_the_student_model_folder(shapes_cfg, tmp_path):
    from diffusers import SD3Transformer2DModel

    from danceopd.backends import make_backend

    ckpt, student = save_checkpoint(shapes_cfg)
    out = tmp_path / "shapes-export"
    res = cli(ckpt, "--out", out)
    assert res.exit_code == 0 and "no lora/: a shapes student has no pipeline" in res.output, res.output
    backend = make_backend(shapes_cfg)
    loaded = SD3Transformer2DModel.from_pretrained(out, use_safetensors=True).eval()
    g = torch.Generator().manual_seed(3)
    z, sigma = torch.randn(2, *backend.state_shape, generator=g), torch.tensor([0.7, 0.2])
    cond = torch.rand(2, backend.cond_dim, generator=g)
    with torch.no_grad():
        want = backend.predict(student, z, sigma, cond)
        fresh = backend.predict(backend.build_student("random", shapes_cfg.job.seed).eval(), z, sigma, cond)
        assert (want - fresh).abs().max() > 1e-2  # the trained weights matter: the comparison below can fail
        torch.testing.assert_close(backend.predict(loaded, z, sigma, cond), want, atol=1e-5, rtol=1e-5)
    record = json.loads((out / "danceopd_export.json").read_text())
    assert record["step"] == 3 and record["run_id"] == "run-x" and record["lora"] is None


@pytest.mark.slow
def test_eval_weights_ema_exports_the_checkpoints_ema(shapes_cfg, tmp_path):
    """`--set eval.weights=ema` exports ema.safetensors (here the weights before the learner moved
    them: its EMA was never updated), not the online model.safetensors."""
    from diffusers import SD3Transformer2DModel

    from danceopd.backends import make_backend

    cfg = shapes_cfg.model_copy(update={"learner": shapes_cfg.learner.model_copy(update={"ema_decay": 0.9})})
    ckpt, student = save_checkpoint(cfg)
    assert (ckpt / "ema.safetensors").is_file()
    res = cli(ckpt, "--out", tmp_path / "ema", "--set", "eval.weights=ema")
    assert res.exit_code == 0, res.output
    backend = make_backend(cfg)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "ema", use_safetensors=True).eval()
    g = torch.Generator().manual_seed(3)
    z, sigma = torch.randn(2, *backend.state_shape, generator=g), torch.tensor([0.7, 0.2])
    cond = torch.rand(2, backend.cond_dim, generator=g)
    with torch.no_grad():
        ema = backend.predict(backend.build_student("random", cfg.job.seed).eval(), z, sigma, cond)
        assert (backend.predict(student, z, sigma, cond) - ema).abs().max() > 1e-2
        torch.testing.assert_close(backend.predict(loaded, z, sigma, cond), ema, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_out_is_refused_when_not_empty_replaced_with_overwrite_and_never_half_written(shapes_cfg, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    from danceopd.export import export

    ckpt, _ = save_checkpoint(shapes_cfg)
    out = tmp_path / "exports" / "mine"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("keep me")
    assert "is not empty; pass --overwrite" in one_error_line(cli(ckpt, "--out", out))
    assert "overlaps the checkpoint" in one_error_line(cli(ckpt, "--out", ckpt.parent, "--overwrite"))
    assert "--dtype: 'float8' is not one of" in one_error_line(cli(ckpt, "--out", tmp_path / "x", "--dtype", "float8"))
    assert "--lora-only: a shapes student has no pipeline" in one_error_line(cli(ckpt, "--out", tmp_path / "x", "--lora-only"))
    # a failure mid-write: the old export stays whole, no temporary folder is left beside it
    def full_disk(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(SD3Transformer2DModel, "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space"):
        export(shapes_cfg, ckpt, out, overwrite=True)
    assert [p.name for p in out.parent.iterdir()] == ["mine"] and [p.name for p in out.iterdir()] == ["old.txt"]
    monkeypatch.undo()
    res = cli(ckpt, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["mine"]


# ---- sd3 / zimage: the base pipeline with the student's transformer --------------------------------

def _raw(name: str, pipe: Path) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / f"{name}_tiny.yaml").read_text())
    raw["backend"]["pretrained"] = str(pipe)
    for t in raw["teachers"]:
        if t.get("adapters"):
            t["adapters"] = {k: str(pipe / "loras" / v) for k, v in zip(t["adapters"], ("realism", "style"))}
    return raw


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from danceopd.backends.latent import write_tiny_loras
    from danceopd.backends.sd3 import write_tiny_sd3

    root = write_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe", seed=0)
    write_tiny_loras(root, ["realism", "style"], seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_zimage(tmp_path_factory):
    from danceopd.backends.latent import write_tiny_loras
    from danceopd.backends.zimage import write_tiny_zimage

    root = write_tiny_zimage(tmp_path_factory.mktemp("zimage") / "pipe", seed=0)
    write_tiny_loras(root, ["realism", "style"], seed=0)
    return root


def velocity(backend, model, seed: int = 5):
    """One transformer forward through the backend's own call (its time and sign convention) on
    fixed random latents and text embeddings."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2, *backend.state_shape, generator=g)
    if backend.name == "sd3":
        c = backend.transformer_config
        fields = {"prompt_embeds": torch.randn(2, 20, c["joint_attention_dim"], generator=g),
                  "pooled": torch.randn(2, c["pooled_projection_dim"], generator=g)}
    else:
        fields = {"cap": torch.randn(2, 16, backend.text_dim, generator=g), "cap_len": torch.tensor([[16.0], [11.0]]),
                  "has_source": torch.zeros(2, 1)}
    dev = next(model.parameters()).device
    with torch.no_grad():
        t = torch.tensor([700.0, 300.0], device=dev)
        return backend.forward(model.eval(), z.to(dev), t, {k: v.to(dev) for k, v in fields.items()}).cpu()


def latents(pipe, **kw):
    return pipe(prompt="a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kw).images


@pytest.fixture(scope="module", params=[("sd3", "StableDiffusion3Pipeline", 32), ("zimage", "ZImagePipeline", 64)],
                ids=["sd3", "zimage"])
def family(request):
    """(family, its pipeline class, image size, tiny pipeline), set up before the test's tier guard."""
    name, cls, size = request.param
    return name, cls, size, request.getfixturevalue(f"tiny_{name}")


@pytest.mark.slow
def test_lora_student_exports_as_merged_pipeline_and_as_lora_weights(family, tmp_path):
    import diffusers

    from danceopd.backends import make_backend

    family, cls, size, base = family
    cfg = cfg_for(_raw(family, base), tmp_path, "run")
    assert cfg.student.lora.enabled and cfg.student.lora.alpha != cfg.student.lora.rank  # alpha must reach diffusers
    ckpt, student = save_checkpoint(cfg)
    out = tmp_path / "export"
    res = cli(ckpt, "--out", out)
    assert res.exit_code == 0 and "LoRA weights in lora/" in res.output, res.output
    backend = make_backend(cfg)
    want = velocity(backend, student)
    assert (want - velocity(backend, backend.load_transformer(base))).abs().max() > 1e-2  # the student moved
    Pipeline = getattr(diffusers, cls)

    merged = Pipeline.from_pretrained(out, use_safetensors=True)
    torch.testing.assert_close(velocity(backend, merged.transformer), want, atol=1e-5, rtol=1e-5)
    index = json.loads((base / "model_index.json").read_text())
    assert json.loads((out / "model_index.json").read_text()) == index  # the base's class and components
    for name, entry in index.items():  # every other component the base has: its bytes
        if not name.startswith("_") and name != "transformer" and entry[0] is not None:
            cmp = filecmp.dircmp(base / name, out / name)
            assert (base / name).is_dir() and not (cmp.diff_files or cmp.left_only or cmp.right_only), name
    assert not (out / "loras").exists()  # only what model_index.json names

    with_lora = Pipeline.from_pretrained(base, use_safetensors=True)
    with_lora.load_lora_weights(out / "lora")
    torch.testing.assert_close(velocity(backend, with_lora.transformer), want, atol=1e-5, rtol=1e-5)
    # end to end: both generate, the same latents from the same seed; the base alone does not
    images = latents(merged, height=size, width=size, output_type="pt")
    assert images.shape == (1, 3, size, size) and torch.isfinite(images).all()
    a, b = latents(merged, height=size, width=size, output_type="latent"), latents(with_lora, height=size, width=size, output_type="latent")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with_lora.unload_lora_weights()
    assert (latents(with_lora, height=size, width=size, output_type="latent") - a).abs().max() > 1e-3
    record = json.loads((out / "danceopd_export.json").read_text())
    assert record["pipeline_class"] == index["_class_name"] and record["lora"] == "lora/"
    assert record["transformer_dtype"] == "float32" and record["checkpoint"] == str(ckpt.resolve())


@pytest.mark.slow
def test_full_sd3_student_dtypes_and_lora_only(tiny_sd3, tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    from danceopd.backends import make_backend
    from danceopd.export import base_dtype, export

    raw = _raw("sd3", tiny_sd3)
    raw["student"]["lora"]["enabled"] = False
    cfg = cfg_for(raw, tmp_path, "run")
    ckpt, student = save_checkpoint(cfg, scale=0.02)
    assert "not a LoRA" in one_error_line(cli(ckpt, "--out", tmp_path / "x", "--lora-only"))
    line = one_error_line(cli(ckpt, "--out", tmp_path / "x", "--set", f"backend.pretrained={tmp_path / 'gone'}"))
    assert "no model_index.json (backend.pretrained" in line and "--set backend.pretrained=PATH" in line
    done = export(cfg, ckpt, tmp_path / "fp32")
    assert not done.lora and done.note is None and not (tmp_path / "fp32" / "lora").exists()
    backend = make_backend(cfg)
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "fp32" / "transformer", use_safetensors=True)
    torch.testing.assert_close(velocity(backend, loaded), velocity(backend, student), atol=1e-5, rtol=1e-5)
    export(cfg, ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert base_dtype(tmp_path / "bf16" / "transformer") == "bfloat16"
    (f,) = (tmp_path / "bf16" / "transformer").glob("*.safetensors")
    got = load_file(str(f))
    for n, p in student.state_dict().items():
        assert torch.equal(got[n], p.to(torch.bfloat16)), n

    # a LoRA student started from init_lora: merged pipeline only (its LoRA is not on the base)
    raw["student"]["lora"]["enabled"] = True
    raw["student"]["init_lora"] = str(tiny_sd3 / "loras" / "style")
    cfg2 = cfg_for(raw, tmp_path, "run2")
    ckpt2, student2 = save_checkpoint(cfg2)
    assert "student.init_lora, not on the base" in one_error_line(cli(ckpt2, "--out", tmp_path / "y", "--lora-only"))
    done = export(cfg2, ckpt2, tmp_path / "init-lora")
    assert not done.lora and "no lora/" in done.summary() and not (tmp_path / "init-lora" / "lora").exists()
    loaded = SD3Transformer2DModel.from_pretrained(tmp_path / "init-lora" / "transformer", use_safetensors=True)
    torch.testing.assert_close(velocity(backend, loaded), velocity(backend, student2), atol=1e-5, rtol=1e-5)

    # --lora-only on a LoRA student on the base: the LoRA folder alone, no copy of the base
    raw["student"]["init_lora"] = None
    cfg3 = cfg_for(raw, tmp_path, "run3")
    ckpt3, _ = save_checkpoint(cfg3)
    res = cli(ckpt3, "--out", tmp_path / "lora-only", "--lora-only")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "lora-only").iterdir()) == ["danceopd_export.json", "lora"]
    shutil.rmtree(tmp_path / "lora-only")
