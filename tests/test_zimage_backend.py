"""The `zimage` backend on tiny random pipelines of the real diffusers classes: loading through
`from_pretrained`, the condition cache (built once, rebuilt on change), t2i and Omni-edit
predictions, CFG's null branch keeping the source image, the velocity convention against one
step of the diffusers pipelines' own loops, source resizing and deterministic VAE encoding."""

import csv
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from danceopd import cond_cache as cc
from danceopd.config import config_from_dict

pytestmark = pytest.mark.slow  # the tiny diffusers pipelines: seconds per test

RES, SEQ = 64, 64  # 64 px: the smallest image ZImageOmniPipeline accepts


def _bw(seed: int, w: int, h: int) -> Image.Image:
    """Black/white blocks: exact in bf16, so the Omni pipeline's bf16 image cast loses nothing."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, (h // 8, w // 8, 3), dtype=np.uint8) * 255
    return Image.fromarray(cells.repeat(8, 0).repeat(8, 1))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from danceopd.backends.zimage import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("zimage") / "omni", seed=0)


@pytest.fixture(scope="session")
def tiny_t2i(tmp_path_factory):
    from danceopd.backends.zimage import write_tiny_zimage

    return write_tiny_zimage(tmp_path_factory.mktemp("zimage") / "t2i", seed=1, edit=False)


ROWS = [  # uid, task, prompt, source, target
    ("t1", "t2i", "a red cat", "", ""),
    ("t2", "t2i", "a blue dog on green grass", "", ""),
    ("e1", "edit", "make it green", "src_a.png", "tgt_a.png"),
    ("e2", "edit", "make it green", "src_b.png", "tgt_b.png"),
    ("e3", "edit", "turn the sky purple", "src_a.png", ""),
]


def write_data(folder, rows=ROWS):
    folder.mkdir(parents=True, exist_ok=True)
    _bw(1, 64, 64).save(folder / "src_a.png")
    _bw(2, 128, 64).save(folder / "src_b.png")  # not square: resized to the bucket, then cropped
    _bw(3, 64, 64).save(folder / "tgt_a.png")
    _bw(4, 64, 64).save(folder / "tgt_b.png")
    with open(folder / "data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uid", "task", "prompt", "source_image", "target_image"])
        w.writerows(rows)
    return folder / "data.csv"


def raw_config(pipe, data, cache, edit=True):
    routes = [{"name": "t2i", "teacher": "base", "task": "t2i"}]
    if edit:
        routes.append({"name": "edit", "teacher": "base", "task": "edit", "requires_source_image": True})
    return {"job": {"name": "zt", "output_dir": str(cache.parent / "run")},
            "backend": {"name": "zimage", "pretrained": str(pipe), "resolution": RES, "max_sequence_length": SEQ,
                        "cache_dir": str(cache)},
            "teachers": [{"name": "base", "kind": "pretrained"}], "routing": {"routes": routes},
            "data": {"path": str(data)}}


def make(raw, base):
    from danceopd.backends import make_backend

    cfg = config_from_dict(raw, base_dir=base)
    return cfg, make_backend(cfg)


@pytest.fixture(scope="session")
def built(tiny, tmp_path_factory):
    """(cfg, backend, rows) with the cache built once for the session."""
    d = tmp_path_factory.mktemp("zdata")
    cfg, backend = make(raw_config(tiny, write_data(d / "data"), d / "cache"), d)
    backend.build_cache()
    return cfg, backend, {r.uid: r for r in backend._dataset_rows()}


def test_tiny_pipelines_load_through_the_real_pipeline_classes(tiny, tiny_t2i):
    from diffusers import ZImageOmniPipeline, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2Tokenizer, Qwen3Model, Siglip2VisionModel

    pipe = ZImageOmniPipeline.from_pretrained(tiny, use_safetensors=True)
    assert isinstance(pipe.transformer, ZImageTransformer2DModel) and pipe.transformer.config.siglip_feat_dim
    assert isinstance(pipe.text_encoder, Qwen3Model) and isinstance(pipe.siglip, Siglip2VisionModel)
    assert isinstance(pipe.tokenizer, Qwen2Tokenizer) and pipe.scheduler.config.shift == 3.0
    enc = pipe.vae.encode  # the pipeline encodes condition images in bf16 (a GPU habit); CPU weights are fp32
    pipe.vae.encode = lambda x, *a, **k: enc(x.float(), *a, **k)
    img = pipe(image=[_bw(0, 64, 64)], prompt="make it red", num_inference_steps=2, output_type="pt").images
    assert img.shape == (1, 3, 64, 64)
    plain = ZImagePipeline.from_pretrained(tiny_t2i, use_safetensors=True)
    assert plain.transformer.config.siglip_feat_dim is None
    assert plain("a cat", num_inference_steps=2, height=64, width=64, output_type="pt").images.shape == (1, 3, 64, 64)


def test_backend_is_registered_with_the_zimage_grid(built):
    from danceopd.backends.zimage import ZImageBackend
    from danceopd.flow import job_sigmas, zimage_sigma_schedule

    cfg, backend, _ = built
    assert isinstance(backend, ZImageBackend) and backend.sigma_grid == "zimage"
    assert backend.state_shape == (16, RES // 8, RES // 8) and backend.supports_source_image
    torch.testing.assert_close(job_sigmas(cfg, backend), zimage_sigma_schedule(cfg.method.rollout_steps, cfg.method.shift))


def test_cache_holds_the_pipelines_own_text_embeddings(built):
    from diffusers import ZImageOmniPipeline

    cfg, backend, rows = built
    pipe = ZImageOmniPipeline.from_pretrained(backend.root, transformer=None, use_safetensors=True)
    cond = backend.encode([rows["t1"], rows["e1"]])
    assert cond.shape == (2, cc.HANDLE_DIM)
    got = backend.gather(cond, "cpu")
    t2i = pipe.encode_prompt(["a red cat"], do_classifier_free_guidance=False, max_sequence_length=SEQ)[0][0][0]
    torch.testing.assert_close(got["cap"][0, : int(got["cap_len"][0])], t2i)
    assert got["cap"][0, len(t2i):].abs().max() == 0  # padding
    edit = pipe.encode_prompt(["make it green"], do_classifier_free_guidance=False, max_sequence_length=SEQ,
                              num_condition_images=1)[0][0]
    torch.testing.assert_close(got["cap"][1, : int(got["cap_len"][1])], edit[1])
    for j in (0, 2):  # the template's prompt-independent segments
        torch.testing.assert_close(got["frame"][1, j, : int(got["frame_len"][1, j])], edit[j])
    # null branch: the empty prompt's text (t2i: the pipeline's negative ""); source fields stay
    null = backend.gather(backend.null_cond(cond), "cpu")
    neg = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=SEQ)[0][0][0]
    torch.testing.assert_close(null["cap"][0, : int(null["cap_len"][0])], neg)
    neg_edit = pipe.encode_prompt([""], do_classifier_free_guidance=False, max_sequence_length=SEQ, num_condition_images=1)[0][0]
    torch.testing.assert_close(null["frame"][1, 1, : int(null["frame_len"][1, 1])], neg_edit[1])
    for f in ("src_latents", "siglip", "has_source"):
        torch.testing.assert_close(null[f], got[f])
    assert got["has_source"][:, 0].tolist() == [0.0, 1.0] and not null["text_on"].any()


def test_cache_is_built_once_reused_and_rebuilt_when_a_prompt_changes(tiny, tmp_path):
    data = write_data(tmp_path / "data")
    cfg, backend = make(raw_config(tiny, data, tmp_path / "cache"), tmp_path)
    path, built = backend.build_cache()
    assert built
    mtime = path.stat().st_mtime_ns
    assert make(raw_config(tiny, data, tmp_path / "cache"), tmp_path)[1].build_cache() == (path, False)
    assert path.stat().st_mtime_ns == mtime  # reused, not rewritten
    old = backend.gather(backend.encode([backend._dataset_rows()[0]]), "cpu")["cap"]
    rows = [list(r) for r in ROWS]
    rows[0][2] = "a red cat wearing a hat"
    write_data(tmp_path / "data", rows)
    _, b2 = make(raw_config(tiny, data, tmp_path / "cache"), tmp_path)
    new_path = b2.cache_path(b2._dataset_rows())
    assert new_path != path
    with pytest.raises(cc.StaleCacheError):  # the stale file is never read for the new rows
        cc.ConditionCache(path, b2.cache_fingerprint(b2._dataset_rows()))
    shutil.copy(path, new_path)  # even under the new name, a stale file is rebuilt, not used
    assert b2.build_cache() == (new_path, True)
    cap = b2.gather(b2.encode([b2._dataset_rows()[0]]), "cpu")["cap"]
    assert not torch.equal(cap, old)


def test_t2i_and_edit_predictions_have_the_state_shape_and_mixed_batches_split_exactly(built):
    cfg, backend, rows = built
    model = backend.build_student("base", 0)
    batch = [rows[u] for u in ("t1", "e1", "t2", "e2")]
    cond = backend.encode(batch)
    z = backend.noise([1, 2, 3, 4])
    sigma = torch.tensor([0.9, 0.5, 0.3, 0.7])
    with torch.no_grad():
        v = backend.predict(model, z, sigma, cond)
        assert v.shape == (4, *backend.state_shape) and v.dtype == torch.float32 and torch.isfinite(v).all()
        for i in range(4):  # per-row calls agree with the mixed batch (padding is masked)
            vi = backend.predict(model, z[i:i + 1], sigma[i:i + 1], cond[i:i + 1])
            torch.testing.assert_close(vi[0], v[i], atol=1e-5, rtol=1e-4)
    v = backend.predict(model, z, sigma, cond)  # the student trains through it
    v.square().mean().backward()
    assert model.cap_embedder[1].weight.grad is not None and model.siglip_embedder[1].weight.grad is not None


def test_null_branch_keeps_the_source_image(built):
    cfg, backend, rows = built
    teacher = backend.build_teacher(cfg.teachers[0], cfg.resolve("."))
    # e1 and e2: same prompt, different sources; with the text dropped they still differ
    cond = backend.null_cond(backend.encode([rows["e1"], rows["e2"]]))
    z = backend.noise([7]).expand(2, -1, -1, -1)
    sigma = torch.full((2,), 0.6)
    v = teacher.velocity(z, sigma, cond)
    assert (v[0] - v[1]).abs().max() > 1e-4
    # and the text is really dropped: e1 and e3 (same source, other prompts) agree without text
    v13 = teacher.velocity(z, sigma, backend.null_cond(backend.encode([rows["e1"], rows["e3"]])))
    torch.testing.assert_close(v13[0], v13[1])
    with_text = teacher.velocity(z, sigma, backend.encode([rows["e1"], rows["e3"]]))
    assert (with_text[0] - with_text[1]).abs().max() > 1e-4


def _pipeline_step(pipe, sigma_in, z, **call):
    """One step of the pipeline's own loop from sigma_in to 0; returns (sigma the scheduler used, latents)."""
    out = pipe(sigmas=[sigma_in], num_inference_steps=1, latents=z.clone(), output_type="latent",
               max_sequence_length=SEQ, **call).images
    return float(pipe.scheduler.sigmas[0]), out


