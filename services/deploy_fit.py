"""Does a job config fit a KubeRay cluster (`danceopd check-fit CONFIG MANIFEST`)?

At every group's maxReplicas: each role's members (services.runtime.placement.role_specs) are
packed first-fit-decreasing onto the pods of the groups whose pods can hold one member (custom
resources, labels, CPU, GPU, memory); a STRICT_PACK learner gang is one item that must fit in one
pod. No role may be placeable on the head (the driver runs there). Every absolute path a role
reads or writes must be on a volume mounted in each group it may run in (writable where it
writes). Relative paths travel with the job (image or uploaded working_dir) and are not checked.

Which role touches which path, from the code:
  driver (head)   validates every path, reads data.path and the condition cache's fingerprint,
                  writes job.output_dir (checkpoints, metrics) and replay.spill_dir
  the condition cache builder (an actor with the rollout role's placement, so on a pod of the
                  rollout role's groups): writes the condition cache
  every actor that builds the backend (rollout workers, teachers, learner ranks, evaluator):
                  data.path (rows, images: the cache key), backend.pretrained and the condition
                  cache (read)
  student.init / student.init_lora: rollout workers, learner ranks, the evaluator
  teachers[i] path / lora / adapters: that teacher's replicas and the evaluator (it samples
                  every routed teacher once)
  learner ranks write their checkpoint shards into job.output_dir
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from danceopd.config import Config, LatentBackendConfig
from services.kuberay import PodGroup
from services.runtime.placement import RoleSpec, _field, amount, describe, role_specs, unit

DRIVER = "driver"
CACHE = "cache"  # the condition cache builder: an actor placed as the rollout role is
PLACED_AS = {CACHE: "rollout"}
EPS = 1e-9


class FitError(ValueError):
    """The job does not fit: one line naming the config field."""


@dataclass
class Pod:
    group: PodGroup
    used: dict = field(default_factory=dict)
    items: list = field(default_factory=list)

    def room(self, need: dict) -> bool:
        return all(self.used.get(k, 0.0) + v <= self.group.resources.get(k, 0.0) + EPS for k, v in need.items())

    def take(self, need: dict, item: str) -> None:
        for k, v in need.items():
            self.used[k] = self.used.get(k, 0.0) + v
        self.items.append(item)


@dataclass
class Fit:
    pods: list[Pod]
    where: dict[str, list[str]]  # role -> groups it may run in

    def lines(self) -> list[str]:
        out = []
        for g in dict.fromkeys(p.group for p in self.pods):
            mine = [p for p in self.pods if p.group is g]
            if g.head:
                out.append(f"{g.name}: driver only (no role can be placed there)")
                continue
            keys = [k for k, v in g.resources.items() if v]
            used = {k: sum(p.used.get(k, 0.0) for p in mine) for k in keys}
            res = "  ".join(f"{amount(k, used[k])}/{amount(k, g.resources[k] * g.max_pods)} {unit(k)}" for k in keys)
            roles: dict[str, int] = {}
            for p in mine:
                for item in p.items:
                    roles[item] = roles.get(item, 0) + 1
            who = ", ".join(f"{r} x{n}" for r, n in roles.items()) or "nothing"
            busy = sum(1 for p in mine if p.items)
            out.append(f"{g.name}: pods {busy}/{g.max_pods} (starts with {g.replicas})  {res}  <- {who}")
        return out


def _custom(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory")}


def role_name(role: str) -> str:
    if role.startswith("teacher:"):
        return f"teacher {role.split(':', 1)[1]}"
    return {"rollout": "rollout workers", "learner": "learner ranks", "evaluator": "the evaluator",
            "router": "the router's scorer", DRIVER: "the driver",
            CACHE: "the condition cache builder (rollout placement)"}.get(role, role)


def _count_field(cfg: Config, role: str) -> str:
    key = _field(cfg, role)
    return {"rollout": "rollout.workers", "learner": "learner.world_size"}.get(role, f"{key}.replicas" if role.startswith("teacher:") else key)


def candidates(spec: RoleSpec, need: dict, groups: list[PodGroup]) -> list[PodGroup]:
    """Groups whose one pod carries the role's labels and holds `need`."""
    return [g for g in groups if spec.label_selector.items() <= g.labels.items()
            and all(g.resources.get(k, 0.0) + EPS >= v for k, v in need.items())]


