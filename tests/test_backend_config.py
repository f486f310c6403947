"""The per-backend config sections (a union on `backend.name`) and the capabilities declared on
the backend classes, which drive the config checks instead of comparisons of backend names."""

import ast
import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from danceopd.backends import backend_class, backends_where
from danceopd.config import BACKENDS, ConfigError, config_from_dict, dump_config, load_config
from danceopd.methods import METHODS
from services.cli import app

ROOT = Path(__file__).resolve().parents[1]

# A teacher each family can build, so a section is checked on its own.
TEACHER = {"toy": {"kind": "gaussian"}, "sim": {"kind": "gaussian"}, "shapes": {"kind": "oracle"},
           "sd3": {"kind": "pretrained"}, "zimage": {"kind": "pretrained"}}

# Every family's own knobs, set away from their defaults.
OWN = {
    "toy": {"dim": 3, "hidden": 16, "num_classes": 5},
    "sim": {"dim": 3, "hidden": 16, "num_classes": 5, "rollout_latency_s": 0.5, "teacher_latency_s": 0.25,
            "learner_latency_s": 0.125, "load_latency_s": 2.0, "teacher_nan_from": 3, "teacher_nan_calls": 2},
    "shapes": {"image_size": 32, "patch_size": 4, "num_layers": 3, "num_heads": 4, "head_dim": 8, "max_tokens": 10},
    "sd3": {"pretrained": "pipe", "resolution": 512, "max_sequence_length": 77, "dtype": "float32",
            "gradient_checkpointing": True, "cache_dir": "cache"},
    "zimage": {"pretrained": "pipe", "resolution": 256, "max_sequence_length": 64, "dtype": "float32",
               "gradient_checkpointing": True, "cache_dir": "cache"},
}


def raw_for(name: str | None, **backend) -> dict:
    section = dict(backend) if name is None else {"name": name, **backend}
    return {"backend": section, "data": {"path": "data.csv"},
            "teachers": [{"name": "t", **TEACHER[name or "toy"]}],
            "routing": {"routes": [{"name": "r", "teacher": "t", "task": "t2i"}]}}


