"""Every shipped cluster config fits both KubeRay manifests (services/deploy_fit.py): roles packed
onto their groups' pods at maxReplicas, the STRICT_PACK learner gang in one pod, nothing on the
head, every path a role reads or writes mounted where it runs; and each way of not fitting is one
line naming the field. Also `danceopd check-fit` and the configs' header comments."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from typer.testing import CliRunner

from danceopd.config import load_config
from services.cli import app
from services.deploy_fit import FitError, check_fit
from services.kuberay import ManifestError, cluster_groups, load_clusters, parse_quantity
from tests.conftest import ROOT

KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml"]
CLUSTER_CONFIGS = ["cluster.yaml", "sd35_medium.yaml", "zimage.yaml"]
CLUSTERS = [(p.name, name, groups) for p in MANIFESTS for name, groups in load_clusters(p)]


def cfg_of(name: str, *overrides: str):
    return load_config(ROOT / "configs" / name, list(overrides))


def raycluster_spec() -> dict:
    (doc,) = [d for d in yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()) if d and d["kind"] == "RayCluster"]
    return copy.deepcopy(doc["spec"])


def groups_of(spec: dict):
    return cluster_groups(spec, "test")


def worker(spec: dict, name: str) -> dict:
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


def test_the_shipped_cluster_configs_are_the_ones_that_request_groups():
    """A new config that asks for a KubeRay group's custom resources joins CLUSTER_CONFIGS."""
    requesting = {p.name for p in (ROOT / "configs").glob("*.yaml") if "resources: {rollout" in p.read_text()}
    assert requesting == set(CLUSTER_CONFIGS)
    assert len(CLUSTERS) == 2, "raycluster.yaml and rayjob.yaml each declare one cluster"


@pytest.mark.parametrize("config", CLUSTER_CONFIGS)
@pytest.mark.parametrize("manifest,cluster,groups", CLUSTERS, ids=[f"{m}" for m, _, _ in CLUSTERS])
def test_shipped_config_fits_the_manifest(config, manifest, cluster, groups):
    cfg = cfg_of(config)
    fit = check_fit(cfg, groups)
    by_group = {g.name: [p for p in fit.pods if p.group is g] for g in groups}
    assert not any(p.items for p in by_group["headgroup"]), "a role on the head"
    (gang,) = [p for p in by_group["learner"] if p.items]  # STRICT_PACK: every rank in one pod
    assert gang.items == [f"learner ({cfg.learner.world_size} ranks)"]
    assert gang.used["GPU"] == cfg.learner.world_size * cfg.learner.num_gpus <= gang.group.resources["GPU"]
    teacher_items = [i for p in by_group["teacher"] for i in p.items]
    assert "evaluator" in teacher_items
    assert teacher_items.count("evaluator") + sum(i.startswith("teacher:") for i in teacher_items) == \
        1 + sum(t.replicas for t in cfg.teachers)
    assert sum(i == "rollout" for p in by_group["rollout"] for i in p.items) == cfg.rollout.workers
    for g in groups:
        for p in by_group[g.name]:
            assert all(p.used[k] <= g.resources[k] + 1e-9 for k in p.used), (g.name, p.used)


@pytest.mark.parametrize("config", CLUSTER_CONFIGS)
def test_header_comment_states_the_cluster_size(config):
    """The header's `= N GPUs ... in M pods` is what the job takes of raycluster.yaml."""
    header = "\n".join(line for line in (ROOT / "configs" / config).read_text().splitlines() if line.startswith("#"))
    m = re.search(r"= (\d+) GPUs\s.*?in (\d+) pods", header.replace("\n#", " "))
    assert m, f"{config}: the header does not state the cluster size it assumes"
    fit = check_fit(cfg_of(config), load_clusters(KUBERAY / "raycluster.yaml")[0][1])
    busy = [p for p in fit.pods if p.items]
    assert (int(m.group(1)), int(m.group(2))) == (sum(p.used.get("GPU", 0) for p in busy), len(busy))


def test_quantities():
    assert [parse_quantity(q) for q in ("16", "500m", "32Gi", "1e3", "2.5G", "1Ki", "0.5")] == \
        [16, 0.5, 32 * 2**30, 1000, 2.5e9, 1024, 0.5]
    with pytest.raises(ManifestError, match="limits.cpu: '4 cores' is not a Kubernetes quantity"):
        parse_quantity("4 cores", "limits.cpu")