def _ours(backend, model, row, z, sigma, alpha):
    """Our Euler step to 0 with the teacher-side CFG: v_null + alpha (v_cond - v_null)."""
    cond = backend.encode([row])
    s = torch.tensor([sigma])
    with torch.no_grad():
        v = backend.predict(model, z, s, cond)
        if alpha != 1.0:
            vn = backend.predict(model, z, s, backend.null_cond(cond))
            v = vn + alpha * (v - vn)
    return z + (0.0 - sigma) * v


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_velocity_convention_matches_one_step_of_the_omni_pipeline(built, guidance):
    """Z-Image's transformer sees t = 1 - sigma and predicts x0 - noise; the pipeline negates it
    and steps the scheduler. Our v = noise - x0 at 1000*sigma must make the same Euler step, for
    t2i and for an edit whose CFG's negative keeps the condition image (pipeline guidance g is
    our alpha = 1 + g)."""
    from diffusers import ZImageOmniPipeline

    cfg, backend, rows = built
    pipe = ZImageOmniPipeline.from_pretrained(backend.root, use_safetensors=True)
    enc = pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: enc(x.float(), *a, **k)  # fp32 CPU VAE; the image is exact in bf16
    model = backend.build_student("base", 0).eval()
    z = torch.randn(1, *backend.state_shape, generator=torch.Generator().manual_seed(3))
    sigma, want = _pipeline_step(pipe, 0.6, z, prompt="a red cat", height=RES, width=RES, guidance_scale=guidance)
    assert abs(sigma - 3 * 0.6 / (1 + 2 * 0.6)) < 1e-6  # the scheduler's shift 3
    torch.testing.assert_close(_ours(backend, model, rows["t1"], z, sigma, 1 + guidance), want, atol=2e-5, rtol=1e-4)
    src = Image.open(rows["e1"].source_image).convert("RGB")  # 64 px: the bucket is the image itself
    sigma, want = _pipeline_step(pipe, 0.6, z, image=[src], prompt="make it green", guidance_scale=guidance)
    torch.testing.assert_close(_ours(backend, model, rows["e1"], z, sigma, 1 + guidance), want, atol=2e-5, rtol=1e-4)