def _misfit(cfg: Config, role: str, spec: RoleSpec, need: dict, groups: list[PodGroup], what: str) -> FitError:
    """Why no group can hold `need`, naming the field that asks too much."""
    key = _field(cfg, role)
    labelled = [g for g in groups if spec.label_selector.items() <= g.labels.items()]
    if not labelled:
        return FitError(f"{key}.label_selector: {spec.label_selector} matches no group's pods "
                        f"({', '.join(f'{g.name}: {g.labels}' for g in groups)})")
    custom = list(_custom(need))
    declaring = [g for g in labelled if all(g.resources.get(k, 0.0) > 0 for k in custom)]
    if not declaring:
        declared = "; ".join(f"{g.name}: {describe(_custom(g.resources))}" for g in labelled)
        return FitError(f"{key}.resources: no group declares {', '.join(custom)} in rayStartParams.resources "
                        f"(declared: {declared})")
    for k in need:
        if all(g.resources.get(k, 0.0) + EPS < need[k] for g in declaring):
            attr = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory_gb"}.get(k, f"resources.{k}")
            pods = "; ".join(f"a {g.name} pod has {describe({k: g.resources.get(k, 0.0)})}" for g in declaring)
            return FitError(f"{key}.{attr}: {what} needs {describe({k: need[k]})} in one pod; {pods}")
    raise AssertionError("a misfit with no field at fault")  # candidates() and this walk disagree


def place(cfg: Config, groups: list[PodGroup]) -> Fit:
    """Pack every role's members onto the pods at maxReplicas; FitError names the field at fault."""
    specs = role_specs(cfg)
    if cfg.autoscale.enabled:  # the controller may grow the fleet to its bound
        specs["rollout"] = dataclasses.replace(specs["rollout"], members=cfg.autoscale.max_rollout_workers)
    items, where = [], {}
    for role, spec in specs.items():
        gang = role == "learner" and spec.strategy == "STRICT_PACK" and spec.members > 1
        need = {k: v * spec.members for k, v in spec.bundle.items()} if gang else spec.bundle
        what = (f"the learner gang (placement_strategy STRICT_PACK: {spec.members} ranks x {describe(spec.bundle)})"
                if gang else f"one of {role_name(role)}")
        fits = candidates(spec, need, groups)
        if not fits:
            raise _misfit(cfg, role, spec, need, groups, what)
        head = [g for g in fits if g.head]
        if head:
            raise FitError(f"{_field(cfg, role)}: one member of {role_name(role)} reserves {describe(spec.bundle)}, which the "
                           f"head pod has too ({head[0].where}): Ray may start it next to the driver; give the role custom "
                           "resources of a worker group (e.g. resources: {teacher: 1}) or a CPU / GPU the head lacks")
        if len(fits) > 1:  # e.g. a 0.1-CPU scorer on the learner pod leaves a STRICT_PACK gang unplaceable
            raise FitError(f"{_field(cfg, role)}: {role_name(role)} may land on pods of {', '.join(g.name for g in fits)}; "
                           "pin it to one group (label_selector {ray.io/node-group: NAME} or that group's custom resource), "
                           "or it can take the room another role's members need")
        where[role] = [g.name for g in fits]
        spread = role == "learner" and spec.strategy == "STRICT_SPREAD"
        label = f"{role} ({spec.members} ranks)" if gang else role
        for _ in range(1 if gang else spec.members):
            items.append((label, need, fits, spread, spec.members))
    pods = [Pod(g) for g in groups for _ in range(g.max_pods)]

    def size(item):  # largest first: GPUs, then CPUs, memory, custom resources
        need = item[1]
        return (need.get("GPU", 0.0), need.get("CPU", 0.0), need.get("memory", 0.0), sum(need.values()))

    for label, need, fits, spread, members in sorted(items, key=size, reverse=True):
        role = label.split(" ")[0]
        # First fit over the pods already holding something, then a new pod (as the autoscaler adds one).
        order = [p for p in pods if p.items] + [p for p in pods if not p.items]
        pod = next((p for p in order if p.group in fits and p.room(need) and not (spread and role in p.items)), None)
        if pod is None:
            full = "; ".join(f"{g.name}: {g.max_pods} pods of {describe(g.resources)} at maxReplicas, holding "
                             f"{', '.join(sorted(set(i for p in pods if p.group is g for i in p.items))) or 'nothing'}"
                             for g in fits)
            verb = "do not all fit" if members > 1 else "does not fit"
            raise FitError(f"{_count_field(cfg, role)}: {role_name(role)} {verb} ({describe(need)} each); {full}")
        pod.take(need, label)
    return Fit(pods, where)


