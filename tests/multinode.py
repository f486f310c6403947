"""Multi-node scenarios on a simulated cluster (`ray.cluster_utils.Cluster`): a head that runs no
actors (num_cpus 0, as in deploy/kuberay) and one node per worker group, each marked with its
group's custom resource and a `group` node label. Every scenario is a real job of the training
loop (the `sim` backend: latencies are sleeps) driven from this process, the way the head's
driver runs it.

    python -m tests.multinode OUT.json SCENARIO [SCENARIO ...]

runs the scenarios in order on ONE cluster (a scenario that removes a node adds its group's
node back before the next) and writes one JSON object per scenario: the job's summary, where
every actor of the job ran (read back from Ray's GCS actor table) and what the fault did.
tests/test_multinode.py runs it once per pytest session and asserts on the result.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# One node per group. CPUs are logical: the job's reservations, not this machine's cores.
GROUPS = {
    "rollout": {"num_cpus": 3, "resources": {"rollout": 3}},
    "teacher": {"num_cpus": 4, "resources": {"teacher": 4}},
    "learner": {"num_cpus": 2, "resources": {"learner": 2}},
}
# The Ray class names of each role's actors (the GCS actor table's ActorClassName).
ROLE_CLASSES = {"RolloutWorkerActor": "rollout", "TeacherActor": "teacher", "LearnerRankActor": "learner",
                "ScorerActor": "router", "Evaluator": "evaluator", "ConditionCacheBuilder": "cache",
                "ControlRegistry": "registry"}


def job_raw(tmp: Path, name: str, **over) -> dict:
    """The sim job of every scenario: 2 rollout workers, 2 teachers (one on each route set),
    2 learner ranks as one STRICT_PACK gang, the evaluator on the teacher group; every role
    requests its group's resource, as configs/cluster.yaml does."""
    raw = yaml.safe_load((ROOT / "configs" / "sim.yaml").read_text())
    data = tmp / "data" / "toy"
    if not data.exists():
        shutil.copytree(ROOT / "configs" / "data" / "toy", data)
    teacher = {"num_cpus": 1, "resources": {"teacher": 1}, "replicas": 1}
    raw["teachers"] = [dict(t, **teacher) for t in raw["teachers"][:2]]  # t2i, and one for both edits
    raw["routing"]["routes"][2]["teacher"] = raw["teachers"][1]["name"]
    raw["backend"].update(rollout_latency_s=0.15, teacher_latency_s=0.02, learner_latency_s=0.01)
    raw["rollout"] = dict(raw.get("rollout", {}), workers=2, num_cpus=1, resources={"rollout": 1}, max_restarts=3)
    raw["learner"] = dict(raw.get("learner", {}), steps=12, world_size=2, grad_accum=1, num_cpus=1,
                          resources={"learner": 1}, placement_strategy="STRICT_PACK", zero_stage=1)
    raw["routing"] = dict(raw["routing"], num_cpus=0.1, label_selector={"group": "rollout"})
    raw["eval"] = {"enabled": True, "num_cpus": 1, "resources": {"teacher": 1}, "prompts": 1, "teacher": False}
    raw["sync"] = dict(raw.get("sync", {}), max_policy_lag=1)
    raw["replay"] = {"capacity": 8}
    raw["checkpoint"] = {"every": 4, "keep": 2}
    raw["deadlines"] = {"placement_s": 180.0}  # generous: the tests' other files run beside it
    raw["control"] = {"metrics_port": 0}
    raw["job"] = {"name": f"mn-{name}", "seed": 0, "output_dir": str(tmp / name)}
    for key, value in over.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return raw


class Harness:
    def __init__(self):
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        self.nodes = {g: self.add(g) for g in GROUPS}
        self.cluster.wait_for_nodes()

    def add(self, group: str):
        return self.cluster.add_node(**GROUPS[group], labels={"group": group})

    def group_of(self, node_id: str) -> str:
        for g, n in self.nodes.items():
            if n.node_id == node_id:
                return g
        return "head" if node_id == self.cluster.head_node.node_id else f"gone:{node_id[:8]}"

    def lose(self, group: str) -> str:
        """A node vanishes (no graceful shutdown): all its processes die at once."""
        node = self.nodes[group]
        self.cluster.remove_node(node, allow_graceful=False)
        return node.node_id

    def restore(self, group: str) -> None:
        self.nodes[group] = self.add(group)