def test_velocity_convention_matches_one_step_of_the_t2i_pipeline(tiny_t2i, tmp_path):
    from diffusers import ZImagePipeline

    rows = [r for r in ROWS if r[1] == "t2i"]
    cfg, backend = make(raw_config(tiny_t2i, write_data(tmp_path / "data", rows), tmp_path / "cache", edit=False), tmp_path)
    backend.build_cache()
    assert not backend.supports_source_image
    pipe = ZImagePipeline.from_pretrained(tiny_t2i, use_safetensors=True)
    model = backend.build_student("base", 0).eval()
    z = torch.randn(1, *backend.state_shape, generator=torch.Generator().manual_seed(4))
    row = backend._dataset_rows()[1]
    sigma, want = _pipeline_step(pipe, 0.8, z, prompt=row.prompt, height=RES, width=RES, guidance_scale=2.0)
    torch.testing.assert_close(_ours(backend, model, row, z, sigma, 3.0), want, atol=2e-5, rtol=1e-4)
    edit_row = type(row)(uid="x", task="edit", prompt="p", source_image=tmp_path / "data" / "src_a.png")
    with pytest.raises(ValueError, match="Omni"):
        backend.check_row(edit_row)


def test_source_resize_keeps_aspect_ratio(built):
    from danceopd.backends.images import load_bucket

    cfg, backend, rows = built
    # 256x128 checkerboard of 16 px cells: the bucket scales the short side to 64 (8 px cells, still
    # square) and centre-crops; squashing to 64x64 would make the cells 4 px wide.
    board = ((np.indices((128, 256)) // 16).sum(0) % 2 * 255).astype(np.uint8)
    path = cfg.resolve("board.png")
    Image.fromarray(np.stack([board] * 3, -1)).save(path)
    img = load_bucket(path, RES)[0] > 0
    assert img.shape == (RES, RES)
    assert int((img[32, 1:] != img[32, :-1]).sum()) == int((img[1:, 32] != img[:-1, 32]).sum()) == 7
    # e2's 128x64 source went through exactly this into the cache
    got = backend.gather(backend.encode([rows["e2"]]), "cpu")["src_latents"][0]
    vae = backend.load_vae()
    with torch.no_grad():
        torch.testing.assert_close(got, backend.vae_encode(vae, load_bucket(rows["e2"].source_image, RES)[None])[0])


def test_vae_encode_is_deterministic_and_uses_the_pipeline_factors(built):
    cfg, backend, rows = built
    vae = backend.load_vae()
    from danceopd.backends.images import load_bucket

    img = load_bucket(rows["e1"].target_image, RES)[None]
    with torch.no_grad():
        a, b = backend.vae_encode(vae, img), backend.vae_encode(vae, img)
        mode = vae.encode(img).latent_dist.mode()
    assert torch.equal(a, b)
    torch.testing.assert_close(a, (mode - vae.config.shift_factor) * vae.config.scaling_factor)
    torch.testing.assert_close(backend.data_target([rows["e1"]]), a)
    with pytest.raises(ValueError, match="no target image"):
        backend.data_target([rows["e3"]])
    dec = backend.decode(a)
    assert dec.shape == (1, 3, RES, RES) and dec.abs().max() <= 1


def test_lora_student_and_shared_backbone_adapter_teacher(built, tmp_path):
    """LoRA on Z-Image's attention (to_q/k/v/out.0): a LoRA student trains adapters only, and
    random LoRA folders (what `make-tiny` writes) load as switchable adapters of one teacher."""
    from danceopd.backends.latent import write_tiny_loras
    from danceopd.config import TeacherConfig
    from danceopd.lora import trainable_state_dict

    cfg, backend, rows = built
    shutil.copytree(backend.root / "transformer", tmp_path / "transformer")  # write_tiny_loras reads it
    shutil.copy(backend.root / "model_index.json", tmp_path)
    realism, style = write_tiny_loras(tmp_path, ["realism", "style"], seed=0)
    teacher = backend.build_teacher(TeacherConfig(name="t", kind="pretrained", adapters={"realism": str(realism),
                                                                                         "style": str(style)}), tmp_path)
    cond = backend.encode([rows["t1"], rows["e1"]])
    z, s = backend.noise([5, 6]), torch.tensor([0.7, 0.4])
    teacher.use("realism")
    a = teacher.velocity(z, s, cond)
    teacher.use("style")
    assert (teacher.velocity(z, s, cond) - a).abs().max() > 1e-4
    cfg.student.lora.enabled = True
    try:
        student = backend.build_student("base", 0)
    finally:
        cfg.student.lora.enabled = False
    sd = trainable_state_dict(student)
    assert sd and all("lora_" in k for k in sd)
    backend.predict(student, z, s, cond).square().mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


@pytest.mark.ray
def test_ray_run_with_cfg_absorption_and_edit_adapters_saves_a_lora_checkpoint_and_resumes(ray_local, tiny, tmp_path):
    """configs/zimage_tiny.yaml on the tiny Omni pipeline: t2i with CFG absorbed, two edit routes as
    adapters of one backbone, a LoRA student; 2 steps, then resumed to 4 from the LoRA checkpoint
    (in local mode: one checkpoint layout for both modes; a LoRA student resumed in Ray mode is
    tests/test_sd3_backend.py's)."""
    import shutil

    import yaml

    from danceopd.backends.latent import write_tiny_loras
    from danceopd.checkpoint import latest_checkpoint, load_json, load_tensors
    from danceopd.lora import check_lora_folder
    from services.loop import train
    from tests.conftest import ROOT, cfg_for

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny, pipe)
    loras = write_tiny_loras(pipe, ["local", "global"], seed=3)
    shutil.copytree(ROOT / "configs" / "data" / "shapes", tmp_path / "data" / "shapes",
                    ignore=shutil.ignore_patterns(".danceopd-cache"))
    raw = yaml.safe_load((ROOT / "configs" / "zimage_tiny.yaml").read_text())
    raw["backend"]["pretrained"] = str(pipe)
    raw["teachers"][1]["adapters"] = {"local": str(loras[0]), "global": str(loras[1])}
    raw["eval"] = {"enabled": False}
    assert raw["routing"]["routes"][0]["cfg_scale"] == 3.0
    # one rollout worker: a pipeline load fewer, nothing asserted of the second
    over = dict(checkpoint__every=2, checkpoint__keep=3, sync__max_policy_lag=0, rollout__workers=1)
    part = cfg_for(raw, tmp_path, "run", learner__steps=2, **over)
    summary = train(part, mode="ray", show_progress=False)
    assert summary["steps"] == 2
    resumed = cfg_for(raw, tmp_path, "run", learner__steps=4, **over)
    summary = train(resumed, mode="local", resume_from=latest_checkpoint(part.output_path), show_progress=False)
    ckpt = latest_checkpoint(resumed.output_path)
    assert load_json(ckpt / "state.json")["step"] == 4 and summary["steps"] == 4
    weights = load_tensors(ckpt / "model.safetensors")
    assert weights and all("lora_" in k for k in weights)
    check_lora_folder(ckpt / "lora")
    assert set(summary["route_loss"]) <= {"t2i", "local_edit", "global_edit"} and summary["route_loss"]
