"""Bad input is stopped at the door (issue 9, point 7): every leaf of configs/demo.yaml and
configs/cluster.yaml, mutated, either validates or is refused with exit 2 and one short line that
names the config key; a few specific bad inputs are refused with their key named."""

from __future__ import annotations

import copy
import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from danceopd import shapes_world as sw
from danceopd.config import Config, apply_overrides, config_from_dict
from danceopd.validate import validate
from services.cli import app
from tests.conftest import ROOT, ipv6_loopback

runner = CliRunner()
CONFIGS = ("demo.yaml", "cluster.yaml")
ROWS_PER_TASK = 2  # the sweep is about config leaves: a small copy of the dataset keeps it fast
KEY = re.compile(r"^error: ([a-z_]+)(\.\w+)*: ")


def run(path: Path, *sets: str) -> tuple[int, str]:
    args = ["validate", str(path)]
    for s in sets:
        args += ["--set", s]
    res = runner.invoke(app, args)
    return res.exit_code, res.output.strip()


def assert_one_line(code: int, out: str, what: str = "") -> None:
    assert code in (0, 2), f"{what}: exit {code}: {out}"
    if code == 2:
        assert "Traceback" not in out and "\n" not in out, f"{what}: {out}"
        assert len(out) < 300, f"{what}: {len(out)} chars: {out}"
        m = KEY.match(out)
        assert m and m.group(1) in Config.model_fields, f"{what}: does not start with a config key: {out}"


