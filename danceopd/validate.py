"""`danceopd validate`: check everything a job needs — config, dataset buckets against routes,
image files, prompts, model folders, writable folders, ports — without loading a single weight.

Every problem is one line that starts with the config key at fault (`learner.lr: ...`,
`data.path: data.csv row 7 (uid x): ...`); `danceopd train` runs the same checks before any actor
starts. Ports 1-1023 are refused for the control API and the metrics endpoint (binding them
needs root, which the controller should not have): use 0 (a free port) or 1024-65535. Their hosts
must resolve to an address this machine can bind, checked before any dataset or model is read;
`local_paths=False` (`validate --remote`, `submit`: the job runs elsewhere) checks their form only.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import re
import socket
from pathlib import Path
from urllib.parse import unquote, urlparse

from danceopd.config import Config, ConfigError, LatentBackendConfig
from danceopd.dataset import Dataset

_KEY = re.compile(r"^([a-z_]+)(\.[\w]+)*:")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MLFLOW_MISSING = "logging.mlflow_uri: MLflow is not installed; pip install 'danceopd[tracking]'"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    msg = text.splitlines()[0] if text else type(err).__name__
    # An unexpected failure (not a ValueError) says what it was.
    return msg if isinstance(err, ValueError) else f"{type(err).__name__}: {msg}"


def _line(key: str, err: Exception) -> str:
    """One line naming `key`, unless the message already starts with a config key."""
    msg = _first_line(err)
    m = _KEY.match(msg)
    return msg if m and m.group(1) in Config.model_fields else f"{key}: {msg}"


def _named(key: str, fn, *args):
    """fn(*args), any exception turned into a ConfigError whose one line names `key`."""
    try:
        return fn(*args)
    except Exception as e:
        raise ConfigError(_line(key, e)) from None


def _model_folder(path: Path, key: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"{key}: model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{key}: {path} has no config.json (expected a save_pretrained folder)")
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"{key}: {path} has no .safetensors weights (pickle checkpoints are refused)")


def _writable_dir(path: Path, key: str) -> None:
    """`path` is a writable folder or can be made one: its first existing ancestor is a writable
    folder. Nothing is created."""
    path = Path(os.path.abspath(path))
    probe = path
    try:
        while not probe.exists():
            if probe.is_symlink():
                raise ConfigError(f"{key}: {probe} is a dangling symlink")
            probe = probe.parent
    except OSError as e:
        raise ConfigError(f"{key}: {probe}: {e.strerror or e}") from None
    if not probe.is_dir():
        raise ConfigError(f"{key}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "folder is not writable" if probe == path else f"folder is not writable, so {path} cannot be created"
        raise ConfigError(f"{key}: {probe}: {what}")


def _tracking(cfg: Config) -> None:
    """`logging.mlflow_uri` on the machine that runs the job: MLflow is installed, and a file store
    (a folder or file:// URI) is a folder this machine can write."""
    uri = cfg.logging.mlflow_uri
    if not uri:
        return
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(MLFLOW_MISSING)
    if "://" not in uri or uri.startswith("file:"):
        _writable_dir(Path(unquote(urlparse(uri).path) if "://" in uri else uri).expanduser(), "logging.mlflow_uri")


def _is_host(host: str) -> bool:
    if host == "":  # every interface
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(host))


def _metrics_port(cfg: Config) -> int:
    """The controller's metrics port as the controller will pick it."""
    if cfg.control.metrics_port is not None:
        return cfg.control.metrics_port
    from services.telemetry.metrics import CONTROLLER_PORT_ENV, controller_port

    try:
        port = controller_port()
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"control.metrics_port: unset, and ${CONTROLLER_PORT_ENV}="
                          f"{os.environ.get(CONTROLLER_PORT_ENV)!r} is not a port")
    return port