def error(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return str(info.value)


def test_the_registry_covers_every_family_once():
    assert set(BACKENDS) == set(TEACHER) == set(OWN)
    for name, section in BACKENDS.items():
        assert backend_class(name).name == name and section.model_fields["name"].default == name


@pytest.mark.parametrize("name", list(OWN))
def test_each_family_takes_its_own_keys(name):
    cfg = config_from_dict(raw_for(name, **OWN[name]))
    assert cfg.backend.name == name and type(cfg.backend) is BACKENDS[name]
    assert cfg.backend.model_dump(exclude={"name"}) == OWN[name]
    # a dumped config loads back into the same section
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again.backend == cfg.backend


def test_default_backend_is_toy_and_a_section_without_name_is_toy():
    cfg = config_from_dict(raw_for(None))
    assert type(cfg.backend) is BACKENDS["toy"] and cfg.backend.name == "toy"
    raw = raw_for(None)
    del raw["backend"]
    assert config_from_dict(raw).backend == cfg.backend


FOREIGN = [
    # (family, a key of another family, the families that own it)
    ("sd3", "num_classes", "toy/sim"),
    ("zimage", "rollout_latency_s", "sim"),
    ("toy", "pretrained", "sd3/zimage"),
    ("toy", "rollout_latency_s", "sim"),
    ("sim", "image_size", "shapes"),
    ("shapes", "dim", "toy/sim"),
    ("shapes", "cache_dir", "sd3/zimage"),
]


@pytest.mark.parametrize("name,key,owners", FOREIGN, ids=[f"{n}.{k}" for n, k, _ in FOREIGN])
def test_a_key_of_another_family_is_refused_in_one_line_naming_it(name, key, owners):
    value = OWN[owners.split("/")[0]][key]
    msg = error(raw_for(name, **OWN[name], **{key: value}))
    assert msg == f"backend.{key}: unknown key for backend {name} (a setting of {owners}); remove it"


def test_several_foreign_keys_are_all_named_in_the_one_line():
    msg = error(raw_for("sd3", pretrained="p", dim=4, hidden=128, num_classes=4))
    assert msg == "backend.dim: unknown key for backend sd3 (a setting of toy/sim); remove it (and hidden, num_classes)"


@pytest.mark.parametrize("raw,expected", [
    (raw_for("sd3", pretrained="p", bogus=1), "backend.bogus: unknown key for backend sd3"),
    (raw_for("toy", bogus=1), "backend.bogus: unknown key for backend toy"),
    (raw_for("sd3"), "backend.pretrained: required by the sd3 backend"),
    (raw_for("toy", dim=0), "backend.dim: Input should be greater than or equal to 1"),
    ({**raw_for("toy"), "backend": {"name": "sd4"}}, "backend.name: unknown backend 'sd4' (known: toy, shapes, sim, sd3, zimage)"),
    (raw_for("shapes", image_size=16, patch_size=3), "backend.patch_size: 3 does not divide image_size=16"),
    (raw_for("shapes", num_heads=64, head_dim=128), "backend.head_dim: num_heads x head_dim = 8192 exceeds 4096"),
], ids=["unknown-sd3", "unknown-toy", "missing", "bound", "bad-name", "patch", "width"])
def test_section_errors_name_the_key_not_the_union_tag(raw, expected):
    msg = error(raw)
    assert msg.startswith(expected) and "\n" not in msg, msg


def test_shipped_config_switched_to_another_family_says_what_to_remove(write_config, toy_raw):
    res = CliRunner().invoke(app, ["validate", str(write_config(toy_raw)), "--set", "backend.name=sd3"])
    assert res.exit_code == 2
    assert res.output.strip() == ("error: backend.dim: unknown key for backend sd3 (a setting of toy/sim); "
                                  "remove it (and hidden, num_classes)")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_into_their_family_section(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert type(cfg.backend) is BACKENDS[raw["backend"]["name"]]
    assert {k: v for k, v in cfg.backend.model_dump().items() if k in raw["backend"]} == raw["backend"]


# ---- capabilities drive the checks --------------------------------------------------------------

@pytest.mark.parametrize("name", ["toy", "sim", "shapes"])
def test_declared_teacher_kinds_are_what_the_backend_builds(name, tmp_path):
    """Config accepts exactly the declared kinds, and the backend builds those and refuses the others."""
    from danceopd.backends import make_backend

    declared = backend_class(name).teacher_kinds
    backend = make_backend(config_from_dict(raw_for(name)))
    for kind in ("gaussian", "oracle"):
        raw = raw_for(name)
        raw["teachers"][0] = {"name": "t", "kind": kind}
        if kind in declared:
            teacher = config_from_dict(raw).teachers[0]
            assert backend.build_teacher(teacher, tmp_path) is not None
        else:
            assert error(raw).startswith(f"teachers.0.kind: the {name} backend takes ")
            with pytest.raises(ValueError, match=f"teacher t: .*{name} backend"):
                backend.build_teacher(config_from_dict(raw_for(name)).teachers[0].model_copy(update={"kind": kind}), tmp_path)


def test_teacher_kind_check_follows_the_class_attribute(monkeypatch):
    raw = raw_for("toy")
    raw["teachers"][0]["kind"] = "oracle"
    assert error(raw) == ("teachers.0.kind: the toy backend takes gaussian teachers; "
                          "'oracle' teachers need backend.name=shapes")
    monkeypatch.setattr(backend_class("toy"), "teacher_kinds", ("gaussian", "oracle"))
    assert config_from_dict(raw).teachers[0].kind == "oracle"


@pytest.mark.parametrize("student,teacher,key", [
    ({"init_lora": "lora"}, {}, "student.init_lora"),
    ({"init": "base"}, {}, "student.init"),
    ({}, {"lora": "lora"}, "teachers.0.lora"),
    ({}, {"adapters": {"a": "lora"}}, "teachers.0.adapters"),
])
def test_pipeline_features_follow_the_pipeline_capability(monkeypatch, student, teacher, key):
    raw = raw_for("toy")
    raw["student"] = student
    raw["teachers"][0].update(teacher)
    if "adapters" in teacher:
        raw["routing"]["routes"][0]["adapter"] = "a"
    assert error(raw).startswith(f"{key}: ") and "sd3 or zimage" in error(raw)
    monkeypatch.setattr(backend_class("toy"), "pipeline", True)
    config_from_dict(raw)


def test_pipeline_backends_take_pretrained_teachers_without_a_path():
    for name in backends_where(lambda c: c.pipeline):
        assert config_from_dict(raw_for(name, pretrained="p")).teachers[0].path is None
    msg = error({**raw_for("shapes"), "teachers": [{"name": "t", "kind": "pretrained"}]})
    assert msg == "teachers.0.path: a pretrained teacher needs a model folder"


def test_condition_cache_follows_the_capability(monkeypatch, toy_raw, tmp_path):
    from services.conditions import build_condition_cache

    cfg = config_from_dict(toy_raw, base_dir=tmp_path)
    assert build_condition_cache(cfg, progress=False) == (None, False)
    assert backends_where(lambda c: c.condition_cache) == ["sd3", "zimage"]
    monkeypatch.setattr(backend_class("toy"), "condition_cache", True)
    with pytest.raises(AttributeError, match="build_cache"):  # now it is asked for its cache
        build_condition_cache(cfg, progress=False)


def test_make_tiny_families_are_the_classes_with_a_writer(tmp_path):
    assert backends_where(lambda c: c.write_tiny is not None) == ["sd3", "zimage"]
    res = CliRunner().invoke(app, ["make-tiny", "toy", "--out", str(tmp_path / "p")])
    assert res.exit_code != 0 and "make-tiny: unknown family 'toy' (sd3, zimage)" in res.output


@pytest.mark.subprocess
def test_config_checks_do_not_import_diffusers():
    import subprocess
    import sys

    code = ("import sys; from danceopd.config import config_from_dict; "
            f"config_from_dict({raw_for('shapes')!r}); print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


# ---- no backend or method name is compared outside its registry -----------------------------------

PACKAGES = ("danceopd", "services", "learner", "router", "rollout_workers")
ALLOWED = {
    # `make-data KIND` names a procedural dataset (toy vectors, ShapesBench images), not a backend.
    ("services/cli.py", "toy"), ("services/cli.py", "shapes"),
}


def _strings(node) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_strings(e) for e in node.elts))
    return set()


def test_no_backend_or_method_name_is_compared_outside_its_registry():
    names = set(BACKENDS) | set(METHODS)
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Compare):
                    for name in set().union(*(_strings(x) for x in (node.left, *node.comparators))) & names:
                        if (rel, name) not in ALLOWED:
                            found.append(f"{rel}:{node.lineno} compares {name!r}")
    assert not found, "; ".join(found)