def _copy_shapes_data(dst: Path, rows_per_task: int) -> Path:
    src = ROOT / "configs" / "data" / "shapes"
    with (src / "data.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    keep, seen = [], {}
    for r in rows:
        if seen.get(r["task"], 0) < rows_per_task:
            seen[r["task"]] = seen.get(r["task"], 0) + 1
            keep.append(r)
    (dst / "images").mkdir(parents=True)
    for r in keep:
        for col in ("source_image", "target_image"):
            if r[col]:
                shutil.copy(src / r[col], dst / r[col])
    with (dst / "data.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(keep)
    return dst / "data.csv"


def make_copy(tmp: Path, name: str) -> Path:
    """configs/NAME next to a small copy of its dataset; output in tmp (cluster.yaml's is /mnt/...)."""
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    assert raw["data"]["path"] == "data/shapes/data.csv"
    if not (tmp / "data" / "shapes").exists():
        _copy_shapes_data(tmp / "data" / "shapes", ROWS_PER_TASK)
    init = raw.get("student", {}).get("init", "random")
    if init not in ("random", "base") and not (tmp / init).exists():  # demo.yaml's committed model folder
        shutil.copytree(ROOT / "configs" / init, tmp / init)
    raw["job"]["output_dir"] = str(tmp / "run")
    path = tmp / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad_input")
    return {name: make_copy(tmp, name) for name in CONFIGS}


@pytest.fixture
def demo(tmp_path):
    """A private copy of the demo config and its (small) dataset, free to corrupt, with a t2i route
    (first, as teachers.0) besides the demo's edit routes, so every ShapesBench task is checked."""
    path = make_copy(tmp_path, "demo.yaml")
    raw = yaml.safe_load(path.read_text())
    raw["teachers"].insert(0, {"name": "t2i_teacher", "kind": "oracle", "std": 0.05, "tasks": ["t2i"]})
    raw["routing"]["routes"].insert(0, {"name": "t2i", "teacher": "t2i_teacher", "task": "t2i"})
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---- every leaf, mutated -------------------------------------------------------------------------

def leaves(node, path=()):
    """(dotted key, value) of every section, list and scalar of a YAML tree."""
    if path:
        yield ".".join(path), node
    if isinstance(node, dict):
        for k, v in node.items():
            if "." not in str(k):  # a label key such as ray.io/node-group: no dotted --set path names it
                yield from leaves(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, str(i)))


NUMBER_BAD = ["-1", "1.0e+30", ".nan", ".inf", "-.inf", "nan", "abc"]  # every number field refuses these


def mutations(value) -> tuple[list[str], list[str]]:
    """(must be refused, may go either way) `--set` values for a leaf."""
    if isinstance(value, bool):
        return ["maybe", "[1]"], ["false" if value else "true"]
    if isinstance(value, (int, float)):
        return NUMBER_BAD, ["0", "1", str(2**32)]
    if isinstance(value, str):
        return ["[1]"], ["", "nonexistent/path", "3"]
    if isinstance(value, list):
        return [], ["[]", "3"]
    if isinstance(value, dict):
        return [], ["3", "{}"]
    return [], ["0", "abc"]


def cases(name: str):
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    for key, value in leaves(raw):
        if key == "job.output_dir":  # the copies write to tmp; the original value is swept below
            value = "runs/x"
        refused, either = mutations(value)
        yield key, refused, either


def answer(path: Path, raw: dict, key: str, value: str) -> tuple[int, str]:
    """What `danceopd validate PATH --set KEY=VALUE` answers, in-process and without the CLI's
    formatting: (0, "") or (2, "error: <the exception's message>"). Validation may raise only
    ValueErrors (ConfigError, DatasetError): anything else propagates and fails the test."""
    try:
        raw = apply_overrides(copy.deepcopy(raw), [f"{key}={value}"])
        validate(config_from_dict(raw, base_dir=path.parent))
    except ValueError as e:
        return 2, f"error: {e}"
    return 0, ""


# A huge stall bound only means "never report a stall": ControlConfig bounds it from below only.
HUGE_IS_FINE = {"control.stall_after_s"}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_leaf_mutation_validates_or_is_one_line(copies, name):
    path = copies[name]
    raw = yaml.safe_load(path.read_text())
    assert answer(path, raw, "job.name", raw["job"]["name"]) == (0, "")  # so refusals are the mutation's doing
    n = 0
    for key, refused, either in cases(name):
        for value in refused:
            if key in HUGE_IS_FINE and value == "1.0e+30":
                continue
            code, out = answer(path, raw, key, value)
            assert_one_line(code, out, f"{key}={value}")
            assert code == 2, f"{key}={value} was accepted"
            assert out.startswith(f"error: {key}"), f"{key}={value}: the message names another key: {out}"
            n += 1
        for value in either:
            code, out = answer(path, raw, key, value)
            assert_one_line(code, out, f"{key}={value}")
            n += 1
    assert n > 300


@pytest.mark.parametrize("name", CONFIGS)
def test_original_output_dir_is_one_line(name):
    # cluster.yaml's output_dir is on the cluster's shared volume: here it may be refused, in one line.
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    code, out = run(ROOT / "configs" / name, f"job.output_dir={raw['job']['output_dir']}")
    assert_one_line(code, out, name)


@pytest.mark.subprocess
def test_exit_codes_of_the_real_command():
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    ok = subprocess.run([sys.executable, "-m", "services.cli", "validate", "configs/demo.yaml"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([sys.executable, "-m", "services.cli", "validate", "configs/demo.yaml", "--set", "learner.lr=.nan"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error: learner.lr: ") and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "Traceback" not in bad.stderr + bad.stdout


# ---- specific bad inputs are refused, naming their key -------------------------------------------

@pytest.mark.parametrize("sets,expected", [
    (["learner.lr=.nan"], "learner.lr: Input should be a finite number"),
    (["teachers.1.std=.inf"], "teachers.1.std: Input should be a finite number"),
    (["learner.lr=10"], "learner.lr: Input should be less than or equal to 1"),
    (["job.seed=-1"], "job.seed: Input should be greater than or equal to 0"),
    ([f"job.seed={2**32}"], "job.seed: Input should be less than or equal to 4294967295"),
    (["teachers.0.seed=-1"], "teachers.0.seed: Input should be greater than or equal to 0"),
    (["replay.capacity=1", "replay.spill_dir=spill"], "replay.capacity: 1 is below the batches one learner step needs"),
    (["control.port=9100", "control.metrics_port=9100"], "control.port: 9100 is also control.metrics_port"),
    (["control.port=80"], "control.port: 80 is a privileged port"),
    (["control.metrics_port=443"], "control.metrics_port: 443 is a privileged port"),
    (["control.host=nonexistent/path"], "control.host: 'nonexistent/path' is not an IP address or host name"),
    (["control.host=::1::2"], "control.host: '::1::2' is not an IP address or host name"),
    (["control.host=nohost.invalid"], "control.host: 'nohost.invalid' cannot be resolved"),  # RFC 2606: never resolves
    (["control.metrics_host=192.0.2.1"], "control.metrics_host: '192.0.2.1' (192.0.2.1) cannot be bound on this machine"),
    (["deadlines.teacher_s=900", "deadlines.route_s=600"], "deadlines.teacher_s: 900 s is not below deadlines.route_s = 600 s"),
    (["control.token_env=NOT A NAME"], "control.token_env: 'NOT A NAME' is not an environment variable name"),
    (["student.lora.enabled=true", "student.lora.target_modules=[to_qq]"],
     "student.lora.target_modules: 'to_qq' matches no module of SD3Transformer2DModel"),
    (["teachers.0.tasks=[inpaint]"], "teachers.0.tasks: teacher t2i_teacher: unknown ShapesBench task 'inpaint'"),
    (["autoscale.enabled=true", "autoscale.min_rollout_workers=3"], "rollout.workers: 2 is outside the autoscale bounds [3, 8]"),
    (["learner.dist_backend=nccl"], "learner.dist_backend: nccl needs a whole GPU per rank"),
    (["rollout.num_cpus=0.00001"], "rollout.num_cpus: 1e-05 is finer than Ray's resource precision"),
    # a random student: the demo's init folder fits 16 px and 12 tokens only (refused first otherwise)
    (["backend.image_size=32", "backend.patch_size=2", "student.init=random"], "expected 32x32 (backend.image_size)"),
    (["backend.max_tokens=3", "student.init=random"], "more than backend.max_tokens=3"),
    (["job.name=two words"], "job.name: String should match pattern"),
    (["backend.num_heads=64", "backend.head_dim=128"], "backend.head_dim: num_heads x head_dim = 8192 exceeds 4096"),
    (["sync.timeout_s=1.0e+9"], "sync.timeout_s: Input should be less than or equal to 604800"),
], ids=lambda v: v[0].replace("=", "-") if isinstance(v, list) else "")
def test_specific_bad_config_is_refused(demo, sets, expected):
    code, out = run(demo, *sets)
    assert_one_line(code, out, str(sets))
    assert code == 2 and expected in out, out


def test_metrics_port_from_the_environment_clashes(demo, monkeypatch):
    monkeypatch.setenv("DANCEOPD_METRICS_PORT", "9200")
    code, out = run(demo, "control.port=9200")
    assert code == 2 and "control.port: 9200 is also the metrics port" in out, out
    monkeypatch.setenv("DANCEOPD_METRICS_PORT", "nine")
    code, out = run(demo)
    assert code == 2 and "control.metrics_port: unset, and $DANCEOPD_METRICS_PORT='nine' is not a port" in out, out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_unwritable_output_dir(demo, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out = run(demo, f"job.output_dir={locked / 'run'}")
        assert code == 2 and out.startswith(f"error: job.output_dir: {locked}: folder is not writable"), out
        code, out = run(demo, f"replay.spill_dir={locked}")
        assert code == 2 and out.startswith(f"error: replay.spill_dir: {locked}: folder is not writable"), out
    finally:
        locked.chmod(0o700)


def test_unwritable_folders_are_refused(demo, tmp_path, monkeypatch):
    # Works as root too: a folder below a file cannot be made, and os.access says what a user may write.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, out = run(demo, f"job.output_dir={blocker / 'run'}")
    assert code == 2 and out == f"error: job.output_dir: {blocker} is a file, not a folder", out
    code, out = run(demo, f"replay.spill_dir={blocker / 'spill'}")
    assert code == 2 and out == f"error: replay.spill_dir: {blocker} is a file, not a folder", out
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode, **kw))
    code, out = run(demo, f"job.output_dir={tmp_path / 'new' / 'run'}")
    assert code == 2 and out == f"error: job.output_dir: {tmp_path}: folder is not writable, so {tmp_path / 'new' / 'run'} cannot be created", out


def test_remote_job_skips_the_folders_it_writes(demo, monkeypatch):
    # cluster.yaml writes to /mnt/danceopd (a volume of the cluster): from a laptop, --remote.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: not os.path.isdir(p) and real_access(p, mode, **kw))
    code, out = run(demo)
    assert code == 2 and out.startswith("error: job.output_dir: "), out
    res = runner.invoke(app, ["validate", str(demo), "--remote", "--set", "replay.spill_dir=/spill"])
    assert res.exit_code == 0, res.output


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("key", ["host", "metrics_host"])
@pytest.mark.parametrize("value", ["::1", "[::1]", "::"])
def test_ipv6_hosts_work(demo, key, value):
    from danceopd.config import load_config

    raw = yaml.safe_load(demo.read_text())
    raw["control"] = {key: value}
    demo.write_text(yaml.safe_dump(raw))
    code, out = run(demo)
    assert code == 0, out
    assert getattr(load_config(demo).control, key) == value.strip("[]")  # a bind address has no brackets
    if value != "::":  # `--set` reads YAML, where `::` is a mapping: quote it there
        assert run(demo, f"control.{key}={value}")[0] == 0


def test_an_unusable_host_is_refused_before_anything_is_read(demo, monkeypatch):
    """The hosts are checked first: no data file, model folder or backend is touched."""
    from danceopd import validate as v
    from danceopd.config import ConfigError, load_config

    def never(*a, **kw):
        raise AssertionError("read before the host was checked")

    monkeypatch.setattr(v.Dataset, "load", never)
    monkeypatch.setattr(v, "_model_folder", never)
    monkeypatch.setattr(v, "_pipeline_models", never)
    for sets, msg in ((["control.host=nohost.invalid"], "control.host: 'nohost.invalid' cannot be resolved"),
                      (["control.metrics_host=192.0.2.1"], "control.metrics_host: '192.0.2.1' (192.0.2.1) cannot be bound")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            validate(load_config(demo, [*sets, "student.init=models/student"]))  # a model folder to look at


def test_remote_checks_the_form_of_a_host_not_whether_it_resolves_here(demo):
    # The head's names and addresses are its own: a cluster DNS name need not resolve on a laptop.
    for sets in (["control.host=nohost.invalid"], ["control.metrics_host=192.0.2.1"]):
        res = runner.invoke(app, ["validate", str(demo), "--remote", *(x for s in sets for x in ("--set", s))])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["validate", str(demo), "--remote", "--set", "control.host=no host"])
    assert res.exit_code == 2 and res.output.strip() == "error: control.host: 'no host' is not an IP address or host name"


def _rows(cfg_path: Path) -> tuple[Path, list[dict]]:
    data = cfg_path.parent / "data" / "shapes" / "data.csv"
    with data.open(newline="") as f:
        return data, list(csv.DictReader(f))


def _write_rows(data: Path, rows: list[dict]) -> None:
    with data.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _edit_row(cfg_path: Path) -> tuple[int, dict, Path]:
    """(row number, row, folder of data.csv) of the first edit row."""
    data, rows = _rows(cfg_path)
    n, row = next((i + 1, r) for i, r in enumerate(rows) if r["source_image"])
    return n, row, data.parent


def _png_header_only(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:60])  # a valid header, the image data cut off


@pytest.mark.parametrize("corrupt,reason", [
    (lambda p: p.write_bytes(b"this is not a png"), "is not a readable image (cannot identify image file"),
    (_png_header_only, "is not a readable image"),
    (lambda p: sw.save_png(np.zeros((3, 8, 8), np.float32), p), "is 8x8, expected 16x16 (backend.image_size)"),
    (lambda p: __import__("PIL.Image").Image.new("RGB", (5000, 2)).save(p), "is 5000x2, more than 4096 px a side"),
    (lambda p: p.open("r+b").truncate(65 * 2**20), "is 65 MiB, more than 64 MiB"),
])
@pytest.mark.parametrize("column", ["source_image", "target_image"])
def test_bad_image_names_the_row_and_file(demo, corrupt, reason, column):
    n, row, folder = _edit_row(demo)
    image = folder / row[column]
    corrupt(image)
    code, out = run(demo)
    assert_one_line(code, out, reason)
    what = column.split("_")[0]
    assert code == 2 and out.startswith(f"error: data.path: data.csv row {n} (uid {row['uid']}): {what} image {image} "), out
    assert reason in out, out


def test_missing_image_is_refused(demo):
    n, row, folder = _edit_row(demo)
    (folder / row["source_image"]).unlink()
    code, out = run(demo)
    assert code == 2 and out.startswith(f"error: data.path: data.csv row {n} (uid {row['uid']}): source_image ") and "does not exist" in out, out


@pytest.mark.parametrize("prompt,reason", [
    ("circle a red", "prompt 'circle a red': not a ShapesBench prompt"),  # words of the vocabulary, no grammar
    # a partly specified prompt is a ShapesBench prompt, but an oracle teacher needs one ground truth
    ("a red circle", "t2i prompt leaves position and background free: it has no single ground truth"),
    ("a purple circle", "prompt word 'purple' is not in the ShapesBench vocabulary"),
])
def test_prompt_the_backend_cannot_use(demo, prompt, reason):
    data, rows = _rows(demo)
    rows[0]["prompt"] = prompt
    _write_rows(data, rows)
    code, out = run(demo)
    assert code == 2 and out.startswith(f"error: data.path: data.csv row 1 (uid {rows[0]['uid']}): ") and reason in out, out


def test_edit_prompt_that_does_not_fit_its_source_image(demo):
    data, rows = _rows(demo)
    i, row = next((i, r) for i, r in enumerate(rows) if r["prompt"].startswith(("make the", "turn the", "move the"))
                  and not r["prompt"].startswith("make the background"))
    scene = sw.scene_from_image(sw.load_png(data.parent / row["source_image"]))
    other = next(k for k in sw.KINDS if k != scene.kind)
    words = row["prompt"].split()
    words[2] = other
    rows[i]["prompt"] = " ".join(words)
    _write_rows(data, rows)
    code, out = run(demo)
    assert code == 2 and f"row {i + 1} (uid {row['uid']})" in out and f"names a {other} but the source image shows a {scene.kind}" in out, out


def test_unreadable_data_file(demo):
    data, _ = _rows(demo)
    data.write_bytes(b'uid,task,prompt,source_image,target_image\n"a,t2i\n')
    code, out = run(demo)
    assert_one_line(code, out)
    assert code == 2 and out.startswith("error: data.path: data.csv: not a readable csv file"), out


def test_sft_needs_target_images(demo):
    data, rows = _rows(demo)
    rows[0]["target_image"] = ""
    _write_rows(data, rows)
    assert run(demo)[0] == 0  # an on-policy method never reads it
    code, out = run(demo, "method.name=sft")
    assert code == 2 and f"row 1 (uid {rows[0]['uid']}): no target image" in out, out


def test_student_folder_of_other_shapes(demo, tmp_path):
    folder = tmp_path / "student"
    folder.mkdir()
    (folder / "config.json").write_text('{"_class_name": "SD3Transformer2DModel", "sample_size": 32, "patch_size": 2}')
    (folder / "model.safetensors").write_bytes(b"")
    code, out = run(demo, f"student.init={folder}")
    assert code == 2 and out == f"error: student.init: {folder}: model sample_size=32 does not match the shapes backend (16)", out


@pytest.mark.parametrize("where,exc", [
    ("danceopd.backends.shapes.ShapesBackend.check_row", RuntimeError("boom\nsecond line")),
    ("danceopd.dataset.Dataset.load", KeyError("uid")),
    ("danceopd.validate.validate", TypeError("unexpected")),
])
def test_unexpected_failures_are_one_line(demo, monkeypatch, where, exc):
    def raise_(*a, **k):
        raise exc

    monkeypatch.setattr(where, raise_)
    code, out = run(demo)
    assert code == 2 and "Traceback" not in out and "\n" not in out and type(exc).__name__ in out, out
    if where == "danceopd.validate.validate":  # outside every check: the message names the config file
        assert out == f"error: {demo}: validation failed: TypeError: unexpected", out
    else:
        assert_one_line(code, out, where)
        assert out.startswith("error: data.path: "), out
