"""ShapesBench comparison: partly specified prompts and splits, the metrics module (perfect scores
perfectly, wrong does not), the real-metric adapters, and the --quick driver end to end."""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from danceopd import shapes_metrics as sm
from danceopd import shapes_world as sw

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---- data --------------------------------------------------------------------------------------

def test_partial_prompts_parse_and_have_no_single_ground_truth():
    ins = sw.parse_prompt("a red circle")
    assert ins.task == "t2i" and ins.scene is None and sw.determined(ins) == ("kind", "color")
    assert sw.determined(sw.parse_prompt("a red circle at top left")) == ("kind", "color", "position")
    assert sw.determined(sw.parse_prompt("a red circle on a blue background")) == ("kind", "color", "background")
    full = sw.parse_prompt("a red circle at top left on a blue background")
    assert full.scene == sw.Scene("blue", "red", "circle", 0, 0)
    with pytest.raises(ValueError, match="leaves position and background free"):
        sw.ground_truth("a red circle")
    for bad in ("a red blob", "a red circle on a red background", "a red circle at top"):
        with pytest.raises(ValueError, match="prompt"):
            sw.parse_prompt(bad)
    # every partial prompt the generator writes tokenizes and parses
    rng = np.random.default_rng(0)
    for _ in range(100):
        p, _, tgt = sw.make_example("t2i", rng, 16, partial_t2i=1.0)
        assert sw.parse_prompt(p).scene is None
        assert sw.attribute_accuracy([sw.render(tgt, 16)], [p])["all"] == 1.0


def test_attribute_accuracy_counts_only_determined_attributes():
    img = sw.render(sw.Scene("blue", "red", "circle", 2, 2), 16)
    assert sw.attribute_accuracy([img], ["a red circle"])["all"] == 1.0
    assert sw.attribute_accuracy([img], ["a red circle at top left"])["all"] == 0.0
    assert sw.attribute_accuracy([img], ["a red circle on a green background"])["all"] == 0.0
    assert sw.attribute_accuracy([img], ["a green circle"])["all"] == 0.0


def test_make_data_splits_are_deterministic_with_exact_ground_truth(tmp_path):
    a = sw.write_shapes_dataset(tmp_path / "a", 40, seed=3, partial_t2i=0.5, heldout=12)
    b = sw.write_shapes_dataset(tmp_path / "b", 40, seed=3, partial_t2i=0.5, heldout=12)
    assert a.read_text() == b.read_text()
    assert (tmp_path / "a" / "heldout.csv").read_text() == (tmp_path / "b" / "heldout.csv").read_text()
    c = sw.write_shapes_dataset(tmp_path / "c", 40, seed=4, partial_t2i=0.5, heldout=12)
    assert c.read_text() != a.read_text()
    train, held = _rows(a), _rows(tmp_path / "a" / "heldout.csv")
    assert len(train) == 120 and len(held) == 36
    t2i = [r for r in train if r["task"] == "t2i"]
    assert any(sw.parse_prompt(r["prompt"]).scene is None for r in t2i)
    assert any(sw.parse_prompt(r["prompt"]).scene is not None for r in t2i)
    seen = {(r["prompt"], json.dumps(json.loads(r["caption_dict"])["source"])) for r in train}
    for r in held:
        cap = json.loads(r["caption_dict"])
        free = r["task"] == "t2i" and sw.parse_prompt(r["prompt"]).scene is None
        if not free:
            assert (r["prompt"], json.dumps(cap["source"])) not in seen
        tgt = sw.load_png(tmp_path / "a" / r["target_image"], 16)
        scene = sw.scene_from_image(tgt)
        assert scene.to_dict() == cap["target"]  # exact ground truth of every attribute
        if r["task"] == "t2i":
            assert sw.attribute_accuracy([tgt], [r["prompt"]])["all"] == 1.0
            assert set(cap["determined"]) >= {"kind", "color"}
        else:
            src = sw.load_png(tmp_path / "a" / r["source_image"], 16)
            np.testing.assert_array_equal(sw.ground_truth(r["prompt"], src, 16), tgt)


def test_make_data_cli_writes_the_heldout_split_and_refuses_bad_input(tmp_path):
    from typer.testing import CliRunner

    from services.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["make-data", "shapes", "--out", str(tmp_path / "d"), "--n-per-task", "6",
                              "--partial-t2i", "0.5", "--heldout", "3"])
    assert res.exit_code == 0, res.output
    assert len(_rows(tmp_path / "d" / "heldout.csv")) == 9
    res = runner.invoke(app, ["make-data", "shapes", "--out", str(tmp_path / "e"), "--partial-t2i", "2"])
    assert res.exit_code == 2 and "partial_t2i" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["make-data", "shapes", "--out", str(tmp_path / "f"), "--t2i-free", "colour"])
    assert res.exit_code == 2 and "t2i free attributes" in res.output and not (tmp_path / "f").exists()


