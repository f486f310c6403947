"""`danceopd submit|status|scale|stop` against a REAL Ray head started by this module.

The head
- `ray start --head --block` in its own session (process group), on free ports for everything
  that has a fixed default (GCS, dashboard, client server, dashboard agent, metrics export), with
  its own `--temp-dir`: so it never writes /tmp/ray/ray_current_cluster, and a plain
  `ray.init()` elsewhere on this machine (other tests, other people) never joins it.
- token authentication: RAY_AUTH_MODE=token plus RAY_AUTH_TOKEN_PATH pointing at a token file
  made for this module, for the head AND for every client (CLI, drivers). Every process the head
  starts (raylet, dashboard, job supervisors, job drivers, workers) inherits both.
- stopped by SIGTERM to exactly the `ray start` process we spawned (it drains the node and
  terminates its children), then SIGKILL to its process group, then a sweep of any process
  whose environment carries this module's marker — never a machine-wide `ray stop`.

Every CLI call runs as a subprocess (`.venv/bin/danceopd`), as a user would run it, so this
pytest process never holds Ray client state for the head.
"""

from __future__ import annotations

import csv
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from services.control import jobs
from tests.conftest import ROOT, free_port

BIN = Path(sys.executable).parent
MARKER_VAR = "DANCEOPD_TEST_RAY_HEAD"


class RayHead:
    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dopd-ray-", dir="/tmp"))  # short: Unix socket paths
        self.token_path = self.dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.marker = uuid.uuid4().hex
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash_port}"
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.proc: subprocess.Popen | None = None

    def client_env(self, **extra) -> dict:
        """Environment of a client process: same auth mode and token as the head."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS", MARKER_VAR)}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path), RAY_USAGE_STATS_ENABLED="0",
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def start(self, timeout_s: float = 120) -> None:
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.gcs_port}",
               f"--dashboard-port={self.dash_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--num-cpus=4", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.dir / 't'}", f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", "--object-store-memory=300000000"]
        env = self.client_env(**{MARKER_VAR: self.marker, "DS_ACCELERATOR": "cpu"})
        self.log = open(self.dir / "head.log", "w")
        self.proc = subprocess.Popen(cmd, env=env, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout_s
        req = urllib.request.Request(self.address + "/api/version",
                                     headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited {self.proc.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"Ray head not ready within {timeout_s} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.dir / "head.log").read_text()[-2000:]

    def marked_processes(self) -> list:
        import psutil

        out = []
        for p in psutil.process_iter():
            try:
                if p.pid != os.getpid() and p.environ().get(MARKER_VAR) == self.marker:
                    out.append(p)
            except (psutil.Error, OSError):
                pass
        return out

    def stop(self) -> None:
        import psutil

        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops its children
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(timeout=10)
        for p in self.marked_processes():  # anything of ours that left the group
            try:
                p.kill()
            except psutil.Error:
                pass
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head():
    h = RayHead()
    try:
        h.start()
        yield h
    finally:
        h.stop()
        left = h.marked_processes()
        assert not left, f"processes of the test head survived: {[(p.pid, p.name()) for p in left]}"


def cli(head: RayHead, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "danceopd"), *args], cwd=ROOT, env=env or head.client_env(),
                          capture_output=True, text=True, timeout=timeout)


def jobs_api(head: RayHead, path: str) -> dict:
    """GET the head's Jobs REST API (what JobSubmissionClient wraps), here: no client process
    importing Ray per call (about a core-second each on this machine)."""
    req = urllib.request.Request(f"{head.address}/api/jobs/{path}",
                                 headers={"Authorization": f"Bearer {head.token_path.read_text()}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def ray_job_info(head: RayHead, sid: str) -> dict:
    return jobs_api(head, sid)


def ray_job_logs(head: RayHead, sid: str) -> str:
    return jobs_api(head, f"{sid}/logs")["logs"]


def wait_job_end(head: RayHead, sid: str, timeout_s: float = 600) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = ray_job_info(head, sid)
        if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            return info
        assert time.monotonic() < deadline, f"job {sid} still {info['status']} after {timeout_s} s"
        time.sleep(0.5)


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


# ---- plain helpers (no cluster) ---------------------------------------------------------------

def test_parse_teachers():
    assert jobs.parse_teachers(None) is None
    assert jobs.parse_teachers(["t2i=2", " local_edit = 1"]) == {"t2i": 2, "local_edit": 1}
    for bad in (["t2i"], ["=2"], ["t2i=two"]):
        with pytest.raises(jobs.JobsError):
            jobs.parse_teachers(bad)


def _home_with_a_job(tmp_path: Path) -> Path:
    """A home folder with credentials in it and an experiment: the demo's config, whose data lies
    beside it (../data) and whose student starts from the model folder next to it (demo_init/)."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text("secret")
    (home / "notes.txt").write_text("not for the cluster")
    shutil.copytree(ROOT / "configs" / "data" / "shapes", home / "data" / "shapes")
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["data"] = {"path": "../data/shapes/data.csv"}
    shutil.copytree(ROOT / "configs" / raw["student"]["init"], home / "exp" / raw["student"]["init"])
    (home / "exp" / "c.yaml").write_text(yaml.safe_dump(raw))
    return home