@dataclass(frozen=True)
class PathUse:
    key: str  # the config field
    path: str
    readers: frozenset
    writers: frozenset


def path_uses(cfg: Config, roles) -> list[PathUse]:
    """Every absolute path of the job, with the roles (of `roles`, plus the driver) that read or write it."""
    from danceopd.validate import model_paths

    teachers = {r for r in roles if r.startswith("teacher:")}
    builders = {"rollout", "learner", "evaluator", *teachers} & set(roles)  # actors that build the backend
    student = {"rollout", "learner", "evaluator"} & set(roles)
    out = []

    def use(key: str, raw: str | None, readers=(), writers=()):
        if raw and PurePosixPath(raw).is_absolute():
            out.append(PathUse(key, str(PurePosixPath(raw)), frozenset({DRIVER, *readers}), frozenset(writers)))

    for key, raw in model_paths(cfg):
        if key.startswith("teachers."):
            name = cfg.teachers[int(key.split(".")[1])].name
            use(key, raw, {f"teacher:{name}", "evaluator"} & set(roles))
        else:
            use(key, raw, builders if key == "backend.pretrained" else student)
    use("data.path", cfg.data.path, builders)
    if isinstance(cfg.backend, LatentBackendConfig):  # a worker builds the condition cache, actors map it
        cache = cfg.backend.cache_dir or str(PurePosixPath(cfg.data.path).parent / ".danceopd-cache")
        use("backend.cache_dir" if cfg.backend.cache_dir else "data.path", cache, builders, {CACHE})
    use("job.output_dir", cfg.job.output_dir, {"learner"} & set(roles), {DRIVER, *({"learner"} & set(roles))})
    use("replay.spill_dir", cfg.replay.spill_dir, (), {DRIVER})
    return out


def check_mounts(cfg: Config, groups: list[PodGroup], where: dict[str, list[str]]) -> None:
    by_name = {g.name: g for g in groups}
    head = next(g for g in groups if g.head)
    for u in path_uses(cfg, where):
        seen = {}
        for role in [r for r in (DRIVER, CACHE, *where) if r in u.readers | u.writers]:
            for gname in [head.name] if role == DRIVER else where[PLACED_AS.get(role, role)]:
                g = by_name[gname]
                m = g.mount_for(u.path)
                verb = "written" if role in u.writers else "read"
                if m is None:
                    mounted = ", ".join(f"{x.path} ({x.volume})" for x in g.mounts) or "nothing"
                    raise FitError(f"{u.key}: {u.path} is {verb} by {role_name(role)}, which may run on {g.name} pods; "
                                   f"they mount nothing that holds it (mounts: {mounted}; {g.where})")
                if verb == "written" and m.read_only:
                    raise FitError(f"{u.key}: {u.path} is written by {role_name(role)} on {g.name} pods, which mount "
                                   f"{m.path} read-only ({g.where})")
                seen[g.name] = m
        # One volume, and the same folder of it (a subPath mount shifts where a path lands).
        sources = {(m.source, m.in_volume(u.path)) for m in seen.values()}
        if len(sources) > 1 or (len(seen) > 1 and any(s.startswith("emptyDir") for s, _ in sources)):
            raise FitError(f"{u.key}: {u.path} is not one shared volume across the pods that use it "
                           f"({', '.join(f'{g}: {m.source}' + (f' subPath {m.sub_path}' if m.sub_path else '') for g, m in seen.items())})")


def check_fit(cfg: Config, groups: list[PodGroup]) -> Fit:
    """Place the job on the cluster at maxReplicas and check its paths; FitError if it does not fit."""
    fit = place(cfg, groups)
    check_mounts(cfg, groups, fit.where)
    return fit
