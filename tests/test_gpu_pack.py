"""The offline pack of the GPU check (bench/gpu_pack.py): its package list is what the job's
packages need beyond the GPU image, every one pinned; its wheels unpack as pip would put them,
without Ray's jars. (Downloading is not tested here: it needs the registry; `make gpu-pack`.)"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
import tarfile
import zipfile
from importlib import metadata

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_pack", ROOT / "bench" / "gpu_pack.py")
gpu_pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_pack)

# The GPU image's interpreter, for requirement markers (python_version < "3.12" and the like).
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix"}


def reached_beyond_the_image() -> set[str]:
    """Every package ROOTS require, through their requirements as installed here, short of the
    ones the image provides."""
    image = set(gpu_pack.IMAGE)
    found, done, todo = set(), set(), [Requirement(r) for r in gpu_pack.ROOTS]
    while todo:
        req = todo.pop()
        name, extras = gpu_pack.canonical(req.name), frozenset(req.extras)
        if (name, extras) in done or name in image:
            continue
        done.add((name, extras))
        found.add(name)
        for sub in map(Requirement, metadata.distribution(req.name).requires or ()):
            if sub.marker is None or any(sub.marker.evaluate({**TARGET, "extra": e}) for e in extras | {""}):
                todo.append(sub)
    return found


def test_the_pack_is_what_the_roots_need_beyond_the_image():
    found, listed = reached_beyond_the_image(), set(gpu_pack.PACK)
    assert found - listed == set(), f"needed but not packed (add to PACK, or to IMAGE if the image has it): {sorted(found - listed)}"
    assert listed - found == set(), f"packed but needed by none of ROOTS: {sorted(listed - found)}"
    assert not set(gpu_pack.PACK) & set(gpu_pack.IMAGE)


def test_every_packed_package_has_a_pin_and_the_jobs_packages_are_all_there():
    pins = gpu_pack.constraint_pins()
    assert [n for n in gpu_pack.PACK if n not in pins] == []
    assert pins["ray"] == "2.60.0"  # one Ray version cluster-wide (tests/test_pins.py)
    runtime = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    have = set(gpu_pack.PACK) | set(gpu_pack.IMAGE)
    assert [r for r in runtime if gpu_pack.canonical(Requirement(r).name) not in have] == []


def _wheel(path, files: dict[str, tuple[bytes, int]]):
    with zipfile.ZipFile(path, "w") as zf:
        for name, (data, mode) in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFREG | mode) << 16
            zf.writestr(info, data)
    return path


def test_a_wheel_unpacks_as_pip_would_without_the_jars_and_keeps_executables(tmp_path):
    wheel = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", {
        "ray/__init__.py": (b"x = 1\n", 0o644),
        "ray/core/src/ray/raylet/raylet": (b"\x7fELF", 0o755),
        "ray/jars/ray_dist.jar": (b"J" * 1000, 0o644),
        "ray-2.60.0.data/purelib/ray_extra.py": (b"", 0o644),
        "ray-2.60.0.data/scripts/tool": (b"#!/bin/sh\n", 0o755),
        "ray-2.60.0.data/headers/h.h": (b"", 0o644),
        "../escape.py": (b"", 0o644),
        "ray-2.60.0.dist-info/METADATA": (b"Name: ray\nVersion: 2.60.0\n", 0o644),
    })
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    dropped = gpu_pack.unpack(wheel, site, bin_dir)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and p != wheel)
    assert files == ["bin/tool", "site/ray-2.60.0.dist-info/METADATA", "site/ray/__init__.py",
                     "site/ray/core/src/ray/raylet/raylet", "site/ray_extra.py"]
    assert dropped == 1000
    assert os.access(site / "ray/core/src/ray/raylet/raylet", os.X_OK) and os.access(bin_dir / "tool", os.X_OK)
    assert not os.access(site / "ray/__init__.py", os.X_OK)


def test_wheel_names_give_the_canonical_name_and_version():
    assert gpu_pack.wheel_name_version(ROOT / "x" / "smart_open-9.0.4-py3-none-any.whl") == ("smart-open", "9.0.4")
    assert gpu_pack.wheel_name_version(ROOT / "opentelemetry_exporter_prometheus-0.66b2-py3-none-any.whl") == (
        "opentelemetry-exporter-prometheus", "0.66b2")


def test_verify_names_a_missing_package_a_jar_and_a_lost_executable_bit(tmp_path):
    pins = gpu_pack.constraint_pins()

    def archive(skip: str = "", jar: bool = False, exec_mode: int = 0o755):
        site = tmp_path / "site"
        shutil.rmtree(site, ignore_errors=True)
        for n in gpu_pack.PACK:
            if n != skip:
                (site / f"{n.replace('-', '_')}-{pins[n]}.dist-info").mkdir(parents=True)
        for e in gpu_pack.EXECUTABLES:
            p = tmp_path / e
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"\x7fELF")
            p.chmod(exec_mode)
        if jar:
            (site / "ray" / "jars").mkdir(parents=True)
            (site / "ray" / "jars" / "ray_dist.jar").write_bytes(b"J")
        out = tmp_path / "pack.tar.xz"
        with tarfile.open(out, "w:xz") as tar:
            tar.add(site, arcname="site")
        return out

    gpu_pack.verify(archive(), pins)
    with pytest.raises(SystemExit, match=r"pydantic==2\.14\.4 \(found None\)"):
        gpu_pack.verify(archive(skip="pydantic"), pins)
    with pytest.raises(SystemExit, match=r"jars: site/ray/jars/ray_dist\.jar"):
        gpu_pack.verify(archive(jar=True), pins)
    with pytest.raises(SystemExit, match="not executable: site/ray/core/src/ray/raylet/raylet"):
        gpu_pack.verify(archive(exec_mode=0o644), pins)