def test_the_name_scan_finds_a_comparison():
    """The scan above is not vacuous: it flags the form this change removed."""
    tree = ast.parse('if cfg.backend.name in ("sd3", "zimage"):\n    pass\n')
    compare = next(n for n in ast.walk(tree) if isinstance(n, ast.Compare))
    assert set().union(*(_strings(x) for x in (compare.left, *compare.comparators))) == {"sd3", "zimage"}


def test_backend_section_of_raw_config_is_not_mutated():
    raw = raw_for("sd3", pretrained="p")
    before = copy.deepcopy(raw)
    config_from_dict(raw)
    assert raw == before


def test_a_config_dumped_by_the_flat_schema_loads_and_a_set_foreign_key_still_fails(tmp_path):
    """A checkpoint's config.yaml from before the per-backend sections lists all 19 flat fields:
    the other families' fields at their old defaults go quietly; one a user set still fails."""
    from danceopd.config import FLAT_DEFAULTS

    raw = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    raw["backend"] = {**FLAT_DEFAULTS, **raw["backend"]}
    cfg = config_from_dict(raw, base_dir=ROOT / "configs")
    assert cfg.backend.name == "toy" and cfg.backend.hidden == 128
    raw["backend"]["num_layers"] = 6  # a shapes field someone set: not a dump artefact
    with pytest.raises(ConfigError, match=r"^backend.num_layers: unknown key for backend toy"):
        config_from_dict(raw, base_dir=ROOT / "configs")