def test_the_learner_gang_must_fit_one_pod():
    """The configs' former 4 ranks x 8 CPUs against a 16-CPU learner pod."""
    groups = CLUSTERS[0][2]
    with pytest.raises(FitError, match=r"^learner\.num_cpus: the learner gang \(placement_strategy STRICT_PACK: 4 ranks x "
                                       r"8 CPU.*needs 32 CPU in one pod; a learner pod has 16 CPU$"):
        check_fit(cfg_of("sd35_medium.yaml", "learner.num_cpus=8"), groups)
    # Without STRICT_PACK the ranks are placed one by one: two per pod, and there is one pod.
    with pytest.raises(FitError, match=r"^learner\.world_size: learner ranks do not all fit \(8 CPU, 1 GPU, 1 learner each\)"):
        check_fit(cfg_of("sd35_medium.yaml", "learner.num_cpus=8", "learner.placement_strategy=PACK"), groups)


def test_members_beyond_max_replicas_do_not_fit():
    groups = CLUSTERS[0][2]
    with pytest.raises(FitError, match=r"^rollout\.workers: rollout workers do not all fit .* rollout: 16 pods"):
        check_fit(cfg_of("cluster.yaml", "rollout.workers=17"), groups)
    # 12 teacher pods: 7 + 2 + 2 replicas and the evaluator fill them; one more replica leaves the
    # evaluator (packed last: it asks for fewer CPUs) without a pod.
    check_fit(cfg_of("cluster.yaml", "teachers.0.replicas=7"), groups)
    with pytest.raises(FitError, match=r"^eval: the evaluator does not fit \(1 CPU, 1 GPU, 1 teacher each\); teacher: 12 pods"):
        check_fit(cfg_of("cluster.yaml", "teachers.0.replicas=8"), groups)


def test_undeclared_custom_resource_or_label_is_named():
    groups = CLUSTERS[0][2]
    with pytest.raises(FitError, match=r"^rollout\.resources: no group declares h100 in rayStartParams\.resources"):
        check_fit(cfg_of("cluster.yaml", "rollout.resources={h100: 1}"), groups)
    with pytest.raises(FitError, match=r"^teachers\.1\.label_selector: \{'ray\.io/node-group': 'gpu'\} matches no group"):
        check_fit(cfg_of("cluster.yaml", "teachers.1.label_selector={ray.io/node-group: gpu}"), groups)
    check_fit(cfg_of("cluster.yaml", "teachers.1.label_selector={ray.io/node-group: teacher}"), groups)


def test_nothing_may_land_on_the_head():
    """An evaluator that reserves nothing could start on the 0-CPU head, next to the driver."""
    groups = CLUSTERS[0][2]
    with pytest.raises(FitError, match=r"^eval: one member of the evaluator reserves nothing, which the head pod has too"):
        check_fit(cfg_of("cluster.yaml", "eval.resources={}", "eval.num_cpus=0", "eval.num_gpus=0"), groups)
    # A GPU request keeps it off the GPU-less head, but it may then land in any GPU group, e.g.
    # on the learner pod, whose STRICT_PACK gang needs every GPU: refused, naming the field.
    with pytest.raises(FitError, match=r"^eval: the evaluator may land on pods of rollout, teacher, learner; pin it"):
        check_fit(cfg_of("cluster.yaml", "eval.resources={}", "eval.num_cpus=0", "eval.num_gpus=1"), groups)
    with pytest.raises(FitError, match=r"^routing: the router's scorer may land on pods of rollout, teacher, learner"):
        check_fit(cfg_of("cluster.yaml", "routing.label_selector={}"), groups)


