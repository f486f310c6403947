"""KubeRay manifests as Ray's scheduler sees them: for each group (the head and every worker
group) how many pods it can have, what one pod advertises to Ray, its node labels and what it
mounts where. `services.deploy_fit` checks a job config against this.

One pod advertises what KubeRay's `ray start` gives it: `num-cpus` / `num-gpus` / `memory` from
rayStartParams, else the container's limits (requests when no limit; CPUs rounded up, as KubeRay
does), custom resources from rayStartParams `resources`, and the label `ray.io/node-group` = the
group's name (KubeRay sets RAY_NODE_TYPE_NAME, which Ray turns into that label; the head's
group is `headgroup`) plus rayStartParams `labels`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

HEAD_GROUP = "headgroup"
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_QUANTITY = re.compile(r"^([+-]?(?:\d+\.?\d*|\.\d+))(?:([eE][+-]?\d+)|(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE])?)$")


class ManifestError(ValueError):
    """A manifest this module cannot read; one line naming the manifest field."""


def parse_quantity(q, where: str = "quantity") -> float:
    """A Kubernetes quantity (`16`, `500m`, `32Gi`, `1e3`, `2.5G`) as a number."""
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ManifestError(f"{where}: {q!r} is not a Kubernetes quantity (e.g. 4, 500m, 32Gi)")
    number, exponent, suffix = m.groups()
    if exponent:
        return float(number + exponent)
    return float(number) * (_BINARY.get(suffix or "") or _DECIMAL[suffix or ""])


@dataclass(frozen=True)
class Mount:
    path: str  # mountPath
    volume: str  # the pod's volume name
    source: str  # what the volume is, e.g. `persistentVolumeClaim danceopd-runs`, `emptyDir`
    read_only: bool
    sub_path: str = ""  # the volume's folder mounted at `path` ("" = its root)

    def in_volume(self, path: str) -> str:
        """Where absolute `path` (under this mount) is inside the volume."""
        return str(PurePosixPath("/", self.sub_path, PurePosixPath(path).relative_to(self.path)))


@dataclass(frozen=True, eq=False)  # one object per group: compared and hashed by identity
class PodGroup:
    name: str  # groupName (`headgroup` for the head)
    max_pods: int  # maxReplicas (1 for the head)
    replicas: int  # pods at start
    resources: dict  # one pod as Ray sees it: CPU, GPU, memory (bytes), custom resources
    labels: dict
    mounts: tuple[Mount, ...]
    where: str  # the manifest field, for messages

    @property
    def head(self) -> bool:
        return self.name == HEAD_GROUP

    def mount_for(self, path: str) -> Mount | None:
        """The mount that holds absolute `path` (the deepest mountPath above it), if any."""
        p = PurePosixPath(path)
        held = [m for m in self.mounts if p == PurePosixPath(m.path) or PurePosixPath(m.path) in p.parents]
        return max(held, key=lambda m: len(PurePosixPath(m.path).parts), default=None)


def _start_param_resources(raw, where: str) -> dict:
    """rayStartParams `resources`: a JSON object, usually written quoted ('"{\\"gpu_a\\": 1}"')."""
    text = str(raw).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":  # the shell quoting KubeRay's examples use
        text = text[1:-1].replace('\\"', '"')
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: {raw!r} is not a JSON object of custom resources")
    return {str(k): float(v) for k, v in obj.items()}


def _labels(raw, where: str) -> dict:
    """rayStartParams `labels`: `k=v,k2=v2` (or a JSON object)."""
    text = str(raw).strip()
    if text.startswith("{"):
        return {str(k): str(v) for k, v in json.loads(text).items()}
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep:
            raise ManifestError(f"{where}: {item!r} is not key=value")
        out[k.strip()] = v.strip()
    return out


def _volume_source(vol: dict) -> str:
    kind = next((k for k in vol if k != "name"), "unknown")
    spec = vol.get(kind) or {}
    name = spec.get("claimName") or spec.get("name") or spec.get("path") or spec.get("server") or ""
    return f"{kind} {name}".strip()


def pod_group(group: dict, name: str, where: str, head: bool = False) -> PodGroup:
    params = group.get("rayStartParams") or {}
    pod = group["template"]["spec"]
    c = pod["containers"][0]  # the Ray container: KubeRay runs `ray start` in the first one
    res = c.get("resources") or {}
    limits, requests = res.get("limits") or {}, res.get("requests") or {}

    def amount(param: str, key: str, ceil: bool = False) -> float:
        if param in params:
            return parse_quantity(params[param], f"{where}.rayStartParams.{param}")
        q = limits.get(key, requests.get(key))
        if q is None:
            return 0.0
        v = parse_quantity(q, f"{where}.template.spec.containers[0].resources.limits.{key}")
        return float(math.ceil(v)) if ceil else v

    resources = {"CPU": amount("num-cpus", "cpu", ceil=True), "GPU": amount("num-gpus", "nvidia.com/gpu"),
                 "memory": amount("memory", "memory")}
    if "resources" in params:
        resources.update(_start_param_resources(params["resources"], f"{where}.rayStartParams.resources"))
    labels = {"ray.io/node-group": name}
    if "labels" in params:
        labels.update(_labels(params["labels"], f"{where}.rayStartParams.labels"))
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    mounts = tuple(Mount(m["mountPath"], m["name"], _volume_source(volumes.get(m["name"], {"name": m["name"]})),
                         bool(m.get("readOnly", False)), str(m.get("subPath", "")).strip("/"))
                   for m in c.get("volumeMounts") or [])
    pods = 1 if head else int(group.get("maxReplicas", group.get("replicas", 1)))
    start = 1 if head else int(group.get("replicas", group.get("minReplicas", 0)))
    return PodGroup(name, pods, start, resources, labels, mounts, where)


def cluster_groups(spec: dict, where: str) -> list[PodGroup]:
    """The head and every worker group of one RayCluster spec."""
    groups = [pod_group(spec["headGroupSpec"], HEAD_GROUP, f"{where}.headGroupSpec", head=True)]
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        groups.append(pod_group(g, g["groupName"], f"{where}.workerGroupSpecs[{i}] ({g['groupName']})"))
    return groups


def load_clusters(path: Path) -> list[tuple[str, list[PodGroup]]]:
    """(name, groups) of every Ray cluster a manifest file declares: each RayCluster, and the
    cluster of each RayJob (spec.rayClusterSpec)."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as e:
        raise ManifestError(f"{path}: {str(e).splitlines()[0]}") from None
    out = []
    for d in docs:
        kind, name = d.get("kind"), (d.get("metadata") or {}).get("name", "?")
        if kind == "RayCluster":
            out.append((f"RayCluster {name}", cluster_groups(d["spec"], f"{Path(path).name}: RayCluster {name} spec")))
        elif kind == "RayJob" and "rayClusterSpec" in d.get("spec", {}):
            out.append((f"RayJob {name}", cluster_groups(d["spec"]["rayClusterSpec"],
                                                         f"{Path(path).name}: RayJob {name} spec.rayClusterSpec")))
    if not out:
        raise ManifestError(f"{path}: holds no RayCluster and no RayJob with a rayClusterSpec")
    return out