def test_t2i_free_attributes_choose_what_partial_prompts_leave_free():
    def frees(t2i_free):
        rng = np.random.default_rng(0)
        out = set()
        for _ in range(200):
            p, _, _ = sw.make_example("t2i", rng, 16, partial_t2i=1.0, t2i_free=t2i_free)
            out.add(frozenset({"position", "background"} - set(sw.determined(sw.parse_prompt(p)))))
        return out

    assert frees(("background",)) == {frozenset({"background"})}
    assert frees(("position",)) == {frozenset({"position"})}
    assert frees(("position", "background")) == {frozenset({"background"}), frozenset({"position"}),
                                                 frozenset({"position", "background"})}
    # the default draws exactly what it drew before the option existed (committed data stays valid)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    assert [sw.make_example("t2i", rng_a, 16, 0.5)[0] for _ in range(50)] == \
        [sw.make_example("t2i", rng_b, 16, 0.5, ("background", "position"))[0] for _ in range(50)]
    with pytest.raises(ValueError, match="t2i free attributes"):
        sw.partial_forms(("size",))


# ---- metrics -----------------------------------------------------------------------------------

def _t2i_set(n=40, seed=0):
    rng = np.random.default_rng(seed)
    ex = [sw.make_example("t2i", rng, 16, partial_t2i=0.5) for _ in range(n)]
    return [p for p, _, _ in ex], np.stack([sw.render(t, 16) for _, _, t in ex])


def test_t2i_metrics_perfect_and_wrong():
    prompts, ref = _t2i_set()
    perfect = sm.score_t2i(ref, prompts, ref)
    assert perfect["acc"] == 1.0 and abs(perfect["fd"]) < 1e-3
    grey = np.zeros_like(ref) + np.random.default_rng(1).normal(0, 0.05, ref.shape).astype(np.float32)
    wrong = sm.score_t2i(grey, prompts, ref)
    assert wrong["acc"] < 0.2 and wrong["fd"] > 100 * max(perfect["fd"], 1e-3)
    # one image repeated (no diversity) has every kind-colour right for its prompt only
    mode = np.repeat(ref[:1], len(ref), 0)
    assert sm.score_t2i(mode, prompts, ref)["fd"] > 10


def test_edit_metrics_perfect_and_wrong():
    rng = np.random.default_rng(2)
    for task, score in (("local_edit", sm.score_local), ("global_edit", sm.score_global)):
        ex = [sw.make_example(task, rng, 16) for _ in range(24)]
        prompts = [p for p, _, _ in ex]
        src = [sw.render(s, 16) for _, s, _ in ex]
        tgt = np.stack([sw.render(t, 16) for _, _, t in ex])
        perfect, unchanged = score(tgt, src, prompts), score(np.stack(src), src, prompts)
        assert perfect["success"] == 1.0 and unchanged["success"] == 0.0
        if task == "local_edit":
            assert perfect["preservation"] == 1.0
            noisy = np.where(np.random.default_rng(0).random(tgt.shape[-2:]) < 0.5, -tgt, tgt)
            assert score(noisy, src, prompts)["preservation"] < 0.7
        else:
            assert perfect["distance"] < 1e-6 and unchanged["distance"] > 0.05


def test_feature_space_is_fixed_and_saved():
    path = ROOT / "bench" / "results" / "shapes_features" / "features-16.safetensors"
    assert path.is_file(), "the fixed feature network is committed with the results"
    a = sm.feature_net(16)
    x = torch.from_numpy(np.stack([sw.render(sw.sample_scene(np.random.default_rng(i)), 16) for i in range(8)]))
    f1, f2 = sm.features(x, a), sm.features(x, a)
    torch.testing.assert_close(f1, f2)
    assert f1.shape == (8, sm.FEATURE_DIM)


# ---- real-metric adapters ----------------------------------------------------------------------

class _RandomBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def taps(self, x):
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h))]

    def forward(self, x):
        return self.taps(x)[-1].mean((2, 3))


def test_real_metric_adapters_with_random_backbones():
    _, x = _t2i_set(32, 0)
    _, y = _t2i_set(32, 5)
    net = _RandomBackbone().eval()
    assert abs(sm.inception_fid(x, x, backbone=net, resize=0)) < 1e-6
    assert sm.inception_fid(x, y, backbone=net, resize=0) > 0
    d_same, d_diff = sm.lpips_distance(x, x, backbone=net), sm.lpips_distance(x, y, backbone=net)
    assert float(d_same.abs().max()) < 1e-6 and float(d_diff.min()) >= 0 and float(d_diff.mean()) > 0


def test_real_metric_adapters_fail_clearly_without_weights(tmp_path, monkeypatch):
    for env in ("DANCEOPD_INCEPTION_WEIGHTS", "DANCEOPD_CLIP_MODEL", "DANCEOPD_LPIPS_WEIGHTS"):
        monkeypatch.delenv(env, raising=False)
    _, x = _t2i_set(4)
    missing = tmp_path / "nope"
    for call, what in ((lambda: sm.inception_fid(x, x, weights=missing), "FID"),
                       (lambda: sm.inception_fid(x, x), "FID"),
                       (lambda: sm.clip_score(x, ["a red circle"] * 4, missing), "CLIP"),
                       (lambda: sm.lpips_distance(x, x, weights=missing), "LPIPS")):
        with pytest.raises(sm.RealMetricError, match=what) as e:
            call()
        assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(sm.RealMetricError, match="vgg.pth"):
        sm.lpips_distance(x, x, weights=tmp_path / "empty")


def _tiny_clip(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = sorted(set("".join(sw.VOCAB[2:])))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                         tokenizer=tok)
    proc.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(folder)


