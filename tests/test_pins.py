"""One set of pins: Ray's version in pyproject.toml, constraints.txt, deploy/Dockerfile and the
KubeRay manifests' rayVersion agree; constraints.txt pins the dependency set the tests run; the
Makefile and the image install with it, torch apart (CPU wheels by default, CUDA in the GPU image)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = map(Requirement, project()["dependencies"] + project()["optional-dependencies"]["dev"])
    return {canonicalize_name(r.name): r for r in reqs}


def constraints(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """{name: version} of constraints.txt; every line must be an exact pin."""
    pins = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==(\S+)", line.strip())
            assert m, f"constraints.txt: {line!r} is not a name==version pin"
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def make_vars() -> dict[str, str]:
    text = (ROOT / "Makefile").read_text()
    return dict(re.findall(r"^(\w+)\s*[?:]?=\s*(.*?)\s*$", text, flags=re.M))


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def docker_args() -> dict[str, str]:
    args = [a.split("=", 1) for op, a in dockerfile() if op == "ARG"]
    return {a[0]: a[1].strip('"') if len(a) > 1 else "" for a in args}


def documented_gpu_build_args() -> dict[str, str]:
    """The --build-arg values of the header comment's GPU `docker build` command."""
    header = "".join(line.lstrip("#") for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))
    gpu = header.split("GPU:", 1)[1].split("docker build", 2)[1]  # that one command
    return dict(re.findall(r"--build-arg\s+(\w+)=(\S+)", gpu))


def ray_versions_of_manifests() -> dict[str, str]:
    found = {}
    for p in sorted((ROOT / "deploy" / "kuberay").glob("*.yaml")):
        for d in yaml.safe_load_all(p.read_text()):
            if d and d["kind"] in ("RayCluster", "RayJob"):
                spec = d["spec"] if d["kind"] == "RayCluster" else d["spec"]["rayClusterSpec"]
                found[f"{p.name} {d['kind']}"] = spec["rayVersion"]
    return found


def pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"pyproject: {req} is not an exact pin"
    return spec.version


def test_one_ray_version_everywhere():
    ray = pinned(pyproject_requirements()["ray"])
    assert "default" in pyproject_requirements()["ray"].extras  # the dashboard and metrics agent
    found = {"constraints.txt": constraints()["ray"], "Dockerfile ARG RAY_VERSION": docker_args()["RAY_VERSION"],
             **ray_versions_of_manifests()}
    assert len(found) >= 4, found  # both manifests were read
    assert {k: v for k, v in found.items() if v != ray} == {}, f"pyproject pins ray=={ray}"
    runs = [a for op, a in dockerfile() if op == "RUN"]
    assert any('"ray[default]==${RAY_VERSION}"' in r for r in runs), "the image does not install RAY_VERSION"


def test_constraints_pin_the_project_dependencies():
    pins = constraints()
    assert "torch" not in pins, "torch comes from the build's torch index, not constraints.txt"
    assert "danceopd" not in pins
    assert "deepspeed" in pins
    for name, req in pyproject_requirements().items():
        if name == "torch":
            continue
        assert name in pins, f"constraints.txt lacks {name} (make constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name}=={pins[name]} violates {req}"


def test_the_tests_run_the_pinned_set():
    """What this environment has installed is what constraints.txt pins (make setup installs with
    it; after an upgrade, `make constraints`), and torch is the Makefile's TORCH_SPEC."""
    drift = {}
    for name, version in constraints().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            drift[name] = f"{have} installed, {version} pinned"
    assert not drift, f"installed set differs from constraints.txt (make setup, or make constraints): {drift}"
    want = Requirement(make_vars()["TORCH_SPEC"])
    assert Version(metadata.version("torch")).public in want.specifier, want


def test_setup_installs_with_the_constraints():
    v = make_vars()
    assert v["CONSTRAINTS"] == "constraints.txt"
    assert v["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    recipe = re.search(r"^\$\(STAMP\):(.*?)\n\n", (ROOT / "Makefile").read_text(), flags=re.M | re.S).group(1)
    assert "$(CONSTRAINTS)" in recipe.splitlines()[0], "setup does not rerun when the pins change"
    installs = re.findall(r"pip install ([^\n;|&]*)", recipe)
    torch = [i for i in installs if "$(TORCH_SPEC)" in i]
    torch_line = next(line for line in recipe.splitlines() if '"$(TORCH_SPEC)"' in line)
    # the extra index only where it answers (deploy/reachable.py): else pip retries it per package
    assert len(torch) == 1 and "deploy/reachable.py $(TORCH_INDEX_URL) && echo --extra-index-url $(TORCH_INDEX_URL)" in torch_line
    assert all("-c $(CONSTRAINTS)" in i for i in installs if i not in torch), installs
    assert any('-e ".[dev]"' in i for i in installs) and any("deepspeed" in i for i in installs)


def test_dockerfile_cpu_defaults_and_documented_cuda_build():
    args = docker_args()
    assert {"BASE_IMAGE", "TORCH_SPEC", "TORCH_INDEX_URL", "RAY_VERSION"} <= set(args)
    assert not args["BASE_IMAGE"].startswith("nvidia/"), "the default image is the CPU one"
    assert args["TORCH_INDEX_URL"] == make_vars()["TORCH_INDEX_URL"], "the CPU index of make setup"
    assert args["TORCH_SPEC"] == make_vars()["TORCH_SPEC"], "the image and make setup pin different torches"
    gpu = documented_gpu_build_args()
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)[\d.]*-\S+", gpu.get("BASE_IMAGE", ""))
    assert base, f"the documented GPU build names no nvidia/cuda base: {gpu}"
    index = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", gpu.get("TORCH_INDEX_URL", ""))
    assert index, f"the documented GPU build names no CUDA torch index: {gpu}"
    assert index.group(1) == base.group(1) + base.group(2), "torch's CUDA differs from the base image's"
    runs = [a for op, a in dockerfile() if op == "RUN" and "pip install" in a]
    torch = [r for r in runs if "${TORCH_SPEC}" in r]
    assert len(torch) == 1 and '--index-url "${TORCH_INDEX_URL}"' in torch[0], torch
    others = [c for r in runs if r not in torch for c in r.split("&&") if "pip install" in c]
    assert others and all("-c constraints.txt" in c for c in others), others
    copied = [a.split()[:-1] for op, a in dockerfile() if op == "COPY"]
    assert any("constraints.txt" in srcs for srcs in copied), "the image does not COPY constraints.txt"


def test_constraints_parser_refuses_a_loose_line(tmp_path):
    (tmp_path / "c.txt").write_text("# header\nray==2.60.0\nnumpy>=1\n")
    with pytest.raises(AssertionError, match="'numpy>=1' is not a name==version pin"):
        constraints(tmp_path / "c.txt")