def actor_ids() -> set[str]:
    import ray._private.state as gcs

    return set(gcs.actors())


def placements(before: set[str], harness: Harness) -> list[dict]:
    """Where every actor of the job started since `before` ran (dead ones included)."""
    import ray._private.state as gcs

    out = []
    for actor_id, a in gcs.actors().items():
        if actor_id in before:
            continue
        role = ROLE_CLASSES.get(a["ActorClassName"].split(".")[-1])
        if role:
            out.append({"role": role, "node": harness.group_of(a["Address"]["NodeID"]), "state": a["State"]})
    return out


def run(cfg_raw: dict, tmp: Path, harness: Harness, fault=None, resume=None, at_step: int = 3) -> dict:
    """One job. The loop runs in a thread; `fault(loop)` runs here, in the main thread (Ray adds
    a node only from there), once the job has taken `at_step` steps."""
    from danceopd.config import config_from_dict
    from services.loop import TrainLoop

    cfg = config_from_dict(cfg_raw, base_dir=tmp)
    res: dict = {"fault": {}}
    t0, before = time.perf_counter(), actor_ids()
    loop = TrainLoop(cfg, "ray", show_progress=False, resume_from=resume)

    def body():
        try:
            res["summary"] = loop.run()
            res["outcome"] = "finished"
        except Exception as e:  # noqa: BLE001 — the scenario reports it
            res["outcome"] = "failed"
            res["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
            res["t_end"] = time.perf_counter()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    try:
        if fault:
            while loop.step < at_step and thread.is_alive():
                time.sleep(0.02)
            if thread.is_alive():
                t_fault, step = time.perf_counter(), loop.step
                res["fault"] = fault(loop, thread) or {}
                res["fault"]["at_step"] = step
        thread.join()
        if fault and "t_end" in res:
            res["fault"]["until_end_s"] = round(res.pop("t_end") - t_fault, 2)
    finally:
        res["status"] = loop.status()
        loop.shutdown()
    res["wall_s"] = round(time.perf_counter() - t0, 2)
    if harness is not None:
        res["placements"] = placements(before, harness)
    return res


def lose_for(h: Harness, group: str, back_after_s: float):
    """A fault: the group's node goes; a node of the group joins `back_after_s` later. Recovery:
    from the loss to the first learner step after every member of the fleet is back."""
    def whole(loop) -> bool:
        f = loop.fleet
        return (len(f.workers()) == loop.cfg.rollout.workers and bool(f.scorer.members)
                and all(len(g.members) == g.spec.members for g in f.teachers.values()))

    def fault(loop, thread):
        t0, lost = time.perf_counter(), h.lose(group)
        while thread.is_alive() and time.perf_counter() < t0 + back_after_s:
            time.sleep(0.05)
        h.restore(group)
        while thread.is_alive() and not whole(loop):
            time.sleep(0.02)
        step = loop.step
        while thread.is_alive() and loop.step == step:
            time.sleep(0.02)
        recovered = round(time.perf_counter() - t0, 2) if thread.is_alive() or loop.step > step else None
        return {"node": lost, "back_after_s": back_after_s, "recovered_s": recovered}
    return fault


def scenario_placement(h: Harness, tmp: Path) -> dict:
    return run(job_raw(tmp, "placement"), tmp, h)


def scenario_rollout_node(h: Harness, tmp: Path) -> dict:
    """The rollout node goes: its workers' tickets are lost and re-issued; their replacements
    (and the router's, pinned to the group) wait for a node of the group; one comes back."""
    # Four orders per worker, in calls of two: the node takes whole calls of several batches with it.
    raw = job_raw(tmp, "rollout-node", learner__steps=16, eval__enabled=False, rollout__orders_per_worker=4)
    return run(raw, tmp, h, lose_for(h, "rollout", 4.0))


def scenario_teacher_node(h: Harness, tmp: Path) -> dict:
    """The teacher node goes: every replica with it; batches wait (parked) or are re-issued."""
    # Calls of two orders: each merged teacher ask carries two batches' rows when the node goes.
    raw = job_raw(tmp, "teacher-node", learner__steps=16, rollout__orders_per_worker=4)
    return run(raw, tmp, h, lose_for(h, "teacher", 3.0))


def scenario_learner_node(h: Harness, tmp: Path) -> dict:
    """The learner node goes: the job fails naming the rank; on a fresh learner node,
    `--resume auto` (the latest checkpoint) finishes it."""
    from danceopd.checkpoint import latest_checkpoint

    raw = job_raw(tmp, "learner-node", learner__steps=16, eval__enabled=False)
    # After the first checkpoint (every 4 steps) is written: there is something to resume from.
    res = run(raw, tmp, h, lambda loop, thread: {"node": h.lose("learner")}, at_step=6)
    h.restore("learner")
    ckpt = latest_checkpoint(Path(raw["job"]["output_dir"]))
    res["resumed_from"] = str(ckpt) if ckpt else None
    if ckpt:
        res["resumed"] = run(raw, tmp, h, resume=ckpt)
    return res


class AutoscalingHarness:
    """A head (num_cpus 0) with Ray's autoscaler over fake nodes (its `fake_multinode` provider
    starts real raylets): a `rollout` node type (min 1, max 3 nodes) and one `base` node for
    the other roles. Started and stopped here by its own GCS port: other Ray clusters on the
    machine are left alone (Ray's AutoscalingCluster would `ray stop --force` them)."""

    IDLE_S = 6  # idle_timeout_minutes 0.1: an idle rollout node goes after about this long

    def __init__(self, tmp: Path):
        import os
        import socket
        import subprocess

        import ray

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        ip = ray._private.services.get_node_ip_address()
        self.address = f"{ip}:{self.port}"
        types = {"ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
                 "rollout": {"resources": {"CPU": 2, "rollout": 2}, "node_config": {}, "min_workers": 1, "max_workers": 3},
                 "base": {"resources": {"CPU": 8, "teacher": 5, "learner": 2}, "node_config": {}, "min_workers": 1,
                          "max_workers": 1}}
        config = {"cluster_name": f"danceopd-{self.port}", "max_workers": 4, "idle_timeout_minutes": self.IDLE_S / 60,
                  "upscaling_speed": 1.0, "head_node_type": "ray.head.default", "available_node_types": types,
                  "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                               "disable_launch_config_check": True, "gcs_address": self.address},
                  "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
                  "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
                  "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
                  "head_start_ray_commands": [], "worker_start_ray_commands": []}
        self.config = tmp / f"autoscaler-{self.port}.json"
        self.config.write_text(json.dumps(config))
        # A loopback test cluster: no token auth on the head or in this driver (`ray start` asks
        # for a token otherwise).
        os.environ["RAY_AUTH_MODE"] = "disabled"
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1"}
        ray_cli = str(Path(sys.executable).parent / "ray")
        subprocess.check_call([ray_cli, "start", "--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                               f"--autoscaling-config={self.config}"], env=env, stdout=subprocess.DEVNULL)

    def rollout_nodes(self) -> int:
        import ray

        return sum(1 for n in ray.nodes() if n["Alive"] and "rollout" in n["Resources"])

    def shutdown(self) -> None:
        """Stop exactly this cluster: every process whose command line names its GCS port or its
        autoscaler config (the head's services, the fake nodes' raylets and workers)."""
        import psutil

        current = Path("/tmp/ray/ray_current_cluster")  # `ray start` left its address for ray.init(): ours goes
        if current.exists() and current.read_text().strip() == self.address:
            current.unlink()
        marks = (str(self.port), str(self.config))
        for p in psutil.process_iter(["cmdline"]):
            if any(m in a for a in (p.info["cmdline"] or []) for m in marks):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def scenario_autoscale(tmp: Path) -> dict:
    """The job starts on the one rollout node; `scale` to 6 workers makes the autoscaler add two
    nodes and the workers join; `scale` back to 2 and the idle nodes go; training goes on."""
    import ray

    h = AutoscalingHarness(tmp)
    try:
        ray.init(address=h.address, log_to_driver=False, namespace="danceopd-multinode",
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}})
        deadline = time.perf_counter() + 120
        while h.rollout_nodes() < 1 or not any(n["Alive"] and "learner" in n["Resources"] for n in ray.nodes()):
            if time.perf_counter() > deadline:
                raise RuntimeError("the autoscaler's minimum nodes never came up")
            time.sleep(0.5)
        raw = job_raw(tmp, "autoscale", learner__steps=100000, checkpoint__every=0, eval__enabled=False,
                      routing__label_selector={}, routing__resources={"teacher": 0.1},
                      autoscale__cluster_autoscaler="on")
        trace: list = []

        def fault(loop, thread):
            def wait_for(what, cond, limit_s=180):
                t0 = time.perf_counter()
                while thread.is_alive() and not cond():
                    if time.perf_counter() - t0 > limit_s:
                        raise RuntimeError(f"{what}: not within {limit_s} s")
                    time.sleep(0.25)
                trace.append({"what": what, "s": round(time.perf_counter() - t0, 1), "step": loop.step,
                              "nodes": h.rollout_nodes(), "workers": len(loop.fleet.workers())})
            steps0 = loop.step
            loop.request_scale(rollout_workers=6)
            wait_for("grown", lambda: len(loop.fleet.workers()) == 6)
            loop.request_scale(rollout_workers=2)
            wait_for("shrunk", lambda: h.rollout_nodes() == 1 and len(loop.fleet.workers()) == 2)
            trained = loop.step - steps0
            loop.request_stop("scenario done")
            return {"trace": trace, "steps_while_scaling": trained, "max_nodes": max(t["nodes"] for t in trace)}

        res = run(raw, tmp, None, fault)
        res["nodes_seen"] = trace
        return res
    finally:
        ray.shutdown()
        h.shutdown()

def sd3_job_raw(tmp: Path) -> dict:
    """A tiny sd3 job (configs/sd3_tiny.yaml on a random pipeline of the real diffusers classes),
    cut to one process per role and 2 steps; every role requests its group's resource."""
    from danceopd.backends.sd3 import write_tiny_sd3

    pipe = tmp / "sd3-pipe"
    if not pipe.exists():
        write_tiny_sd3(pipe, seed=0)
    data = tmp / "data" / "shapes"
    if not data.exists():
        shutil.copytree(ROOT / "configs" / "data" / "shapes", data, ignore=shutil.ignore_patterns(".danceopd-cache"))
    raw = yaml.safe_load((ROOT / "configs" / "sd3_tiny.yaml").read_text())
    raw["backend"]["pretrained"] = str(pipe)
    raw["teachers"] = [dict(raw["teachers"][0], num_cpus=1, resources={"teacher": 1})]  # base_cfg: no LoRA folders
    raw["routing"] = {"routes": [dict(raw["routing"]["routes"][0], weight=1.0)], "num_cpus": 0.1,
                      "label_selector": {"group": "rollout"}}
    raw["method"]["rollout_steps"] = 4
    raw["rollout"] = dict(raw["rollout"], workers=1, num_cpus=1, resources={"rollout": 1})
    raw["learner"] = dict(raw["learner"], steps=2, world_size=1, num_cpus=1, resources={"learner": 1})
    raw["eval"] = {"enabled": True, "num_cpus": 1, "resources": {"teacher": 1}, "prompts": 1, "teacher": False}
    raw["checkpoint"] = {"every": 2, "keep": 1}
    raw["deadlines"] = {"placement_s": 180.0}  # generous: the tests' other files run beside it
    raw["control"] = {"metrics_port": 0}
    raw["job"] = {"name": "mn-sd3-cache", "seed": 0, "output_dir": str(tmp / "sd3-cache")}
    return raw


class ModelWatch:
    """Every diffusers / transformers model instantiated in this process (the driver) while on:
    the objects themselves with `keep`, else their class names (nothing kept alive)."""

    def __init__(self, keep: bool = False):
        self.keep, self.made, self._orig = keep, [], {}

    def __enter__(self):
        from diffusers import ModelMixin
        from transformers import PreTrainedModel

        for base in (ModelMixin, PreTrainedModel):
            self._orig[base] = orig = base.__init__

            def init(obj, *a, _orig=orig, **kw):
                self.made.append(obj if self.keep else type(obj).__name__)
                _orig(obj, *a, **kw)

            base.__init__ = init
        return self

    def __exit__(self, *exc):
        for base, orig in self._orig.items():
            base.__init__ = orig


def live_models() -> list[str]:
    """Class names of the diffusers / transformers / peft modules with weights alive in this
    process (transformers keeps weightless activation modules from import on: not models)."""
    import warnings

    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance on every object touches deprecated torch aliases
        warnings.simplefilter("ignore")
        mods = [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]
    return sorted({type(m).__name__ for m in mods if type(m).__module__.split(".")[0] in ("diffusers", "transformers", "peft")
                   and any(True for _ in m.parameters())})


def scenario_sd3_cache(h: Harness, tmp: Path) -> dict:
    """A latent backend's job from the driver's side, as `danceopd train` runs it (validate, then
    `services.loop.train`): its condition cache is built by an actor on a worker node, and this
    process instantiates no model, validation's weightless (meta) skeletons aside."""
    from danceopd.config import config_from_dict
    from danceopd.validate import validate
    from services.conditions import build_condition_cache
    from services.loop import train

    cfg = config_from_dict(sd3_job_raw(tmp), base_dir=tmp)
    res: dict = {"nodes": {g: n.node_id for g, n in h.nodes.items()}}
    res["cache_before"] = sorted(p.name for p in cfg.resolve("data/shapes").glob(".danceopd-cache/*"))
    with ModelWatch(keep=True) as watch:
        validate(cfg)
    res["validate_models"] = [[type(m).__name__, sorted({p.device.type for p in m.parameters()})] for m in watch.made]
    del watch
    before, log, t0 = actor_ids(), io.StringIO(), time.perf_counter()
    with ModelWatch() as watch, contextlib.redirect_stderr(log):
        try:
            res["summary"] = train(cfg, "ray", show_progress=False)
            res["outcome"] = "finished"
        except Exception:  # noqa: BLE001 — the scenario reports it
            res["outcome"], res["error"] = "failed", traceback.format_exc()
        res["wall_s"] = round(time.perf_counter() - t0, 2)
        n = len(actor_ids())
        res["again_built"] = build_condition_cache(cfg, progress=False, mode="ray")[1]  # current: a no-op
        res["again_actors"] = len(actor_ids()) - n
    res["driver_models_made"] = watch.made
    res["driver_models_live"] = live_models()
    res["placements"] = placements(before, h)
    res["cache_lines"] = [ln for ln in log.getvalue().splitlines() if "condition cache" in ln]
    res["cache_after"] = sorted(p.name for p in cfg.resolve("data/shapes").glob(".danceopd-cache/*"))
    return res


SCENARIOS = {k.removeprefix("scenario_"): v for k, v in globals().items() if k.startswith("scenario_")}
OWN_CLUSTER = {"autoscale"}  # scenarios that bring their own cluster


def main() -> None:
    import os

    import ray

    # Stopped by the test run (tests/background.py sends SIGTERM): unwind, so the cluster is shut down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    out, names = Path(sys.argv[1]), sys.argv[2:]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        sys.exit(f"unknown scenario {sorted(unknown)[0]!r} (known: {', '.join(SCENARIOS)})")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if set(names) & OWN_CLUSTER:
        (name,) = names  # one per process: each starts and stops its own cluster
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            try:
                res = SCENARIOS[name](Path(tmp))
            except Exception:  # noqa: BLE001 — recorded
                res = {"outcome": "crashed", "error": traceback.format_exc()}
            res["scenario_s"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: {res.get('outcome')} in {res['scenario_s']} s", flush=True)
            out.write_text(json.dumps({name: res}, indent=1, default=str))
        return
    h = Harness()
    results = {}
    try:
        ray.init(address=h.cluster.address, log_to_driver=False, namespace="danceopd-multinode",
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}})
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                t0 = time.perf_counter()
                try:
                    results[name] = SCENARIOS[name](h, Path(tmp))
                except Exception:  # noqa: BLE001 — recorded; the next scenario still runs
                    results[name] = {"outcome": "crashed", "error": traceback.format_exc()}
                results[name]["scenario_s"] = round(time.perf_counter() - t0, 1)
                print(f"{name}: {results[name].get('outcome')} in {results[name]['scenario_s']} s", flush=True)
                out.write_text(json.dumps(results, indent=1, default=str))
    finally:
        ray.shutdown()
        h.cluster.shutdown()


if __name__ == "__main__":
    main()