def test_clip_score_adapter_loads_a_local_folder(tmp_path):
    try:
        _tiny_clip(tmp_path / "clip")
    except Exception as e:  # noqa: BLE001 — a transformers version without these classes
        pytest.skip(f"cannot build a tiny CLIP here: {e}")
    prompts, x = _t2i_set(4)
    a = sm.clip_score(x, prompts, tmp_path / "clip")
    b = sm.clip_score(x, prompts, tmp_path / "clip")
    assert a == b and 0.0 <= a <= 100.0


# ---- the driver --------------------------------------------------------------------------------

@pytest.mark.subprocess
@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    out = tmp_path / "results"
    # the smallest plan: a one-layer model of two 8-wide heads, 4 sampler steps, batches of 4
    args = ["--quick", "--work", str(tmp_path / "work"), "--out", str(out),
            "--set", "n_train=24", "--set", "n_heldout=4", "--set", "teacher_steps=3", "--set", "updates=2",
            "--set", "ablations=softmix", "--set", "grid_rows=2", "--set", "num_layers=1", "--set", "num_heads=2",
            "--set", "head_dim=8", "--set", "rollout_steps=4", "--set", "batch=4"]
    shapesbench.main(args)
    md = (out / "shapesbench-quick.md").read_text()
    res = json.loads((out / "shapesbench-quick.json").read_text())
    for text in ("single-task teachers", "naive multi-task", "off-policy", "DiffusionOPD", "FlowOPD", "DanceOPD",
                 "equal updates", "equal wall clock", "claims held", "soft mixture"):
        assert text in md, text
    assert {r["method"] for r in res["runs"]} == {"sft", "offpolicy", "diffusionopd", "flowopd", "danceopd"}
    assert {r["setting"] for r in res["runs"]} == {"t2i_edit", "local_global"}
    # every row at both budgets but the soft-mixture ablation, judged at equal updates only
    assert {r["ablation"] for r in res["runs"] if set(r["scores"]) != {"equal_updates", "equal_wall_clock"}} == {"softmix"}
    assert all(set(r["scores"]) == set(r["updates"]) == set(shapesbench.row_budgets(r["method"], r["ablation"]))
               for r in res["runs"])
    assert "Scored at equal updates only, the budget their claims are judged at: ablation: soft mixture" in md
    assert set(res["teachers"]) == set(sw.TASKS)
    assert all((tmp_path / "work" / "teachers" / t / "config.json").is_file() for t in sw.TASKS)
    figs = list((out / "shapesbench-quick").glob("*.png"))
    names = {p.name for p in figs}
    assert {"curves-t2i_edit.png", "bars-t2i_edit.png", "samples-t2i_edit-t2i.png", "samples-local_global-global_edit.png"} <= names
    assert res["machine"]["jobs"] == min(2, os.cpu_count() or 1)
    assert not any(t["reused"] for t in res["teachers"].values())
    # reference rows: copy and erased score 0 on local success ∧ preservation; each init at step 0 is
    # its teacher, so on its own task it scores what the teacher's record does
    refs = res["references"]
    # quick: no other-init ablation, and both settings start from the local-edit teacher (a_init)
    assert list(refs) == ["copy", "erased", "init:local_edit"]
    assert all(refs[k]["scores"]["local_edit"]["success_preserved"] == 0.0 for k in ("copy", "erased"))
    init = refs["init:local_edit"]
    assert init["scores"]["local_edit"] == res["teachers"]["local_edit"]["scores"]
    assert init["outcomes"]["local_edit"] == res["teachers"]["local_edit"]["outcomes"]
    assert set(init["scores"]) == set(sw.TASKS)  # scored on every task of the settings it starts
    assert "from step 0 (init: the local_edit teacher)" in md
    assert res["fd_floor"]["n"] == 4 and res["fd_floor"]["mean"] > 0
    assert "reference: identity copy" in md and "(floor " in md
    # a second run (in process this time) reuses the trained teachers: same plan, same code
    weights = tmp_path / "work" / "teachers" / "t2i" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    stale = tmp_path / "work" / "teachers" / "local_edit.json"  # scores from before a metric change
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "scores": {"success": -1.0}}))
    shapesbench.main(args + ["--jobs", "1", "--set", "settings=local_global"])
    res2 = json.loads((out / "shapesbench-quick.json").read_text())
    assert all(t["reused"] for t in res2["teachers"].values())
    assert weights.stat().st_mtime_ns == before
    # scored again with today's metrics, so a stale cached score never reaches the report
    assert {t: v["scores"] for t, v in res2["teachers"].items()} == {t: v["scores"] for t, v in res["teachers"].items()}
    assert {r["setting"] for r in res2["runs"]} == {"local_global"}
    # and its finished student jobs: an interrupted run resumes where it stopped, with the same records
    assert not any(r.get("reused") for r in res["runs"]) and all(r["reused"] for r in res2["runs"])
    first = {(r["method"], r["ablation"], r["seed"]): r for r in res["runs"] if r["setting"] == "local_global"}
    assert {(r["method"], r["ablation"], r["seed"]): {**r, "reused": None} for r in res2["runs"]} == {
        k: {**r, "reused": None} for k, r in first.items()}
    assert "student jobs were reused from an interrupted run" in (out / "shapesbench-quick.md").read_text()
    # the calibration probe reads that work folder's T2I teacher; its two counts of right agree
    import shapesbench_probe

    shapesbench_probe.main(["--quick", "--work", str(tmp_path / "work"), "--json", str(tmp_path / "probe.json")]
                           + [a for a in args[args.index("--set"):] if a != "--quick"])
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert len(probe) == len(shapesbench_probe.SAMPLERS)
    for label, r in probe.items():
        groups = r["groups"].values()
        assert sum(g["n"] for g in groups) == 4, label
        assert all(0 <= g["empty"] <= g["n"] and 0 <= g["right"] <= g["n"] - g["empty"] for g in groups), label
        assert r["acc"] == round(sum(g["right"] for g in groups) / 4, 3), label


