"""Config loading and `danceopd validate`: every bad input gives one line naming the key, exit 2."""

import pytest
from typer.testing import CliRunner

from danceopd.config import ConfigError, apply_overrides, load_config
from services.cli import app

runner = CliRunner()


def run_validate(path, *extra):
    res = runner.invoke(app, ["validate", str(path), *extra])
    return res.exit_code, res.output.strip()


def test_good_config_validates(toy_raw, write_config):
    code, out = run_validate(write_config(toy_raw))
    assert code == 0, out
    assert "3 routes" in out


def test_overrides_are_typed(toy_raw, write_config):
    cfg = load_config(write_config(toy_raw), ["learner.lr=3e-4", "method.k=3", "sync.on_stale=drop",
                                              "routing.routes.0.weight=2", "rollout.early_stop=false"])
    assert cfg.learner.lr == pytest.approx(3e-4) and isinstance(cfg.learner.lr, float)
    assert cfg.method.k == 3 and cfg.sync.on_stale == "drop"
    assert cfg.routing.routes[0].weight == 2.0 and cfg.rollout.early_stop is False


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["learner.lr"])


def _rows(tmp_path, text):
    p = tmp_path / "data" / "toy" / "data.csv"
    p.write_text(text)


BAD = [
    # (mutation of the raw config, expected message fragment)
    (lambda r, t: r["learner"].update(bogus=1), "learner.bogus: unknown key"),
    (lambda r, t: r["routing"]["routes"][1].update(teacher="nobody"), "routing.routes.1.teacher: unknown teacher 'nobody'"),
    (lambda r, t: r["routing"]["routes"][0].update(weight=-1), "routing.routes.0.weight"),
    (lambda r, t: r["method"].update(k=0), "method.k"),
    (lambda r, t: r["method"].update(name="dance"), "method.name"),
    (lambda r, t: r["method"].update(k=17), "method.k: 17 query states exceed rollout_steps=16"),
    (lambda r, t: r["routing"]["routes"][2].update(task="inpaint"), "routing.routes.2.task: bucket 'inpaint' is empty"),
    (lambda r, t: r["routing"]["routes"][1].update(requires_source_image=True), "requires a source image"),
    (lambda r, t: r.update(data={"path": "data/toy/missing.csv"}), "file not found"),
    (lambda r, t: r["teachers"].append(dict(r["teachers"][0])), "duplicate teacher name 't2i_teacher'"),
    (lambda r, t: [x.update(weight=0) for x in r["routing"]["routes"]], "all route weights are 0"),
    (lambda r, t: r.setdefault("student", {}).update(init="models/nowhere"), "student.init: model folder"),
    (lambda r, t: r["teachers"][0].update(kind="pretrained", path="x"), "teachers.0.kind"),
    (lambda r, t: r["sync"].update(sync_every=3, max_policy_lag=0), "sync.max_policy_lag"),
    (lambda r, t: _rows(t, "uid,task,prompt,source_image,target_image\na,t2i,class 9,,\n"
                         "b,local_edit,class 0,,\nc,global_edit,class 1,,\n"), "class 9"),
    (lambda r, t: _rows(t, "uid,task,prompt,source_image,target_image\na,t2i,class 0,,\na,t2i,class 1,,\n"), "duplicate uid 'a'"),
    (lambda r, t: _rows(t, "uid,task,prompt\na,t2i,class 0\n"), "missing column 'source_image'"),
    (lambda r, t: _rows(t, "uid,task,prompt,source_image,target_image\na,t2i,class 0,img/nope.png,\n"
                         "b,local_edit,class 0,,\nc,global_edit,class 1,,\n"), "source_image"),
]


@pytest.mark.parametrize("mutate,expected", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_exit_2(toy_raw, write_config, tmp_path, mutate, expected):
    mutate(toy_raw, tmp_path)
    code, out = run_validate(write_config(toy_raw))
    assert code == 2, out
    assert expected in out
    assert len(out.splitlines()) == 1, out


def test_unparseable_yaml(write_config, tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("job: [unclosed\n")
    code, out = run_validate(p)
    assert code == 2 and "not valid YAML" in out


def test_bad_set_value_names_key(toy_raw, write_config):
    code, out = run_validate(write_config(toy_raw), "--set", "learner.steps=-5")
    assert code == 2 and out.startswith("error: learner.steps")


def test_a_retired_key_says_what_to_do_in_one_line(tmp_path):
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).parents[1] / "configs" / "toy.yaml").read_text())
    raw["deadlines"] = {"replay_s": 30}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith("deadlines.replay_s: no longer a setting") and "remove it" in msg and "\n" not in msg


# ---- names that become file names; deadline ordering (issue 22, points 6 and 10) ----------------

def _with(raw, path: str, value):
    """raw with the key at dotted `path` set (list indices as numbers)."""
    node = raw
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node[k]
    node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return raw


@pytest.mark.parametrize("key", ["routing.routes.0.name", "routing.routes.0.task", "routing.routes.0.teacher",
                                 "teachers.0.name"])
@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "..", ".hidden", "", "a b", "x" * 129, "/abs"])
def test_names_that_would_leave_an_output_folder_are_refused(toy_raw, tmp_path, key, name):
    from danceopd.config import config_from_dict

    with pytest.raises(ConfigError) as err:
        config_from_dict(_with(toy_raw, key, name), base_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg


def test_plain_names_pass(toy_raw, tmp_path):
    from danceopd.config import config_from_dict

    raw = _with(_with(toy_raw, "routing.routes.0.name", "t2i-v1.5_b"), "teachers.0.name", "T0.sd3-5")
    raw["routing"]["routes"][0]["teacher"] = "T0.sd3-5"
    cfg = config_from_dict(raw, base_dir=tmp_path)
    assert cfg.routing.routes[0].name == "t2i-v1.5_b" and cfg.teachers[0].name == "T0.sd3-5"


def test_a_checkpoint_config_with_a_route_named_to_escape_is_refused(toy_raw, tmp_path):
    """`danceopd sample` / `eval` read a checkpoint's own config.yaml: it goes through the same
    checks, so a route named `../x` never becomes `OUT/../x-000.png`."""
    import yaml

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    toy_raw["routing"]["routes"][0]["name"] = "../x"
    (ckpt / "config.yaml").write_text(yaml.safe_dump(toy_raw))
    out = tmp_path / "home" / "out"
    for args in (["sample", str(ckpt), "--route", "../x", "--prompt", "class 0", "--n", "1", "--out", str(out)],
                 ["eval", str(ckpt), "--out", str(out)]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        assert res.output.strip().startswith("error: routing.routes.0.name: '../x' is not a plain name"), res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("teacher_s, route_s", [(900, 600), (600, 600)])
def test_teacher_deadline_must_be_below_the_route_deadline(toy_raw, write_config, teacher_s, route_s):
    toy_raw["deadlines"] = {"teacher_s": teacher_s, "route_s": route_s}
    code, out = run_validate(write_config(toy_raw))
    assert code == 2 and len(out.splitlines()) == 1, out
    assert out.startswith(f"error: deadlines.teacher_s: {teacher_s} s is not below deadlines.route_s = {route_s} s"), out
    toy_raw["deadlines"] = {"teacher_s": route_s - 1, "route_s": route_s}
    assert run_validate(write_config(toy_raw))[0] == 0
    # --remote checks the same (the ordering is the config's own)
    toy_raw["deadlines"] = {"teacher_s": teacher_s, "route_s": route_s}
    code, out = run_validate(write_config(toy_raw), "--remote")
    assert code == 2 and out.startswith("error: deadlines.teacher_s: "), out