def _bindable(host: str, key: str) -> None:
    """`host` resolves, and its first address (the one the server binds) is one of this machine's:
    a socket is bound to it on port 0 and closed at once."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as e:  # socket.gaierror is an OSError
        raise ConfigError(f"{key}: {host!r} cannot be resolved ({getattr(e, 'strerror', None) or e})") from None
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(addr)
    except OSError as e:
        raise ConfigError(f"{key}: {host!r} ({addr[0]}) cannot be bound on this machine ({e.strerror or e})") from None


def _control(cfg: Config, local: bool) -> None:
    """The control API's and metrics' settings; `local`: they bind on this machine, so their hosts
    must resolve and bind here (on a cluster, the head's names and addresses are its own)."""
    c = cfg.control
    for key in ("host", "metrics_host"):
        host = getattr(c, key, "")
        if not _is_host(host):
            raise ConfigError(f"control.{key}: {host!r} is not an IP address or host name")
        if local:
            _bindable(host, f"control.{key}")
    metrics = _metrics_port(cfg)
    for key, port in (("control.port", c.port), ("control.metrics_port", c.metrics_port)):
        if port is not None and 0 < port < 1024:
            raise ConfigError(f"{key}: {port} is a privileged port (below 1024); use 0 (a free port) or 1024-65535")
    if c.port and c.port == metrics:
        source = "control.metrics_port" if c.metrics_port is not None else "the metrics port (control.metrics_port unset)"
        raise ConfigError(f"control.port: {c.port} is also {source}; give them different ports, or 0 (a free port)")
    if not _ENV_NAME.match(c.token_env):
        raise ConfigError(f"control.token_env: {c.token_env!r} is not an environment variable name")


def _teachers_by_task(cfg: Config, backend, method, remote=frozenset()) -> dict[str, tuple]:
    """The built teacher fields that will answer the rows of each routed task (pretrained
    teachers are checked by their folder only: building one loads its weights)."""
    built = {}
    for i, t in enumerate(cfg.teachers):
        if t.kind == "pretrained":
            if (t.path or not backend.pipeline) and f"teachers.{i}.path" not in remote:  # no path: the pipeline's base
                _named(f"teachers.{i}.path", backend.check_model_folder, cfg.resolve(t.path))
            continue
        built[t.name] = _named(f"teachers.{i}.tasks" if t.tasks else f"teachers.{i}",
                               backend.build_teacher, t, Path(cfg.base_dir))
    routes = cfg.routing.routes
    if method.routing == "none":
        return {}
    if method.routing == "mix":  # every route's teacher answers every row
        every = tuple({id(f): f for r in routes if (f := built.get(r.teacher))}.values())
        return {r.task: every for r in routes}
    out: dict[str, dict] = {}
    for r in routes:
        if r.teacher in built:
            out.setdefault(r.task, {})[id(built[r.teacher])] = built[r.teacher]
    return {task: tuple(fields.values()) for task, fields in out.items()}


def model_paths(cfg: Config) -> list[tuple[str, str]]:
    """Every model path the config names (as written), with its key: pipeline, student init,
    LoRA folders, teacher checkpoints and adapters. `validate` checks them, `submit` ships them."""
    out = []
    if isinstance(cfg.backend, LatentBackendConfig):
        out.append(("backend.pretrained", cfg.backend.pretrained))
    if cfg.student.init not in ("random", "base"):
        out.append(("student.init", cfg.student.init))
    if cfg.student.init_lora:
        out.append(("student.init_lora", cfg.student.init_lora))
    for i, t in enumerate(cfg.teachers):
        if t.kind == "pretrained" and t.path:
            out.append((f"teachers.{i}.path", t.path))
        if t.lora:
            out.append((f"teachers.{i}.lora", t.lora))
        for name, folder in (t.adapters or {}).items():
            out.append((f"teachers.{i}.adapters.{name}", folder))
    return out


def on_cluster(path, prefixes) -> bool:
    """An absolute path under one of `prefixes` (the cluster's mount points) that this machine lacks."""
    p = Path(path).expanduser()
    return p.is_absolute() and any(p == Path(x) or Path(x) in p.parents for x in prefixes) and not p.exists()


def cluster_side(cfg: Config, prefixes) -> list[str]:
    """Keys of the model paths and data.path that live on the cluster (`on_cluster`): a submission
    leaves them to the job, whose `train` checks them there before any actor starts."""
    keys = [*model_paths(cfg), ("data.path", cfg.data.path)]
    return [key for key, raw in keys if prefixes and on_cluster(raw, prefixes)]


def _pipeline_models(cfg: Config, remote=frozenset()) -> None:
    """Backends with a pipeline folder (sd3, zimage): every missing model path named at once (a
    cluster config with placeholders shows all it still needs), then each folder checked for what
    its loader reads. Keys in `remote` live on the cluster: not checked here."""
    paths = [(key, cfg.resolve(raw)) for key, raw in model_paths(cfg) if key not in remote]
    missing = [f"{key} ({path})" for key, path in paths if not path.exists()]
    if missing and "data.path" not in remote and not cfg.resolve(cfg.data.path).exists():  # a config of placeholders: say all at once
        missing.append(f"data.path ({cfg.resolve(cfg.data.path)})")
    if missing:
        raise ConfigError(f"{missing[0].split(' ')[0]}: model path does not exist; missing: {', '.join(missing)}")
    from danceopd.lora import check_lora_folder

    for key, path in paths:
        if ".lora" in key or ".adapters." in key or key == "student.init_lora":
            _named(key, check_lora_folder, path)


def validate(cfg: Config, local_paths: bool = True, cluster_paths=()) -> Dataset | None:
    """Raises ConfigError / DatasetError (ValueErrors) with a one-line message naming the key.
    `local_paths=False` skips the folders the job writes (job.output_dir, replay.spill_dir) and
    whether the control and metrics hosts resolve and bind here, for a job that runs on another
    machine. `cluster_paths`: mount prefixes of that machine (e.g. /mnt/);
    model paths, data.path and row images under one that do not exist here are left to the job
    (`cluster_side`), and with them every check that reads them. None when data.path is one."""
    from danceopd.backends import backend_class

    _control(cfg, local=local_paths)  # first: a host that does not resolve fails before anything is read
    remote = frozenset(cluster_side(cfg, cluster_paths))
    pipeline = backend_class(cfg.backend.name).pipeline
    if pipeline:
        _pipeline_models(cfg, remote)
    elif cfg.student.init != "random" and "student.init" not in remote:
        _model_folder(cfg.resolve(cfg.student.init), "student.init")
    for i, t in enumerate(cfg.teachers):
        if t.kind == "pretrained" and not pipeline and f"teachers.{i}.path" not in remote:
            _model_folder(cfg.resolve(t.path), f"teachers.{i}.path")
    if cfg.sync.max_policy_lag < cfg.sync.sync_every - 1:
        raise ConfigError(f"sync.max_policy_lag: {cfg.sync.max_policy_lag} is below sync_every-1 = {cfg.sync.sync_every - 1}; "
                          "samples made between pushes would all be stale")
    if local_paths:
        _writable_dir(cfg.output_path, "job.local_dir" if "://" in cfg.job.output_dir else "job.output_dir")
        _tracking(cfg)
        if cfg.replay.spill_dir:
            _writable_dir(cfg.resolve(cfg.replay.spill_dir), "replay.spill_dir")
    dataset = None if "data.path" in remote else _named("data.path", Dataset.load, cfg.resolve(cfg.data.path))
    if dataset is not None:
        _named("data.path", dataset.check_routes, cfg.routing.routes)
    if pipeline and "backend.pretrained" in remote:
        return dataset  # every check below reads the pipeline's configs: the job makes them on the cluster
    from danceopd.backends import make_backend  # after the cheap checks: backends import model code
    from danceopd.methods import make_method

    backend = _named("backend", make_backend, cfg)
    init = cfg.student_source()
    if not remote & {"student.init", "student.init_lora"}:
        _named("student.init" if init != "random" else "student.lora", backend.check_student, init)
    for i, r in enumerate(cfg.routing.routes):
        if r.requires_source_image and not backend.supports_source_image:
            raise ConfigError(f"routing.routes.{i}.requires_source_image: the {backend.name} backend has no "
                              "image-conditioned path (use zimage or shapes for edits)")
    method = make_method(cfg.method)
    teachers = _teachers_by_task(cfg, backend, method, remote)
    needs_target = method.rollout == "data"  # sft / offpolicy train on the dataset targets
    routed = {r.task for r in cfg.routing.routes}
    for row in dataset.rows if dataset is not None else ():
        if any(img is not None and on_cluster(img, cluster_paths) for img in (row.source_image, row.target_image)):
            continue  # its images are the cluster's
        if row.task in routed:
            try:
                backend.check_row(row, needs_target, teachers.get(row.task, ()))
            except Exception as e:
                msg = _first_line(e).removeprefix(f"row {row.uid}: ")
                raise ConfigError(f"{dataset.where(row)}: {msg}") from None
    return dataset