def test_teacher_cache_key_follows_the_plan_and_the_code():
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    plan = shapesbench.PRESETS["quick"]
    key = shapesbench.teacher_key(plan, "t2i")
    assert key == shapesbench.teacher_key(plan, "t2i")
    assert key != shapesbench.teacher_key(plan, "local_edit")
    for change in ({"teacher_steps": 7}, {"teacher_dropout": 0.3}, {"shift": 3.0}, {"n_train": 9}, {"head_dim": 8}):
        assert key != shapesbench.teacher_key(replace(plan, **change), "t2i"), change
    assert key == shapesbench.teacher_key(replace(plan, updates=7, seeds=(5,)), "t2i")  # student-only fields
    # a task's own budget moves its key only; the other teachers stay cached
    for task, field in (("t2i", "t2i_teacher_steps"), ("local_edit", "local_teacher_steps")):
        longer = replace(plan, **{field: plan.teacher_steps * 2})
        for t in shapesbench.sw.TASKS:
            steps = shapesbench.teacher_cfg(longer, Path("/w"), t)["learner"]["steps"]
            assert steps == (plan.teacher_steps * 2 if t == task else plan.teacher_steps), (field, t)
            moved = shapesbench.teacher_key(plan, t) != shapesbench.teacher_key(longer, t)
            assert moved == (t == task), (field, t)
    assert "danceopd/backends/shapes.py" in shapesbench.TEACHER_CODE