def test_every_pod_mounts_the_paths_its_roles_read():
    spec = raycluster_spec()
    cfg = cfg_of("sd35_medium.yaml")
    check_fit(cfg, groups_of(spec))
    rollout = worker(spec, "rollout")["template"]["spec"]
    rollout["containers"][0]["volumeMounts"] = [m for m in rollout["containers"][0]["volumeMounts"] if m["name"] != "runs"]
    with pytest.raises(FitError, match=r"^backend\.pretrained: /mnt/danceopd/models/stable-diffusion-3\.5-medium is read by "
                                       r"rollout workers, which may run on rollout pods; they mount nothing that holds it"):
        check_fit(cfg, groups_of(spec))
    # The LoRA folders are read by their teacher's replicas (and the evaluator), not by rollouts.
    spec = raycluster_spec()
    teacher = worker(spec, "teacher")["template"]["spec"]["containers"][0]
    teacher["volumeMounts"] = [m for m in teacher["volumeMounts"] if m["name"] != "runs"]
    teacher["volumeMounts"].append({"name": "runs", "mountPath": "/mnt/danceopd/models/stable-diffusion-3.5-medium",
                                    "subPath": "models/stable-diffusion-3.5-medium"})
    with pytest.raises(FitError, match=r"^teachers\.1\.adapters\.realism: /mnt/danceopd/models/loras/sd35m-realism is read by "
                                       r"teacher lora_fields, which may run on teacher pods"):
        check_fit(cfg, groups_of(spec))


def test_writers_need_a_writable_shared_volume():
    spec = raycluster_spec()
    learner = worker(spec, "learner")["template"]["spec"]
    for m in learner["containers"][0]["volumeMounts"]:
        if m["name"] == "runs":
            m["readOnly"] = True
    with pytest.raises(FitError, match=r"^job\.output_dir: /mnt/danceopd/runs/cluster is written by learner ranks on learner "
                                       r"pods, which mount /mnt/danceopd read-only"):
        check_fit(cfg_of("cluster.yaml"), groups_of(spec))
    spec = raycluster_spec()
    learner = worker(spec, "learner")["template"]["spec"]
    learner["volumes"] = [{"name": "runs", "emptyDir": {}} if v["name"] == "runs" else v for v in learner["volumes"]]
    with pytest.raises(FitError, match=r"^job\.output_dir: .* not one shared volume .*headgroup: persistentVolumeClaim "
                                       r"danceopd-runs, learner: emptyDir"):
        check_fit(cfg_of("cluster.yaml"), groups_of(spec))


def test_the_condition_cache_is_written_on_a_rollout_pod():
    """A worker with the rollout role's placement builds the cache (services/conditions.py): the
    rollout pods need its folder writable, and the same folder of the volume as everyone else."""
    spec = raycluster_spec()
    rollout = worker(spec, "rollout")["template"]["spec"]["containers"][0]
    (cache,) = [m for m in rollout["volumeMounts"] if m["mountPath"] == "/mnt/danceopd/cache"]
    cache["readOnly"] = True
    with pytest.raises(FitError, match=r"^backend\.cache_dir: /mnt/danceopd/cache/sd35_medium is written by the condition "
                                       r"cache builder \(rollout placement\) on rollout pods, which mount /mnt/danceopd/cache read-only"):
        check_fit(cfg_of("sd35_medium.yaml"), groups_of(spec))
    cache["readOnly"], cache["subPath"] = False, "elsewhere"
    with pytest.raises(FitError, match=r"^backend\.cache_dir: .* not one shared volume .*rollout: persistentVolumeClaim "
                                       r"danceopd-runs subPath elsewhere"):
        check_fit(cfg_of("sd35_medium.yaml"), groups_of(spec))


def test_check_fit_command():
    res = CliRunner().invoke(app, ["check-fit", str(ROOT / "configs" / "zimage.yaml"), str(KUBERAY / "rayjob.yaml")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("RayJob danceopd-train (") and lines[0].endswith("fits at maxReplicas")
    assert [ln.split(":")[0].strip() for ln in lines[1:]] == ["headgroup", "rollout", "teacher", "learner"]
    assert "pods 8/16 (starts with 8)  24.1/64 CPU  8/16 GPU" in lines[2]
    assert "pods 1/1 (starts with 1)  16/16 CPU  4/4 GPU" in lines[4]
    res = CliRunner().invoke(app, ["check-fit", str(ROOT / "configs" / "zimage.yaml"), str(KUBERAY / "rayjob.yaml"),
                                   "--set", "learner.num_cpus=8"])
    assert res.exit_code == 2
    (line,) = res.output.strip().splitlines()
    assert line.startswith("error: learner.num_cpus: ") and line.endswith("(" + str(KUBERAY / "rayjob.yaml") + ": RayJob danceopd-train)")
    res = CliRunner().invoke(app, ["check-fit", str(ROOT / "configs" / "zimage.yaml"), str(ROOT / "configs" / "toy.yaml")])
    assert res.exit_code == 2 and "holds no RayCluster and no RayJob" in res.output
