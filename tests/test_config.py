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