def test_student_cache_key_follows_the_config_the_budget_and_the_code(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    plan = shapesbench.PRESETS["quick"]
    raw = shapesbench.student_cfg(plan, Path("/w"), "local_global", "danceopd", None, 0, Path("/w/out"))
    key = shapesbench.student_key(raw, 12.5)
    assert key == shapesbench.student_key(json.loads(json.dumps(raw)), 12.5)
    assert key != shapesbench.student_key(raw, 12.6)  # DanceOPD's budget of that setting and seed
    other = shapesbench.student_cfg(plan, Path("/w"), "local_global", "danceopd", None, 1, Path("/w/out"))
    assert key != shapesbench.student_key(other, 12.5)
    monkeypatch.setattr(shapesbench, "code_key", lambda: "edited")
    assert key != shapesbench.student_key(raw, 12.5)  # any edit of the training or scoring code


def test_bench_refuses_a_bad_override():
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    with pytest.raises(SystemExit, match="KEY=VALUE"):
        shapesbench.main(["--quick", "--set", "nonsense=1"])
    with pytest.raises(SystemExit, match="not a int"):
        shapesbench.main(["--quick", "--set", "updates=many"])


@pytest.mark.subprocess
def test_bench_workers_die_with_the_benchmark(tmp_path):
    """A SIGTERM to the benchmark stops its pool's workers too (they would otherwise train on)."""
    import signal
    import subprocess

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "import shapesbench\n"
        "if __name__ == '__main__':\n"
        "    jobs = shapesbench.Jobs(2, 1)\n"
        "    pids = [jobs.submit(os.getpid).result() for _ in range(4)]\n"
        "    jobs.submit(time.sleep, 600)\n"
        "    print(' '.join(map(str, sorted(set(pids)))), flush=True)\n"
        "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    workers: list[int] = []
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert workers and proc.pid not in workers
        procs = [psutil.Process(p) for p in workers]  # before the signal: a gone pid cannot be looked up
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        _, alive = psutil.wait_procs(procs, timeout=20)
        assert not alive, f"workers {[p.pid for p in alive]} outlived the benchmark"
    finally:
        proc.kill()
        for pid in workers:  # exactly what this test started, should the check have failed
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- rows, per-prompt outcomes, verdicts ---------------------------------------------------------

def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    return shapesbench


def test_plan_rows_follow_the_reference_and_label_ours(capsys):
    """Off-policy's main row queries DanceOPD's low_t K = 1 states (uniform: a variant row);
    FlowOPD's main row is the reference estimator, our KL gradient a labelled variant; both
    variants run on the variant seeds (paired with DanceOPD); their configs are checked on the full
    plan and on the quick plan's settings with them added back (the quick plan runs none)."""
    from danceopd.config import config_from_dict

    sb = _bench()
    full, quick = sb.PRESETS["full"], sb.PRESETS["quick"]
    assert quick.variants == ()
    for plan in (full, replace(quick, variants=full.variants, row_caps=())):
        jobs = sb.plan_jobs(plan)
        for setting in plan.extra_settings:
            for seed in [s for s in sb.main_seeds(plan, setting) if s in plan.variant_seeds]:
                rows = {(m, ab): sb.student_cfg(plan, Path("/w"), setting, m, ab, seed, Path("/w/o"))
                        for s, m, ab, sd in jobs if s == setting}  # some rows run on fewer seeds (row_caps)
                method = {k: raw["method"] for k, raw in rows.items()}
                assert {k: v for k, v in method[("offpolicy", None)].items() if k in ("name", "k", "query_bias")} == \
                    {"name": "offpolicy", "k": 1, "query_bias": "low_t"}
                assert method[("offpolicy", "uniform")]["query_bias"] == "uniform"
                assert method[("sft", None)]["query_bias"] == "uniform"
                assert method[("flowopd", None)]["flowopd_estimator"] == "per_step_detached"
                assert method[("flowopd", "kl_gradient")]["flowopd_estimator"] == "kl_gradient"
                for key in (("flowopd", None), ("flowopd", "kl_gradient")):  # no baseline, all transitions
                    assert method[key]["flowopd_groups"] == 1 and method[key]["flowopd_all_states"] is True
                for raw in rows.values():
                    config_from_dict(raw)  # every job's config is valid
        assert plan.variants == ("offpolicy+uniform", "flowopd+kl_gradient")
        order = sb.rows_of(plan)
        assert order[:7] == ["sft", "offpolicy", "offpolicy+uniform", "diffusionopd", "flowopd", "flowopd+kl_gradient",
                             "danceopd"]
    assert sb.row_label("flowopd") == "FlowOPD (reference estimator)"
    assert sb.row_label("flowopd+kl_gradient") == "FlowOPD (KL gradient, ours)"
    assert "low_t" in sb.row_label("offpolicy") and "variant" in sb.row_label("offpolicy+uniform")
    assert sb.main(["--quick", "--list"]) == 0
    out = capsys.readouterr().out
    assert "FlowOPD (reference estimator)" in out and "flowopd_estimator per_step_detached" in out
    with pytest.raises(SystemExit, match="unknown variant 'flowopd\\+kl_gradient_old_scale'"):
        sb.main(["--quick", "--list", "--set", "variants=flowopd+kl_gradient_old_scale"])


def test_opd_baselines_put_every_route_in_every_update_and_one_route_is_an_ablation(capsys):
    """DiffusionOPD and FlowOPD (main and variant rows) run the reference's G = M recipe: one
    accumulation group per route, one micro-batch each; one route per update is their labelled
    ablation row, left out of the best-OPD-baseline claim."""
    from danceopd.config import config_from_dict

    sb = _bench()
    plan = sb.PRESETS["full"]
    for setting, s in sb.SETTINGS.items():
        for method, ab in (("diffusionopd", None), ("flowopd", None), ("flowopd", "kl_gradient")):
            raw = sb.student_cfg(plan, Path("/w"), setting, method, ab, 0, Path("/w/o"))
            assert raw["routing"]["accumulation_groups"] == [[t] for t in s["tasks"]]
            assert config_from_dict(raw).learner.grad_accum == len(s["tasks"])
        for method, ab in (("diffusionopd", "one_route"), ("flowopd", "one_route"), ("danceopd", None), ("sft", None)):
            raw = sb.student_cfg(plan, Path("/w"), setting, method, ab, 0, Path("/w/o"))
            assert "accumulation_groups" not in raw["routing"] and config_from_dict(raw).learner.grad_accum == 1
    assert ("local_global", "diffusionopd", "one_route", 0) in sb.plan_jobs(plan)
    assert sb.rows_of(plan)[-1:] == ["diffusionopd+one_route"]  # FlowOPD's: the time budget's cut, runnable
    assert sb.rows_of(replace(plan, ablations=(*plan.ablations, "flowopd+one_route")))[-1] == "flowopd+one_route"
    assert sb.row_label("diffusionopd+one_route") == "ablation: DiffusionOPD, one route per update"
    assert sb.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "every route per update (3 groups, grad_accum 3)" in out and "DiffusionOPD, one route per update" in out
    edit = {"diffusionopd": 0.50, "diffusionopd+one_route": 0.70, "danceopd": 0.80}
    runs = [_run("local_global", *row.partition("+")[::2], seed, e, e) for row, e in edit.items() for seed in (0, 1, 2)]
    for r in runs:
        r["ablation"] = r["ablation"] or None
    specs = sb.claim_specs({"runs": runs, "teachers": {}}, "local_global", "equal_updates")
    assert [row for _, row, _ in specs] == ["diffusionopd"]  # the ablation is better here, but not the baseline


def test_per_prompt_outcomes_average_to_the_scores():
    prompts, ref = _t2i_set(24)
    x = ref.copy()
    x[::3] = -1.0  # every third image blank
    per = sm.per_prompt("t2i", x, [None] * len(x), prompts)
    assert per == [0 if i % 3 == 0 else 1 for i in range(len(x))]
    assert np.mean(per) == pytest.approx(sm.score_t2i(x, prompts, ref)["acc"])
    rng = np.random.default_rng(4)
    for task, score in (("local_edit", sm.score_local), ("global_edit", sm.score_global)):
        ex = [sw.make_example(task, rng, 16) for _ in range(12)]
        src = [sw.render(s, 16) for _, s, _ in ex]
        out = np.stack([sw.render(t, 16) if i % 2 else src[i] for i, (_, _, t) in enumerate(ex)])
        per = sm.per_prompt(task, out, src, [p for p, _, _ in ex])
        assert per == [i % 2 for i in range(12)]
        rate = "success_preserved" if task == "local_edit" else "success"  # what the claims count
        assert np.mean(per) == pytest.approx(score(out, src, [p for p, _, _ in ex])[rate])


def _run(setting, method, ablation, seed, local, glob):
    s = {"local_edit": {"success": local, "preservation": 1.0}, "global_edit": {"success": glob, "distance": 0.1, "rmse": 0.1}}
    return {"setting": setting, "method": method, "ablation": ablation, "seed": seed, "s_per_update": 0.1,
            "updates": {"equal_updates": 10, "equal_wall_clock": 10}, "scores": {"equal_updates": s, "equal_wall_clock": s}}


def test_claims_are_judged_on_paired_seeds_with_holm_over_the_setting():
    sb = _bench()
    plan = replace(sb.PRESETS["full"], settings=("local_global",))
    edit = {"sft": 0.40, "offpolicy": 0.45, "offpolicy+uniform": 0.50, "diffusionopd": 0.52, "flowopd": 0.30,
            "flowopd+kl_gradient": 0.55, "danceopd": 0.80}
    runs = []
    for row, e in edit.items():
        method, _, ab = row.partition("+")
        for seed, wobble in zip((0, 1, 2), (0.0, 0.01, -0.01)):  # DanceOPD beats each row on every seed
            runs.append(_run("local_global", method, ab or None, seed, e + wobble, e + wobble))
    res = {"plan": {}, "teachers": {}, "runs": runs}
    out = sb.claims(plan, res)
    # the best OPD baseline is the best of the reference's (DiffusionOPD 0.52), not our FlowOPD variant (0.55)
    assert [(c["budget"], c["versus"]) for c in out] == [
        ("equal_updates", "sft"), ("equal_updates", "offpolicy"), ("equal_updates", "diffusionopd"),
        ("equal_wall_clock", "sft"), ("equal_wall_clock", "offpolicy"), ("equal_wall_clock", "diffusionopd")]
    assert all(c["family"] == 6 and c["outcome"] == "held" for c in out)
    assert out[0]["diffs"] == pytest.approx([0.4, 0.4, 0.4]) and out[0]["seeds"] == [0, 1, 2]
    # one seed of DanceOPD worse than naive: that claim no longer holds under Holm across the six
    runs[-1]["scores"]["equal_updates"] = _run("local_global", "danceopd", None, 2, 0.2, 0.2)["scores"]["equal_updates"]
    out = sb.claims(plan, {**res, "runs": runs})
    assert out[0]["outcome"] == "inconclusive" and out[3]["outcome"] == "held"
    # the table's ± is the sample std over seeds (ddof = 1)
    agg = sb.aggregate(runs, "equal_wall_clock")
    assert agg[("local_global", "sft")]["local_edit.success"][1] == pytest.approx(0.01)


def test_seed_plan_gives_setting_b_eight_seeds_and_judges_every_ablation_on_three():
    sb = _bench()
    plan = sb.PRESETS["full"]
    jobs = sb.plan_jobs(plan)

    def seeds(setting, method, ab=None):
        return sorted(sd for s, m, a, sd in jobs if (s, m, a) == (setting, method, ab))

    assert seeds("local_global", "danceopd") == seeds("local_global", "diffusionopd") == list(range(8))
    assert seeds("t2i_edit", "danceopd") == [0, 1, 2]  # seed_caps: the 3-route setting's cost
    assert seeds("local_global", "danceopd", "softmix") == seeds("local_global", "danceopd", "k4") == [0, 1, 2]
    # every ablation and variant seed has DanceOPD's run of the same seed (its wall-clock budget, its pair)
    assert all(sd in seeds(s, "danceopd") for s, m, a, sd in jobs)
    with pytest.raises(SystemExit, match="seed_caps: 'local_global' is not SETTING:N"):
        sb.main(["--list", "--set", "seed_caps=local_global"])
    # rows no claim judges: their first n seeds (row_caps)
    assert seeds("local_global", "diffusionopd", "one_route") == seeds("local_global", "flowopd", "kl_gradient") == [0]
    assert seeds("local_global", "offpolicy", "uniform") == [0]
    # setting (a) runs its main rows only (extra_settings: the time budget), FlowOPD's reference
    # estimator not at all there (a row cap of 0 in one setting); with them added back, its
    # variants and ablations run on their seeds too
    assert {(m, a) for s, m, a, _ in jobs if s == "t2i_edit"} == {(m, None) for m in sb.MAIN if m != "flowopd"}
    assert seeds("local_global", "flowopd") == list(range(8))
    uncut = replace(plan, row_caps=tuple(c for c in plan.row_caps if "/" not in c))
    assert {(m, a) for s, m, a, _ in sb.plan_jobs(uncut) if s == "t2i_edit"} == {(m, None) for m in sb.MAIN}
    both = sb.plan_jobs(replace(plan, extra_settings=plan.settings))
    assert sorted(sd for s, m, a, sd in both if (s, m, a) == ("t2i_edit", "danceopd", "softmix")) == [0, 1, 2]
    assert sorted(sd for s, m, a, sd in both if (s, m, a) == ("t2i_edit", "flowopd", "kl_gradient")) == [0]
    assert all(sb.row_label(f"{m}+{a}" if a else m) for _, m, a, _ in jobs)
    for bad in ("nope:1", "nowhere/sft:1", "t2i_edit/danceopd:0", "sft:-1"):
        with pytest.raises(SystemExit, match=f"row_caps: '{bad}' is not \\[SETTING/\\]ROW:N"):
            sb.main(["--list", "--set", f"row_caps={bad}"])


def test_ablation_claims_are_a_family_of_their_own_on_the_capability_rate():
    """DanceOPD against each ablation row, paired by seed: `beats` claims at equal updates, the K
    claims `not worse` at equal wall clock, Holm within the ablations only."""
    sb = _bench()
    plan = replace(sb.PRESETS["full"], settings=("local_global",))
    runs = [_run("local_global", "danceopd", None, sd, 0.6, 0.6) for sd in (0, 1, 2)]
    runs += [_run("local_global", "danceopd", "softmix", sd, 0.3 + w, 0.3) for sd, w in zip((0, 1, 2), (0, .01, .02))]
    k4 = [_run("local_global", "danceopd", "k4", sd, 0.62 + w, 0.62) for sd, w in zip((0, 1, 2), (0, .01, .02))]
    for r in k4:  # K = 4 is better per update but pays for it: at equal wall clock it is worse
        r["scores"]["equal_wall_clock"] = _run("local_global", "danceopd", "k4", 0, 0.5 + r["seed"] / 100, 0.5)["scores"]["equal_wall_clock"]
    out = sb.claims(plan, {"plan": {}, "teachers": {}, "runs": runs + k4})
    abl = [c for c in out if c["kind"] == "ablation"]
    assert [(c["versus"], c["budget"]) for c in abl] == [("danceopd+softmix", "equal_updates"),
                                                          ("danceopd+k4", "equal_wall_clock")]
    assert all(c["family"] == 2 and c["outcome"] == "held" for c in abl)
    assert abl[0]["diffs"] == pytest.approx([0.3, 0.295, 0.29])  # mean of local and global success
    assert abl[1]["margin"] == sb.NOT_WORSE < 0
    assert not [c for c in out if c["kind"] == "main"]  # no main row compared: no main family


def test_an_ablation_row_is_scored_only_at_the_budget_its_claims_are_judged_at():
    """The time budget's cut: an equal-updates claim's row is not continued to DanceOPD's time nor
    scored there; the claims, the aggregate and the tables take what each row has (here also a K
    row scored at equal wall clock only), and the table names the rows scored at one budget only."""
    sb = _bench()
    assert sb.row_budgets("danceopd", "softmix") == sb.row_budgets("danceopd", "paper_mid_t") == ("equal_updates",)
    assert sb.row_budgets("danceopd", "paper_low_t") == ("equal_updates",)  # DanceOPD's side of the paper-σ claims
    assert sb.row_budgets("danceopd", "k4") == sb.row_budgets("danceopd", "kall") == sb.BUDGETS  # judged at wall clock
    assert sb.row_budgets("danceopd", None) == sb.row_budgets("diffusionopd", "one_route") == sb.BUDGETS
    assert sb.row_budgets("danceopd", "uniform") == sb.BUDGETS  # no claim judges it: both, for the record
    plan = replace(sb.PRESETS["full"], settings=("local_global",))
    runs = [_run("local_global", "danceopd", None, sd, 0.6, 0.6) for sd in (0, 1, 2)]
    for ab, budget in (("softmix", "equal_updates"), ("k4", "equal_wall_clock")):
        for sd in (0, 1, 2):
            r = _run("local_global", "danceopd", ab, sd, 0.3 + sd / 100, 0.3)
            r["scores"], r["updates"] = {budget: r["scores"][budget]}, {budget: 10}
            runs.append(r)
    res = {"plan": {}, "teachers": {t: {"scores": {}} for t in ("local_edit", "global_edit")}, "runs": runs}
    abl = [c for c in sb.claims(plan, res) if c["kind"] == "ablation"]
    assert [(c["versus"], c["budget"], c["seeds"]) for c in abl] == [("danceopd+softmix", "equal_updates", [0, 1, 2]),
                                                                     ("danceopd+k4", "equal_wall_clock", [0, 1, 2])]
    assert ("local_global", "danceopd+softmix") not in sb.aggregate(runs, "equal_wall_clock")
    assert sb.aggregate(runs, "equal_updates")[("local_global", "danceopd+softmix")]["local_edit.success"][2] == 3
    at_wall = sb.table(plan, res, "local_global", "equal_wall_clock")
    assert "| ablation: soft mixture of teachers |" not in at_wall and "| ablation: K = 4 |" in at_wall
    assert at_wall.endswith("Scored at equal updates only, the budget their claims are judged at: "
                            "ablation: soft mixture of teachers.")
    assert "Scored at equal wall clock only" in sb.table(plan, res, "local_global", "equal_updates")


def test_readme_states_every_claims_verdict_of_the_committed_run(tmp_path):
    """The README's results block is the committed full run's claims (each verdict and interval),
    and a full run rewrites only that block."""
    sb = _bench()
    res = json.loads((ROOT / "bench" / "results" / "shapesbench.json").read_text())
    block = sb.readme_verdicts(res)
    assert block in (ROOT / "README.md").read_text()
    assert block.count("\n| (") == len(res["claims"]) > 0
    for c in res["claims"]:
        assert f"| {c['claim']} | **{c['outcome']}** |" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{sb.README_BEGIN}\nold table\n{sb.README_END}\nafter\n")
    sb.write_readme_verdicts(res, readme)
    assert readme.read_text() == f"before\n{block}\nafter\n"


def test_setting_a_starts_from_the_local_edit_teacher_and_reports_what_moved_from_step_0():
    """Point 6: setting (a)'s students start from an init that can already edit (the T2I teacher
    is the other-init ablation); the calibration says whether every capability moved from its
    step-0 value by MOVED for at least one main row. Results from before stay labelled by their init."""
    sb = _bench()
    plan = sb.PRESETS["full"]
    init = {(m, ab): Path(sb.student_cfg(plan, Path("/w"), "t2i_edit", m, ab, 0, Path("/w/o"))["student"]["init"]).name
            for m, ab in (("danceopd", None), ("sft", None), ("danceopd", "other_init"))}
    assert init == {("danceopd", None): "local_edit", ("sft", None): "local_edit", ("danceopd", "other_init"): "t2i"}
    assert sb.init_tasks(plan)["t2i"] == ("t2i", "local_edit", "global_edit")  # its step-0 row is scored too
    assert sb.setting_title(plan, "t2i_edit").endswith("student from the local-edit teacher")

    def scores(t2i, local, glob):
        return {"t2i": {"acc": t2i}, "local_edit": {"success": local, "success_preserved": local},
                "global_edit": {"success": glob}}

    def run(method, seed, sc):
        return {"setting": "t2i_edit", "method": method, "ablation": None, "seed": seed, "s_per_update": 0.1,
                "updates": {"equal_updates": 10, "equal_wall_clock": 10}, "scores": {"equal_updates": sc}}

    one = replace(plan, settings=("t2i_edit",))
    res = {"plan": {"a_init": "local_edit"}, "references": {"init:local_edit": {"scores": scores(0.10, 0.88, 0.0)}},
           "runs": [run("danceopd", sd, scores(0.6, 0.70, 0.10)) for sd in (0, 1)]
           + [run("sft", sd, scores(0.12, 0.86, 0.02)) for sd in (0, 1)]}
    (line,) = sb.moved_from_init(one, res)
    assert "t2i acc 0.100 → +0.500 (DanceOPD)" in line and "local_edit success_preserved 0.880 → -0.180" in line
    assert line.endswith("for at least one method: yes")
    for r in res["runs"]:  # the T2I init's picture: T2I and local edits never move
        r["scores"]["equal_updates"] = scores(0.12, 0.88, 0.5)
    assert sb.moved_from_init(one, res)[0].endswith("for at least one method: NO")
    old = sb.upgrade({"plan": {"variants": []}, "runs": []})
    assert old["plan"]["a_init"] == "t2i"  # the committed run started (a) from the T2I teacher
    with pytest.raises(SystemExit, match="a_init: 'global_edit' is not one of local_edit, t2i"):
        sb.main(["--list", "--set", "a_init=global_edit"])
    with pytest.raises(SystemExit, match="--set ablations: unknown ablation 'k5' \\(known: softmix, k4"):
        sb.main(["--list", "--set", "ablations=softmix,k5"])
    assert set(sb.PRESETS["full"].ablations) <= set(sb.KNOWN_ABLATIONS)


def test_upgrade_names_old_rows_by_what_they_ran_and_keeps_old_verdicts():
    sb = _bench()
    old = {"plan": {"seeds": [0]}, "seconds": 60.0, "claims": ["- old verdict"],
           "runs": [_run("local_global", m, None, 0, 0.5, 0.5) for m in ("offpolicy", "flowopd", "danceopd")]}
    new = sb.upgrade(json.loads(json.dumps(old)))
    assert [sb.row_key(r) for r in new["runs"]] == ["offpolicy+uniform", "flowopd+kl_gradient_old_scale", "danceopd"]
    assert new["claims_v1"] == ["- old verdict"] and "claims" not in new and "Recomputed" in new["recomputed"]
    assert sb.upgrade(json.loads(json.dumps(new))) == new  # once only


def test_committed_results_recompute_to_their_verdicts():
    """The committed table's verdicts follow from its JSON (`--report-only`); setting (b)'s main
    claims are paired over its 8 seeds (the plan's point: enough seeds to decide)."""
    sb = _bench()
    res = json.loads((ROOT / "bench" / "results" / "shapesbench.json").read_text())
    plan = sb.Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["plan"].items()})
    assert sb.claims(plan, sb.upgrade(json.loads(json.dumps(res)))) == res["claims"]
    b = {c["versus"]: c for c in res["claims"] if (c["setting"], c["budget"]) == ("local_global", "equal_updates")}
    assert b["sft"]["n"] == len(b["sft"]["diffs"]) == len(plan.seeds) == 8
    assert b["offpolicy"]["seeds"] == list(plan.seeds)
    md = (ROOT / "bench" / "results" / "shapesbench.md").read_text()
    assert md.index("## How the claims are judged") < md.index("## (a) T2I + Edit fusion")
