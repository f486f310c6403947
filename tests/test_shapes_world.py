"""ShapesBench: deterministic rendering, exact ground truth, tokenizer, dataset and metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from danceopd import shapes_world as sw


def _examples(n: int, seed: int = 0, size: int = 16):
    rng = np.random.default_rng(seed)
    return [(task, *sw.make_example(task, rng, size)) for _ in range(n) for task in sw.TASKS]


def _read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_render_is_deterministic_and_uses_only_the_scene_colours():
    scene = sw.sample_scene(np.random.default_rng(3))
    a, b = sw.render(scene, 16), sw.render(scene, 16)
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    colours = {tuple(px) for px in a.reshape(3, -1).T}
    assert colours == {sw.COLORS[scene.background], sw.COLORS[scene.color]}
    assert sw.make_example("local_edit", np.random.default_rng(5)) == sw.make_example("local_edit", np.random.default_rng(5))


def test_every_kind_and_cell_has_a_distinct_mask():
    for size in (15, 16, 32):
        masks = sw._masks(size)
        flat = {m.tobytes() for m in masks.values()}
        assert len(flat) == len(sw.KINDS) * 9
        assert all(m.sum() >= 5 for m in masks.values())


def test_scene_round_trips_through_image_and_prompt():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sw.sample_scene(rng)
        assert sw.scene_from_image(sw.render(scene, 16)) == scene
        assert sw.parse_prompt(sw.describe(scene)).scene == scene


def test_tokenize_round_trip_for_generated_prompts():
    prompts = {p for _, p, _, _ in _examples(300)}
    assert len(prompts) > 100
    for p in prompts:
        ids = sw.tokenize(p, 12)
        assert len(ids) == 12 and sw.UNK_ID not in ids
        assert sw.detokenize(ids) == p
    assert sw.tokenize("a purple blob", 4) == [sw._WORD_ID["a"], sw.UNK_ID, sw.UNK_ID, sw.PAD_ID]


def test_ground_truth_matches_the_generated_target_for_every_task():
    for task, prompt, src, tgt in _examples(100, seed=2):
        src_img = None if src is None else sw.render(src, 16)
        np.testing.assert_array_equal(sw.ground_truth(prompt, src_img, 16), sw.render(tgt, 16))
        assert sw.parse_prompt(prompt).task == task


def test_local_edits_change_only_the_object():
    for task, prompt, src, tgt in _examples(100, seed=4):
        if task != "local_edit":
            continue
        changed = np.any(sw.render(src, 16) != sw.render(tgt, 16), axis=0)
        allowed = sw.shape_mask(src, 16) | sw.shape_mask(tgt, 16)
        assert changed.any() and not (changed & ~allowed).any(), prompt
        assert tgt.background == src.background


def test_global_edits_change_the_background():
    for task, _, src, tgt in _examples(60, seed=6):
        if task == "global_edit":
            assert tgt.background != src.background and (tgt.kind, tgt.row, tgt.col) == (src.kind, src.row, src.col)


def test_bad_prompts_and_sources_are_rejected():
    src = sw.render(sw.Scene("blue", "red", "circle", 0, 0), 16)
    with pytest.raises(ValueError, match="not a ShapesBench prompt"):
        sw.parse_prompt("draw a horse")
    with pytest.raises(ValueError, match="purple"):
        sw.parse_prompt("make the circle purple")
    with pytest.raises(ValueError, match="needs a source image"):
        sw.ground_truth("invert the colors", None, 16)
    with pytest.raises(ValueError, match="shows a circle"):
        sw.ground_truth("make the square green", src, 16)
    with pytest.raises(ValueError, match="not a ShapesBench scene"):
        sw.ground_truth("invert the colors", src + 0.3, 16)


def test_dataset_csv_columns_paths_and_targets(tmp_path):
    csv_path = sw.write_shapes_dataset(tmp_path / "ds", n_per_task=6, seed=0)
    assert csv_path == tmp_path / "ds" / "data.csv"
    rows = _read_csv(csv_path)
    assert list(rows[0]) == ["uid", "task", "prompt", "source_image", "target_image", "raw_task", "caption_dict"]
    assert [r["task"] for r in rows].count("local_edit") == 6 and len({r["uid"] for r in rows}) == 18
    for r in rows:
        assert not Path(r["target_image"]).is_absolute()
        target = sw.load_png(csv_path.parent / r["target_image"])
        if r["task"] == "t2i":
            assert r["source_image"] == ""
            src = None
        else:
            src = sw.load_png(csv_path.parent / r["source_image"])
        np.testing.assert_array_equal(sw.ground_truth(r["prompt"], src, 16), target)
        cap = json.loads(r["caption_dict"])
        assert sw.Scene(**{k: cap["target"][k] for k in ("background", "color", "kind", "row", "col")}) == sw.scene_from_image(target)
        assert r["raw_task"] == sw.parse_prompt(r["prompt"]).op
    # Same seed, same dataset.
    again = sw.write_shapes_dataset(tmp_path / "ds2", n_per_task=6, seed=0)
    assert _read_csv(again) == rows


def test_metrics_are_perfect_on_ground_truth_and_worse_on_noise():
    rng = np.random.default_rng(7)
    t2i = [sw.make_example("t2i", rng) for _ in range(24)]
    prompts = [p for p, _, _ in t2i]
    truth = np.stack([sw.render(t, 16) for _, _, t in t2i])
    noise = rng.uniform(-1, 1, truth.shape).astype(np.float32)
    acc = sw.attribute_accuracy(truth, prompts)
    assert acc == dict.fromkeys(("kind", "color", "position", "background", "all"), 1.0)
    assert sw.attribute_accuracy(noise, prompts)["all"] < 0.5
    assert sw.image_distance(truth, truth) == 0.0 and sw.image_distance(noise, truth) > 0.5

    edits = [sw.make_example("local_edit", rng) for _ in range(24)]
    e_prompts = [p for p, _, _ in edits]
    sources = np.stack([sw.render(s, 16) for _, s, _ in edits])
    targets = np.stack([sw.render(t, 16) for _, _, t in edits])
    assert sw.preservation(targets, sources, e_prompts) == 1.0
    assert sw.preservation(targets, sources) > 0.9  # moves paint a few pixels outside the source object
    assert sw.preservation(noise, sources, e_prompts) < 0.8
    assert sw.attribute_accuracy(targets, [t for _, _, t in edits])["all"] == 1.0