def _listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_staged_upload_holds_the_config_and_its_data_only(tmp_path, monkeypatch):
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    cfg = load_config("exp/c.yaml")
    dest = tmp_path / "staged"
    rel = jobs.stage_upload(Path("exp/c.yaml"), cfg, dest)
    assert rel == "exp/c.yaml"
    got = _listing(dest)
    images = {p.relative_to(home).as_posix() for p in (home / "data" / "shapes" / "images").iterdir()}
    init = {p.relative_to(home).as_posix() for p in (home / "exp" / "demo_init").iterdir()}  # the student's model folder
    assert init and got == {"exp/c.yaml", "data/shapes/data.csv", *images, *init}
    # The copy resolves like the original: the same config, data and images from inside it.
    staged = load_config(dest / rel)
    assert list(jobs.config_inputs(dest / rel, staged)[0]) == [Path(str(p).replace(str(home), str(dest), 1))
                                                                for p in jobs.config_inputs(home / "exp/c.yaml", cfg)[0]]

    # From another cwd the anchor is the common folder of the config and its inputs (still home/).
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert jobs.stage_upload(home / "exp" / "c.yaml", cfg, tmp_path / "again") == "exp/c.yaml"
    assert _listing(tmp_path / "again") == got


def test_staged_upload_takes_model_folders_without_pickles_or_hidden_files(tmp_path, monkeypatch):
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    model = home / "models" / "student"
    (model / "sub").mkdir(parents=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "sub/extra.json", "weights.bin", ".token"):
        (model / name).write_text("x")
    raw = yaml.safe_load((home / "exp" / "c.yaml").read_text())
    raw["student"] = {"init": "../models/student"}
    (home / "exp" / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    dest = tmp_path / "staged"
    jobs.stage_upload(Path("exp/c.yaml"), load_config("exp/c.yaml"), dest)
    assert {p for p in _listing(dest) if p.startswith("models/")} == {
        "models/student/config.json", "models/student/diffusion_pytorch_model.safetensors", "models/student/sub/extra.json"}
    (model / ".ssh").mkdir()  # a model folder holding credentials is never uploaded
    with pytest.raises(jobs.JobsError, match="student.init .* refused: it holds"):
        jobs.stage_upload(Path("exp/c.yaml"), load_config("exp/c.yaml"), tmp_path / "again")


class FakeJobsClient:
    """Records what submit would send; looks at the working_dir while it still exists."""

    def __init__(self):
        self.sent, self.files = None, None

    def list_jobs(self):
        return []

    def submit_job(self, **kw):
        self.sent = kw
        self.files = _listing(Path(kw["runtime_env"]["working_dir"]))
        return "raysubmit_fake"


def test_submit_from_a_home_folder_ships_the_package_config_and_data_not_the_home(tmp_path, monkeypatch):
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    cfg = load_config("exp/c.yaml")
    client = FakeJobsClient()
    assert jobs.submit(client, Path("exp/c.yaml"), cfg, ["learner.steps=3"], resume="auto") == "raysubmit_fake"
    env = client.sent["runtime_env"]
    assert "exp/c.yaml" in client.files and "data/shapes/data.csv" in client.files
    assert not any(f.startswith((".ssh", ".aws")) or f == "notes.txt" for f in client.files), client.files
    assert not Path(env["working_dir"]).exists()  # the staging folder is gone once submitted
    mods = [Path(p) for p in env["py_modules"]]
    assert [m.name for m in mods] == list(jobs.PACKAGES) and (mods[1] / "cli.py").is_file()
    assert all(not m.is_relative_to(home) for m in mods)
    assert client.sent["entrypoint"] == ("danceopd train exp/c.yaml --address auto --no-progress --resume auto "
                                         "--set learner.steps=3")

    # --working-dir is an explicit opt-in, and never the home folder or a folder with credentials.
    for wd in (home, Path("/")):
        with pytest.raises(jobs.JobsError, match="refused: it is / or your home folder"):
            jobs.submit(FakeJobsClient(), home / "exp" / "c.yaml", cfg, None, working_dir=wd)
    (home / "exp" / ".git-credentials").write_text("x")
    with pytest.raises(jobs.JobsError, match=r"refused: it holds .*\.git-credentials"):
        jobs.submit(FakeJobsClient(), home / "exp" / "c.yaml", cfg, None, working_dir=home / "exp")
    (home / "exp" / ".git-credentials").unlink()
    client = FakeJobsClient()
    jobs.submit(client, home / "exp" / "c.yaml", cfg, None, working_dir=home / "exp")
    init = {f"demo_init/{p.name}" for p in (home / "exp" / "demo_init").iterdir()}  # the student's model folder
    assert client.files == {"c.yaml", *init} and client.sent["entrypoint"].startswith("danceopd train c.yaml ")


# ---- nothing outside its folders (issue 22, point 6) ---------------------------------------------

EDIT_ROW = 33  # the first local_edit row of configs/data/shapes/data.csv (it has a source image)


def _point_row_at(home: Path, value: str) -> str:
    """Row EDIT_ROW's source_image set to `value`; returns the row's uid."""
    data = home / "data" / "shapes" / "data.csv"
    with data.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rows[EDIT_ROW - 1]["source_image"] = value
    with data.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return rows[EDIT_ROW - 1]["uid"]


@pytest.mark.parametrize("how", ["dotdot", "symlink"])
def test_a_data_row_that_leads_to_a_key_is_refused_naming_row_and_column(tmp_path, monkeypatch, how):
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    if how == "dotdot":
        value = "../../.ssh/id_rsa"
    else:  # an innocent name inside the data folder, linked to the key
        value = "images/innocent.png"
        (home / "data" / "shapes" / value).symlink_to(home / ".ssh" / "id_rsa")
    uid = _point_row_at(home, value)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    cfg = load_config("exp/c.yaml")
    client = FakeJobsClient()
    with pytest.raises(jobs.JobsError) as err:
        jobs.submit(client, Path("exp/c.yaml"), cfg, None)
    msg = str(err.value)
    assert msg.startswith(f"data.path: data.csv row {EDIT_ROW} (uid {uid}) column source_image: {value} resolves "
                          "outside the config's folder, the data file's folder and the model folders"), msg
    assert str(home / ".ssh" / "id_rsa") in msg and "\n" not in msg
    assert client.sent is None  # nothing was submitted
    with pytest.raises(jobs.JobsError):
        jobs.stage_upload(Path("exp/c.yaml"), cfg, tmp_path / "staged")
    assert not any("id_rsa" in f or "innocent" in f for f in _listing(tmp_path / "staged"))


def test_rows_may_reach_into_the_config_folder_and_links_may_stay_inside(tmp_path, monkeypatch):
    """The rule is where a file resolves, not how it is written: `..` into the config's folder and
    a symlink to a file of the data folder are staged."""
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    images = home / "data" / "shapes" / "images"
    shutil.copy(images / "local_edit-00000_src.png", home / "exp" / "src.png")
    _point_row_at(home, "../../exp/src.png")
    (images / "alias.png").symlink_to(images / "local_edit-00000_src.png")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    jobs.stage_upload(Path("exp/c.yaml"), load_config("exp/c.yaml"), tmp_path / "staged")
    assert "exp/src.png" in _listing(tmp_path / "staged")


def test_submit_cli_refuses_a_row_that_leads_to_a_key_in_one_line(tmp_path, monkeypatch):
    """`danceopd submit`: the stand-in key is a real PNG here, so the config validates and only the
    staging check stands between it and the upload."""
    from typer.testing import CliRunner

    from services.cli import app

    home = _home_with_a_job(tmp_path)
    shutil.copy(home / "data" / "shapes" / "images" / "local_edit-00000_src.png", home / ".ssh" / "id_rsa")
    uid = _point_row_at(home, "../../.ssh/id_rsa")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    client = FakeJobsClient()
    monkeypatch.setattr(jobs, "connect", lambda address: client)
    res = CliRunner().invoke(app, ["submit", "exp/c.yaml", "--address", "http://head:8265", "--no-wait"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: data.path: data.csv row {EDIT_ROW} (uid {uid}) column source_image: ../../.ssh/id_rsa resolves outside"), lines
    assert client.sent is None


def test_model_folders_and_the_working_dir_keep_their_links_inside(tmp_path, monkeypatch):
    from danceopd.config import load_config

    home = _home_with_a_job(tmp_path)
    model = home / "models" / "student"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").symlink_to("config.json")  # a link inside the folder: fine
    raw = yaml.safe_load((home / "exp" / "c.yaml").read_text())
    raw["student"] = {"init": "../models/student"}
    (home / "exp" / "c.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home)
    cfg = load_config("exp/c.yaml")
    jobs.stage_upload(Path("exp/c.yaml"), cfg, tmp_path / "ok")
    (model / "sub").mkdir()
    (model / "sub" / "extra.safetensors").symlink_to(home / ".ssh" / "id_rsa")
    with pytest.raises(jobs.JobsError, match=r"^student\.init .*/models/student: sub/extra\.safetensors resolves outside"):
        jobs.stage_upload(Path("exp/c.yaml"), cfg, tmp_path / "staged")
    (model / "sub" / "extra.safetensors").unlink()
    (model / "sub" / "loop").symlink_to(model)  # copytree would never end
    with pytest.raises(jobs.JobsError, match="symlink to a folder above it"):
        jobs.stage_upload(Path("exp/c.yaml"), cfg, tmp_path / "staged2")
    # --working-dir: Ray's packaging follows links too
    (home / "exp" / "key").symlink_to(home / ".ssh" / "id_rsa")
    with pytest.raises(jobs.JobsError, match=r"^--working-dir .*/exp: key resolves outside"):
        jobs.submit(FakeJobsClient(), home / "exp" / "c.yaml", cfg, None, working_dir=home / "exp")


SD35_ON_CLUSTER = ["backend.pretrained", "teachers.1.adapters.realism", "teachers.1.adapters.style", "data.path"]


def test_submit_checks_here_what_lives_here_and_leaves_cluster_paths_to_the_job(tmp_path, monkeypatch):
    """configs/sd35_medium.yaml from a laptop: its /mnt/ models and data are the cluster's, so
    they are not checked here and nothing outside the project is uploaded; a path under no
    cluster prefix, or one that exists here, is still checked here."""
    from danceopd.config import ConfigError, load_config
    from danceopd.validate import cluster_side, validate

    if Path("/mnt/danceopd").exists():
        pytest.skip("/mnt/danceopd exists on this machine: the sd35_medium paths are not the cluster's only")
    monkeypatch.chdir(ROOT)
    cfg = load_config("configs/sd35_medium.yaml")
    assert cluster_side(cfg, ["/mnt/"]) == SD35_ON_CLUSTER
    assert validate(cfg, local_paths=False, cluster_paths=["/mnt/"]) is None  # no dataset read here
    for prefixes in ((), ["/data/"], ["/mnt/danceopd/models/loras"]):
        with pytest.raises(ConfigError, match=r"^backend\.pretrained: model path does not exist"):
            validate(cfg, local_paths=False, cluster_paths=prefixes)
    # Under the prefix but present here: checked here (an empty folder is no pipeline).
    (tmp_path / "pipe").mkdir()
    here = load_config("configs/sd35_medium.yaml", [f"backend.pretrained={tmp_path / 'pipe'}"])
    with pytest.raises(ConfigError, match=r"^backend\.pretrained: .*pipe is not a diffusers pipeline folder"):
        validate(here, local_paths=False, cluster_paths=["/mnt/", str(tmp_path)])
    client = FakeJobsClient()
    jobs.submit(client, Path("configs/sd35_medium.yaml"), cfg, None)
    assert client.files == {"configs/sd35_medium.yaml"}
    assert client.sent["entrypoint"].startswith("danceopd train configs/sd35_medium.yaml --address auto ")


def test_a_dropped_connection_is_one_line():
    from requests.exceptions import ConnectionError as HTTPConnectionError

    class Dropping(FakeJobsClient):
        def get_address(self):
            return "http://head:8265"

        def submit_job(self, **kw):
            raise HTTPConnectionError("('Connection aborted.', RemoteDisconnected('Remote end closed connection'))")

    with pytest.raises(jobs.JobsError, match=r"^Ray Jobs API at http://head:8265: \('Connection aborted\.'"):
        jobs.submit(Dropping(), ROOT / "configs" / "toy.yaml", _toy_cfg(), None)


def _toy_cfg():
    from danceopd.config import load_config

    return load_config(ROOT / "configs" / "toy.yaml")


def test_entrypoints_quote_their_arguments():
    e = jobs.train_entrypoint("configs/my run.yaml", ["job.name=a b", "learner.lr=3e-4"])
    assert shlex.split(e) == ["danceopd", "train", "configs/my run.yaml", "--address", "auto", "--no-progress",
                              "--set", "job.name=a b", "--set", "learner.lr=3e-4"]
    e = jobs.ctl_entrypoint("x;rm -rf /", "scale", 2, {"t2i": 3})
    assert shlex.split(e) == ["danceopd", "ctl", "x;rm -rf /", "scale", "--rollout-workers", "2", "--teachers", "t2i=3"]


def test_parse_ctl_output_takes_the_last_answer():
    logs = "noise\n" + jobs.CTL_BEGIN + '{"ok": false}' + jobs.CTL_END + "\n" + jobs.CTL_BEGIN + \
        '{"ok": true, "result": {"step": 3}}' + jobs.CTL_END + "\ntrailing\n"
    assert jobs.parse_ctl_output(logs) == {"ok": True, "result": {"step": 3}}
    assert jobs.parse_ctl_output("a crash, no answer") is None
    assert jobs.parse_ctl_output(jobs.CTL_BEGIN + "{broken" + jobs.CTL_END) is None


def test_format_status():
    st = {"job": "toy", "state": "running", "step": 12, "steps": 300, "samples_per_s": 512.04, "lag_last": 1, "lag_max": 1, "lag_bound": 1,
          "workers": {"rollout": 2, "learner": 1, "teacher": {"t2i": 1, "local_edit": 2}},
          "last_checkpoint": "/r/checkpoints/step-00000010", "last_step_age_s": 0.25, "output_dir": "/r"}
    text = jobs.format_status(jobs.JobRef("toy", None), st)
    assert text.splitlines() == [
        "job toy: Ray job unknown (not submitted with danceopd submit), controller running",
        "step 12/300  samples/s 512.0  lag 1 (max 1, bound 1)  last step 0.2 s ago",
        "workers: rollout 2, learner 1, teacher t2i=1 local_edit=2",
        "last checkpoint: /r/checkpoints/step-00000010",
        "output: /r",
    ]


# ---- against the real head --------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.subprocess
def test_unknown_job_is_one_line_and_exit_2(head):
    r = cli(head, "status", "no-such-job", "--address", head.address)
    assert r.returncode == 2, r.stderr[-3000:]
    line = error_line(r)
    assert "unknown job 'no-such-job'" in line and "no controller registered" in line
    for args in (["scale", "no-such-job", "--rollout-workers", "2"], ["stop", "no-such-job"]):
        r = cli(head, *args, "--address", head.address)
        assert r.returncode == 2 and "unknown job 'no-such-job'" in error_line(r)


@pytest.mark.ray
@pytest.mark.subprocess
def test_cluster_problems_are_one_line_and_exit_2(head):
    # A client without token auth is refused by the head ("Missing authentication token").
    r = cli(head, "status", "x", "--address", head.address, env=head.client_env(RAY_AUTH_MODE="disabled"))
    assert r.returncode == 2 and "token authentication" in error_line(r)
    # Nothing listening.
    r = cli(head, "status", "x", "--address", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in error_line(r)
    # Bad arguments never reach the cluster.
    r = cli(head, "scale", "x", "--address", head.address)
    assert r.returncode == 2 and "--rollout-workers N and/or --teachers" in error_line(r)
    r = cli(head, "scale", "x", "--teachers", "t2i", "--address", head.address)
    assert r.returncode == 2 and "expected ROUTE=N" in error_line(r)


STUB_DRIVER = textwrap.dedent("""
    # A driver that registers a control API backed by stub callables: it exercises the registry,
    # the helper job and the HTTP/token path; it is not a stand-in for the real controller.
    import json, sys, threading
    import ray
    from services.control.api import ControlServer
    from services.control.registry import lookup, register

    name, address = sys.argv[1], sys.argv[2]
    fleet = {"rollout": 1}
    stopped = threading.Event()

    def status():
        return {"job": name, "state": "running", "step": 7, "steps": 100, "samples_per_s": 3.5, "lag_last": 0, "lag_max": 0, "lag_bound": 0,
                "workers": {"rollout": fleet["rollout"], "learner": 1, "teacher": {"t2i": 1}},
                "last_checkpoint": None, "last_step_age_s": 0.2, "output_dir": "/nowhere"}

    def scale(rollout_workers=None, teachers=None):
        if teachers and set(teachers) - {"t2i"}:
            raise ValueError(f"unknown route {sorted(set(teachers) - {'t2i'})[0]!r} (known: t2i)")
        if rollout_workers is not None:
            fleet["rollout"] = rollout_workers
        return {"rollout_workers": fleet["rollout"]}

    ray.init(address=address, log_to_driver=False)
    server = ControlServer(token="stub-token-" + name, status_fn=status, scale_fn=scale, stop_fn=stopped.set)
    server.start()
    register(name, server.url, server.token)
    try:
        register(name, server.url, server.token)
        dup = "no error"
    except ValueError as e:
        dup = str(e)
    assert lookup(name)["url"] == server.url
    print("READY " + json.dumps({"dup": dup}), flush=True)
    stopped.wait(300)
    server.stop()
    print("STOPPED", flush=True)
""")


@pytest.mark.ray
@pytest.mark.subprocess
def test_control_path_through_helper_jobs(head):
    """CLI -> Jobs API -> helper job on the head -> registry lookup -> control API over loopback."""
    name = f"stub-{uuid.uuid4().hex[:6]}"
    drv = subprocess.Popen([sys.executable, "-c", STUB_DRIVER, name, head.gcs_address], cwd=ROOT,
                           env=head.client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = drv.stdout.readline()
        assert line.startswith("READY"), drv.stderr.read()[-3000:] if drv.poll() is not None else line
        assert "already registered" in json.loads(line.split(" ", 1)[1])["dup"]

        r = cli(head, "status", name, "--address", head.address, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        st = json.loads(r.stdout.strip().splitlines()[-1])
        assert st["job"] == name and st["submission_id"] is None and st["controller"]["step"] == 7
        assert "stub-token" not in r.stdout + r.stderr  # the token stays on the cluster

        r = cli(head, "scale", name, "--rollout-workers", "3", "--address", head.address, "--json")
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"ok": True, "rollout_workers": 3}

        r = cli(head, "scale", name, "--teachers", "nope=2", "--address", head.address)
        assert r.returncode == 2 and "unknown route 'nope'" in error_line(r)

        r = cli(head, "stop", name, "--address", head.address)
        assert r.returncode == 0 and "stopping" in r.stdout, r.stderr[-3000:]
        out, err = drv.communicate(timeout=60)
        assert "STOPPED" in out, err[-3000:]
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
    # The registry actor died with its driver (not detached): the job is unknown again.
    r = cli(head, "status", name, "--address", head.address)
    assert r.returncode == 2 and "no controller registered" in error_line(r)


@pytest.mark.ray
@pytest.mark.subprocess
def test_submit_from_a_laptop_leaves_cluster_paths_to_the_job(head):
    """configs/sd35_medium.yaml submitted from a machine without its /mnt/ folders: accepted, and
    the job fails on the cluster in one line naming the first missing field, before its driver
    even joins the Ray cluster (so before any actor)."""
    if Path("/mnt/danceopd").exists():
        pytest.skip("/mnt/danceopd exists on this machine")
    name = f"laptop-{uuid.uuid4().hex[:6]}"
    r = cli(head, "submit", "configs/sd35_medium.yaml", "--address", head.address, "--no-wait", "--set", f"job.name={name}")
    assert r.returncode == 0 and "error:" not in r.stderr, r.stderr[-3000:]
    assert f"checked by the job on the cluster: {', '.join(SD35_ON_CLUSTER)}" in r.stderr
    sid = r.stdout.strip().splitlines()[-1]
    info = wait_job_end(head, sid, timeout_s=300)
    assert info["status"] == "FAILED" and info["metadata"]["danceopd_job"] == name
    assert info["job_id"] is None, "the driver joined the Ray cluster before its paths were checked"
    logs = ray_job_logs(head, sid)
    errors = [ln for ln in logs.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, logs[-3000:]
    assert errors[0].startswith("error: backend.pretrained: model path does not exist; missing: backend.pretrained "
                                "(/mnt/danceopd/models/stable-diffusion-3.5-medium)"), errors[0]


# ---- end to end: the real controller --------------------------------------------------

def _status(head: RayHead, job: str) -> tuple[int, dict | None, str]:
    r = cli(head, "status", job, "--address", head.address, "--json")
    body = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
    return r.returncode, body, r.stderr


def _wait_status(head: RayHead, job: str, pred, what: str, timeout_s: float = 300) -> dict:
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        rc, body, err = _status(head, job)
        if rc == 0 and body["controller"] and pred(body["controller"]):
            return body
        last = err.strip().splitlines()[-1] if rc else json.dumps(body)
        time.sleep(1)
    raise AssertionError(f"{what}: not reached within {timeout_s} s; last: {last}")


# One teacher for every route and no evaluator: three actors fewer per job (each a process
# importing torch) where the subject is the job's control path, set as a user would with --set.
LEAN = ["--set", "teachers=[{name: teacher, kind: gaussian, std: 0.1, seed: 1}]", "--set", "eval.enabled=false",
        *(x for i in range(3) for x in ("--set", f"routing.routes.{i}.teacher=teacher"))]


def _wait_steps(out_dir: Path, pred, what: str, timeout_s: float = 300) -> dict:
    """The job's last metrics line once `pred` holds for it. The job runs on this machine and
    writes metrics.jsonl each step: waiting on it costs nothing, where each `danceopd status` is a
    helper job on the head whose start competes for the CPU with the job being watched (polled
    every second, it made this file's end-to-end test 230 s)."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            lines = (out_dir / "metrics.jsonl").read_text().splitlines()
        except FileNotFoundError:
            lines = []
        steps = [r for r in map(json.loads, lines) if "loss" in r]  # the learner steps (eval lines apart)
        if steps and pred(last := steps[-1]):
            return last
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached within {timeout_s} s; last step: {last}")


@pytest.mark.ray
@pytest.mark.subprocess
@pytest.mark.slow
def test_end_to_end_submit_status_scale_stop(head, tmp_path):
    """The real controller on the real head: submit a long toy job (the submission as Ray keeps
    it; the same name refused while it runs), watch it, resize its rollout fleet 1 -> 2 -> 1,
    stop it gracefully: SUCCEEDED with a final checkpoint, then a finished job's status and scale."""
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    out_dir = tmp_path / "run"
    sets = ["--set", f"job.name={name}", "--set", f"job.output_dir={out_dir}", "--set", "learner.steps=100000",
            "--set", "rollout.workers=1", "--set", "checkpoint.every=0", "--set", "sync.max_policy_lag=1", *LEAN]
    # A config that does not validate never reaches the cluster.
    r = cli(head, "submit", "configs/toy.yaml", "--address", head.address, "--no-wait", "--set", "learner.steps=0")
    assert r.returncode == 2 and "learner.steps" in error_line(r)

    r = cli(head, "submit", "configs/toy.yaml", "--address", head.address, "--no-wait", *sets)
    assert r.returncode == 0, r.stderr[-3000:]
    sid = r.stdout.strip().splitlines()[-1]
    assert sid.startswith("raysubmit_")
    info = ray_job_info(head, sid)
    assert info["metadata"]["danceopd_job"] == name
    assert shlex.split(info["entrypoint"]) == ["danceopd", "train", "configs/toy.yaml", "--address", "auto", "--no-progress", *sets]
    assert info["runtime_env"]["working_dir"].startswith("gcs://")
    # The same job name may not run twice at once (the controller may still be starting).
    r = cli(head, "submit", "configs/toy.yaml", "--address", head.address, "--no-wait", *sets)
    assert r.returncode == 2 and "already running" in error_line(r)

    _wait_steps(out_dir, lambda m: m["step"] > 0, "first learner step")
    body = _wait_status(head, sid, lambda c: c["step"] > 0, "first learner step, as the controller reports it")
    assert body["job"] == name and body["ray_status"] == "RUNNING"
    c = body["controller"]
    assert c["job"] == name and c["state"] == "running" and c["steps"] == 100000  # never reached: /stop ends it
    assert c["workers"]["rollout"] == 1 and c["workers"]["learner"] == 1

    for n in (2, 1):
        r = cli(head, "scale", sid, "--rollout-workers", str(n), "--address", head.address)
        assert r.returncode == 0, r.stderr[-3000:]
        # the fleet at n, then a step taken after that (each line counts the fleet of its step)
        at_n = _wait_steps(out_dir, lambda m, n=n: m["workers"]["rollout"] == n, f"rollout workers -> {n}", 120)
        _wait_steps(out_dir, lambda m, s=at_n["step"], n=n: m["step"] > s and m["workers"]["rollout"] == n,
                    f"progress with {n} rollout workers", 120)
        if n == 2:  # each `status` is a helper job on the head: by name once
            c = _wait_status(head, name, lambda c: True, "status by job name")["controller"]
            assert c["workers"]["rollout"] == n and c["step"] > at_n["step"], c

    r = cli(head, "stop", sid, "--address", head.address, "--wait")
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert f"job {name} ({sid}): SUCCEEDED" in r.stdout
    info = ray_job_info(head, sid)
    assert info["status"] == "SUCCEEDED"
    ckpts = sorted((out_dir / "checkpoints").glob("step-*"))
    assert ckpts, "no final checkpoint"
    final_step = int(ckpts[-1].name.split("-")[1])
    assert 0 < final_step < 100000
    assert (ckpts[-1] / "model.safetensors").is_file()
    r = cli(head, "status", sid, "--address", head.address)
    assert r.returncode == 0 and f"job {name} ({sid}): Ray job SUCCEEDED, controller not running" in r.stdout
    r = cli(head, "scale", sid, "--rollout-workers", "2", "--address", head.address)
    assert r.returncode == 2 and "is not running (Ray job SUCCEEDED)" in error_line(r)


@pytest.mark.ray
@pytest.mark.subprocess
@pytest.mark.slow
def test_ray_job_stop_is_a_graceful_stop(head, tmp_path):
    """`ray job stop` SIGTERMs the driver: the job finishes its step, writes the final checkpoint
    and exits within RAY_JOB_STOP_WAIT_TIME_S (which submit sets; Ray's default 3 s is too short)."""
    name = f"sigterm-{uuid.uuid4().hex[:6]}"
    out_dir = tmp_path / "run"
    r = cli(head, "submit", "configs/toy.yaml", "--address", head.address, "--no-wait",
            "--set", f"job.name={name}", "--set", f"job.output_dir={out_dir}", "--set", "learner.steps=100000",
            "--set", "checkpoint.every=0", *LEAN)
    assert r.returncode == 0, r.stderr[-3000:]
    sid = r.stdout.strip().splitlines()[-1]
    assert ray_job_info(head, sid)["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "120"
    _wait_steps(out_dir, lambda m: m["step"] > 2, "learner steps")
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", sid, "--address", head.address, "--no-wait"],
                          env=head.client_env(), capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    info = wait_job_end(head, sid, timeout_s=300)
    assert info["status"] == "STOPPED"
    logs = ray_job_logs(head, sid)
    assert "SIGTERM: stopping after step" in logs, logs[-3000:]
    ckpts = sorted((out_dir / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists(), logs[-3000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == int(ckpts[-1].name.split("-")[1]) > 2
