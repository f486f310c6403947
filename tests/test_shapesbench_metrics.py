"""ShapesBench metrics that cannot be gamed: the overlap floor of edit success, local success ∧
preservation (a copy of the source or the object erased scores 0), the FD noise floor, and the
reference rows and floor in the report (older results still render)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from danceopd import shapes_metrics as sm
from danceopd import shapes_world as sw

ROOT = Path(__file__).resolve().parent.parent
S = 16


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    import shapesbench

    return shapesbench


def _edits(task: str, n: int = 40, seed: int = 3):
    rng = np.random.default_rng(seed)
    ex = [sw.make_example(task, rng, S) for _ in range(n)]
    return [p for p, _, _ in ex], [sw.render(s, S) for _, s, _ in ex], [t for _, _, t in ex]


def _paint(image: np.ndarray, mask: np.ndarray, color: str) -> np.ndarray:
    out = image.copy()
    out[:, mask] = np.asarray(sw.COLORS[color], np.float32)[:, None]
    return out


# ---- the overlap floor -------------------------------------------------------------------------

def test_edit_success_needs_the_object_on_its_target_mask():
    for task in ("local_edit", "global_edit"):
        for tgt in _edits(task)[2]:
            exact = sw.render(tgt, S)
            assert sm.target_overlap(exact, tgt) == 1.0 and sm.edit_success(exact, tgt)
            assert not sm.edit_success(sm.erased(exact), tgt)
            # the object one pixel off (the background filled in behind it): at most 0.67, fails
            mask = sw.shape_mask(tgt, S)
            for shift in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                moved = np.roll(mask, shift, (0, 1))
                if moved.sum() == mask.sum():  # not wrapped round the border
                    off = _paint(_paint(exact, mask, tgt.background), moved, tgt.color)
                    assert sm.target_overlap(off, tgt) <= 0.67 and not sm.edit_success(off, tgt)
    # a move that leaves the object at its source cell and also draws it at the target: IoU 0.5,
    # and the template match alone would have called some of these the target scene
    prompts, sources, targets = _edits("local_edit", 120)
    dups = [(_paint(sw.render(t, S), sw.shape_mask(sw.scene_from_image(s), S), t.color), t)
            for p, s, t in zip(prompts, sources, targets) if sw.parse_prompt(p).op == "move"]
    assert len(dups) > 20
    assert all(sm.target_overlap(x, t) == 0.5 and not sm.edit_success(x, t) for x, t in dups)
    assert any(sw.decode_scene(x) == t for x, t in dups)


def test_overlap_floor_boundary():
    """A square missing 4 edge pixels with 3 stray ones of its colour elsewhere has IoU 21 / 28 =
    0.75 exactly and still decodes as that square: it passes at the floor, one pixel less fails."""
    assert sm.OVERLAP_FLOOR == 0.75
    tgt = sw.Scene("blue", "red", "square", 1, 1)
    img = sw.render(tgt, S)
    ys, xs = np.nonzero(sw.shape_mask(tgt, S))
    top, left, bottom, right = ys.min(), xs.min(), ys.max(), xs.max()
    mid_y, mid_x = (top + bottom) // 2, (left + right) // 2
    holes = [(top, mid_x), (bottom, mid_x), (mid_y, left), (mid_y, right)]  # edge midpoints, not corners
    for y, x in holes:
        img[:, y, x] = np.asarray(sw.COLORS["blue"], np.float32)
    for y, x in ((0, 0), (0, 15), (15, 0)):  # stray pixels in the image's corners, far from every cell
        img[:, y, x] = np.asarray(sw.COLORS["red"], np.float32)
    assert sw.decode_scene(img) == tgt
    assert sm.target_overlap(img, tgt) == pytest.approx(0.75) and sm.edit_success(img, tgt)
    img[:, mid_y, mid_x] = np.asarray(sw.COLORS["blue"], np.float32)  # one more hole: 20 / 28
    assert sw.decode_scene(img) == tgt and not sm.edit_success(img, tgt)


# ---- success ∧ preservation --------------------------------------------------------------------

def test_copy_and_erased_score_zero_together_and_the_target_one():
    prompts, sources, targets = _edits("local_edit")
    truth = np.stack([sw.render(t, S) for t in targets])
    copy, gone = np.stack(sources), np.stack([sm.erased(s) for s in sources])
    for x in (copy, gone):  # both keep every pixel outside the edit: preservation alone scores them 1
        sc = sm.score_local(x, sources, prompts)
        assert sc["preservation"] == 1.0 and sc["success_preserved"] == 0.0
        assert sm.per_prompt("local_edit", x, sources, prompts) == [0] * len(prompts)
    assert sm.score_local(truth, sources, prompts)["success_preserved"] == 1.0
    assert sm.per_prompt("local_edit", truth, sources, prompts) == [1] * len(prompts)
    # the right object (larger than a cross) with a stray cross of another colour outside the edit:
    # success without preservation, so 0 together
    keep = [i for i, t in enumerate(targets) if t.kind != "cross"]
    smeared = []
    for i in keep:
        s, t = sw.scene_from_image(sources[i]), targets[i]
        r, c = next((r, c) for r in range(3) for c in range(3) if (r, c) not in {(s.row, s.col), (t.row, t.col)})
        other = next(c for c in sw.COLOR_NAMES if c not in (t.color, t.background))
        smeared.append(_paint(truth[i], sw.shape_mask(replace(t, kind="cross", row=r, col=c), S), other))
    kept_src, kept_prompts = [sources[i] for i in keep], [prompts[i] for i in keep]
    sc = sm.score_local(np.stack(smeared), kept_src, kept_prompts)
    assert sc["success"] == 1.0 and sc["preservation"] < 1.0 and sc["success_preserved"] == 0.0
    assert sm.per_prompt("local_edit", np.stack(smeared), kept_src, kept_prompts) == [0] * len(keep)
    # half right, half copied: every rate and the per-prompt outcomes agree
    mixed = np.stack([t if i % 2 else c for i, (t, c) in enumerate(zip(truth, copy))])
    sc, per = sm.score_local(mixed, sources, prompts), sm.per_prompt("local_edit", mixed, sources, prompts)
    assert per == [i % 2 for i in range(len(prompts))] and np.mean(per) == sc["success_preserved"] == 0.5


def test_erased_needs_a_scene():
    with pytest.raises(ValueError, match="not a ShapesBench scene"):
        sm.erased(np.zeros((3, S, S), np.float32))


# ---- the FD noise floor ------------------------------------------------------------------------

def _t2i(n: int, seed: int, partial: float = 0.5):
    rng = np.random.default_rng(seed)
    ex = [sw.make_example("t2i", rng, S, partial_t2i=partial, t2i_free=("background", "position")) for _ in range(n)]
    return [p for p, _, _ in ex], np.stack([sw.render(t, S) for _, _, t in ex])


def test_redraw_keeps_what_the_prompt_fixes_and_draws_the_rest():
    rng = np.random.default_rng(0)
    full = sw.describe(sw.Scene("blue", "red", "circle", 0, 2))
    assert {sm.redraw(full, rng) for _ in range(20)} == {sw.Scene("blue", "red", "circle", 0, 2)}
    draws = [sm.redraw("a red circle", rng) for _ in range(400)]
    assert {(d.color, d.kind) for d in draws} == {("red", "circle")}
    assert {d.background for d in draws} == set(sw.COLOR_NAMES) - {"red"}  # never the shape's colour
    assert {(d.row, d.col) for d in draws} == {(r, c) for r in range(3) for c in range(3)}
    with pytest.raises(ValueError, match="t2i prompts only"):
        sm.redraw("invert the colors", rng)


def test_fd_floor_is_positive_and_shrinks_with_more_samples():
    small = [sm.fd_floor(*_t2i(32, seed), resamples=3, seed=seed)["mean"] for seed in (0, 1)]
    large = [sm.fd_floor(*_t2i(256, seed), resamples=3, seed=seed)["mean"] for seed in (0, 1)]
    assert min(small + large) > 0
    assert np.mean(large) < 0.5 * np.mean(small)
    f = sm.fd_floor(*_t2i(32, 0), resamples=3)
    assert f["n"] == 32 and f["resamples"] == len(f["values"]) == 3 and f["sd"] > 0
    # every prompt fully specified: a perfect model redraws the reference itself
    assert sm.fd_floor(*_t2i(32, 0, partial=0.0), resamples=2)["mean"] == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="32 reference images but 31 prompts"):
        sm.fd_floor(_t2i(32, 0)[0][:31], _t2i(32, 0)[1])


# ---- the report ----------------------------------------------------------------------------------

def _scores(local: float, kept: float, glob: float) -> dict:
    return {"local_edit": {"success": local, "preservation": 1.0, "success_preserved": kept},
            "global_edit": {"success": glob, "distance": 0.1, "rmse": 0.1}}


def _result(sb, kept: dict) -> dict:
    """Setting (b) on 3 seeds: DanceOPD ahead on local success but behind on success ∧ preservation."""
    runs = []
    for row, (local, both) in kept.items():
        method, _, ab = row.partition("+")
        for seed, wobble in zip((0, 1, 2), (0.0, 0.01, -0.01)):
            s = _scores(local + wobble, both + wobble, 0.5)
            runs.append({"setting": "local_global", "method": method, "ablation": ab or None, "seed": seed,
                         "s_per_update": 0.1, "updates": {"equal_updates": 10, "equal_wall_clock": 10},
                         "scores": {"equal_updates": s, "equal_wall_clock": s}})
    refs = {"copy": {"scores": _scores(0.0, 0.0, 0.0)}, "erased": {"scores": _scores(0.0, 0.0, 0.0)},
            "init:local_edit": {"scores": _scores(0.88, 0.85, 0.1)}, "init:global_edit": {"scores": _scores(0.02, 0.02, 1.0)}}
    return {"plan": {"ablations": ["other_init"]}, "teachers": {}, "runs": runs, "references": refs,
            "fd_floor": {"mean": 65.76, "sd": 10.07, "n": 512, "resamples": 20}}


def test_claims_count_local_success_and_preservation_together():
    sb = _bench()
    plan = replace(sb.PRESETS["full"], settings=("local_global",))
    rows = {"sft": (0.5, 0.5), "offpolicy": (0.5, 0.5), "diffusionopd": (0.5, 0.5), "danceopd": (0.8, 0.2)}
    res = _result(sb, rows)
    out = sb.claims(plan, res)
    assert out and all(c["outcome"] == "refuted" for c in out)  # behind on what counts
    assert all(c["mean"] == pytest.approx(-0.15) for c in out)  # (0.2 + 0.5) / 2 - 0.5
    assert "local success ∧ preservation" in out[0]["claim"]
    # results without the combined outcome are judged on success, as they were
    for r in res["runs"]:
        for sc in r["scores"].values():
            sc["local_edit"].pop("success_preserved", None)  # both budgets share one dict here
    assert all(c["outcome"] == "held" for c in sb.claims(plan, res))


def test_reference_rows_and_the_fd_floor_appear_in_the_tables():
    sb = _bench()
    plan = replace(sb.PRESETS["full"], settings=("local_global",))
    res = _result(sb, {"danceopd": (0.8, 0.7)})
    res["teachers"] = {t: {"scores": _scores(0.9, 0.88, 1.0)[t]} for t in ("local_edit", "global_edit")}
    md = sb.table(plan, res, "local_global", "equal_updates")
    lines = md.splitlines()
    assert "local success ∧ preservation" in lines[0]
    copy = next(line for line in lines if line.startswith("| reference: identity copy"))
    assert copy.split(" | ")[1:4] == ["0.000", "1.000", "0.000"]  # success, preservation, both
    assert any(line.startswith("| reference: object erased") for line in lines)
    assert any("local_edit teacher at step 0 (the students' init)" in line for line in lines)
    assert any("global_edit teacher at step 0 (the other-init ablation's init)" in line for line in lines)
    # the other init only where the plan has that ablation
    res["plan"]["ablations"] = []
    assert "other-init" not in sb.table(plan, res, "local_global", "equal_updates")
    # (a)'s table: the FD floor in the FD column's header, no T2I cells for the copy
    res["teachers"]["t2i"] = {"scores": {"fd": 400.0, "acc": 0.9}}
    head, _, *body = sb.table(plan, res, "t2i_edit", "equal_updates").splitlines()
    assert "T2I FD ↓ (floor 65.76 ± 10.07)" in head
    assert next(line for line in body if "identity copy" in line).split(" | ")[1:3] == ["—", "—"]
    text = "\n".join(sb.metric_lines(res) + sb.rule_lines(plan, {**res, "claims": []}))
    assert "independent redraw" in text and "20 redraws" in text and "identity copy" in text
    assert f"IoU ≥ {sm.OVERLAP_FLOOR:g}" in text and f"≥ {sm.PRESERVATION_FLOOR:g}" in text


def _committed(sb):
    res = json.loads((ROOT / "bench" / "results" / "shapesbench.json").read_text())
    plan = sb.Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["plan"].items()})
    return plan, res


def test_committed_results_render_without_the_new_fields():
    """Results from before the reference rows, the FD floor and success ∧ preservation (the
    committed JSON with them taken out): their tables and rules render without them, and say so."""
    sb = _bench()
    plan, res = _committed(sb)
    res.pop("references"), res.pop("fd_floor")
    for r in res["runs"]:
        for scores in r["scores"].values():
            scores.get("local_edit", {}).pop("success_preserved", None)
    assert not sb.combined(res)
    for setting in plan.settings:
        for budget in ("equal_updates", "equal_wall_clock"):
            md = sb.table(plan, res, setting, budget)
            assert "reference:" not in md and "floor" not in md and "∧" not in md.splitlines()[0]
    text = "\n".join(sb.metric_lines(res) + sb.rule_lines(plan, res))
    assert "predate the overlap floor" in text and "redraw" not in text


@pytest.mark.slow
def test_report_only_rewrites_the_committed_results(tmp_path):
    sb = _bench()
    _, res = _committed(sb)
    assert sb.main(["--report-only", str(ROOT / "bench" / "results" / "shapesbench.json"), "--out", str(tmp_path)]) == 0
    md = (tmp_path / "shapesbench.md").read_text()
    assert "## (b) Local + Global edit fusion" in md and "reference: identity copy" in md
    assert json.loads((tmp_path / "shapesbench.json").read_text())["claims"] == res["claims"]
