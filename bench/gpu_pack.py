"""Pack what a bare GPU machine lacks to run `bench/gpu_check.sh` offline (`make gpu-pack`).

The GPU machines we are lent have Python 3.12, a CUDA torch, transformers, peft, pyarrow and
most of the scientific stack, but no package registry and no Ray, diffusers, DeepSpeed or
pydantic. This script, run where the registry is reachable (and `make setup`'s torch is, to
build DeepSpeed against), writes one archive holding those packages, unpacked as a site folder:

    .gpu-pack/danceopd-gpu-pack.tar.xz      site/ (on PYTHONPATH), bin/ (their scripts), pack.json

- the cp312 manylinux x86_64 wheels of PACK, each at its constraints.txt pin (`pip download
  --no-deps`: the dependencies are listed here, checked by tests/test_gpu_pack.py);
- DeepSpeed, which PyPI has only as source, built here as a pure-Python wheel (DS_BUILD_OPS=0:
  no compiled ops; the learner uses torch's AdamW and JIT-compiles nothing);
- without Ray's Java jars (ray/jars: Ray's Java workers only; a third of Ray's size).

The danceopd code itself travels as the repository (PYTHONPATH). `bench/gpu_check.sh --offline`
unpacks the archive to a temporary folder and runs the check with the machine's own python3.

    python bench/gpu_pack.py [--out .gpu-pack]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = "danceopd-gpu-pack.tar.xz"
PYTHON = "3.12"  # the GPU image's python3
# What the packed set starts from: the job's runtime packages the image lacks. typing_extensions
# is in the image, but pydantic needs a newer one than it may hold (>= 4.16), and it is one file.
ROOTS = ("ray[default]", "diffusers", "deepspeed", "pydantic", "typing_extensions")
# ROOTS and every requirement they reach that the image does not provide (tests/test_gpu_pack.py
# follows the requirements and checks this list against constraints.txt).
PACK = (
    "aiohttp-cors", "annotated-types", "cffi", "colorful", "cryptography", "deepspeed", "diffusers", "distlib",
    "google-api-core", "google-auth", "googleapis-common-protos", "hjson", "importlib-metadata", "jsonschema",
    "jsonschema-specifications", "lazy-importer", "opencensus", "opencensus-context", "opentelemetry-api",
    "opentelemetry-exporter-prometheus", "opentelemetry-proto", "opentelemetry-sdk",
    "opentelemetry-semantic-conventions", "platformdirs", "proto-plus", "py-spy", "pyasn1", "pyasn1-modules",
    "pycparser", "pydantic", "pydantic-core", "python-discovery", "ray", "referencing", "rpds-py", "smart-open",
    "typing-extensions", "typing-inspection", "virtualenv",
)
# Requirements of PACK that the GPU image provides (/work/.library/device/KINDS.md's package list,
# the 'cuda' image): not packed, their own requirements not followed. gpu_check.sh checks they
# are there before it starts.
IMAGE = (
    "aiohttp", "attrs", "click", "einops", "filelock", "grpcio", "huggingface-hub", "msgpack", "ninja", "numpy",
    "packaging", "pillow", "prometheus-client", "protobuf", "psutil", "py-cpuinfo", "pyyaml", "regex", "requests",
    "safetensors", "six", "torch", "tqdm", "wrapt", "zipp",
    # the job's own runtime packages beside them (pyproject's dependencies)
    "matplotlib", "peft", "pyarrow", "rich", "tensorboard", "tokenizers", "transformers", "typer",
)
BUILT = ("deepspeed",)  # no wheel on PyPI: built here
DROP = ("ray/jars/",)  # Ray's Java workers' jars (34 MB)
# The image's glibc is newer than any of these; pip matches each tag exactly.
PLATFORMS = ("manylinux2014_x86_64", "manylinux1_x86_64", *(f"manylinux_2_{n}_x86_64" for n in range(17, 40)))


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins(path: Path = ROOT / "constraints.txt") -> dict[str, str]:
    """{canonical name: version} of constraints.txt's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9][\w.-]*)==(\S+)", line.strip())
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def fetch(wheels: Path, pins: dict[str, str]) -> list[Path]:
    """One wheel per PACK name at its pin in `wheels` (downloaded or built once, then reused)."""
    wheels.mkdir(parents=True, exist_ok=True)
    have = {wheel_name_version(p): p for p in wheels.glob("*.whl")}
    want = {n: pins[n] for n in PACK}
    download = [f"{n}=={v}" for n, v in want.items() if n not in BUILT and (n, v) not in have]
    if download:
        run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--python-version", PYTHON, "--implementation", "cp", *(a for p in PLATFORMS for a in ("--platform", p)),
             "--dest", str(wheels), *download])
    for n in BUILT:
        if (n, want[n]) not in have:
            run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                 "--wheel-dir", str(wheels), f"{n}=={want[n]}"], env={**os.environ, "DS_BUILD_OPS": "0"})
    have = {wheel_name_version(p): p for p in wheels.glob("*.whl")}
    missing = [f"{n}=={v}" for n, v in want.items() if (n, v) not in have]
    if missing:
        raise SystemExit(f"gpu-pack: no wheel for {', '.join(missing)} in {wheels}")
    return [have[(n, v)] for n, v in sorted(want.items())]


def unpack(wheel: Path, site: Path, bin_dir: Path) -> int:
    """Install a wheel the way pip would for PYTHONPATH use: its files into `site` (a `.data`
    folder's purelib/platlib too, its scripts into `bin_dir`), DROP left out, file modes kept
    (Ray's raylet and GCS server are executables). Returns the bytes left out."""
    dropped = 0
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = PurePosixPath(info.filename).parts
            if info.is_dir() or not parts or PurePosixPath(info.filename).is_absolute() or ".." in parts:
                continue
            dest_root, rel = site, PurePosixPath(*parts)
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib", "scripts"):
                    continue
                dest_root, rel = (bin_dir, PurePosixPath(*parts[2:])) if parts[1] == "scripts" else (site, PurePosixPath(*parts[2:]))
            if any(str(rel).startswith(d) for d in DROP):
                dropped += info.file_size
                continue
            dest = dest_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, mode | 0o644 if mode else 0o644)
    return dropped


def pack(out: Path) -> Path:
    pins = constraint_pins()
    unpinned = [n for n in PACK if n not in pins]
    if unpinned:
        raise SystemExit(f"gpu-pack: constraints.txt pins none of {', '.join(unpinned)}")
    if "deepspeed" in BUILT:
        try:
            import torch  # noqa: F401 — DeepSpeed's setup.py imports it (no build isolation)
        except ImportError:
            raise SystemExit(f"gpu-pack: {sys.executable} has no torch to build DeepSpeed against (run `make setup`)") from None
    wheels = fetch(out / "wheels", pins)
    stage = out / "stage"
    shutil.rmtree(stage, ignore_errors=True)
    site, bin_dir = stage / "site", stage / "bin"
    site.mkdir(parents=True)
    bin_dir.mkdir()
    dropped = sum(unpack(w, site, bin_dir) for w in wheels)
    manifest = {"python": PYTHON, "platform": "manylinux x86_64", "packages": {n: pins[n] for n in sorted(PACK)},
                "image": sorted(IMAGE), "dropped": list(DROP)}
    (stage / "pack.json").write_text(json.dumps(manifest, indent=1) + "\n")
    archive = out / ARCHIVE
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for part in ("pack.json", "bin", "site"):
            tar.add(stage / part, arcname=part)
    tmp.replace(archive)
    shutil.rmtree(stage)
    verify(archive, pins)
    mb = archive.stat().st_size / 2**20
    print(f"gpu-pack: {archive} ({mb:.1f} MiB; {len(wheels)} packages, {dropped / 2**20:.0f} MiB of {', '.join(DROP)} left out)")
    return archive


EXECUTABLES = ("site/ray/core/src/ray/raylet/raylet", "site/ray/core/src/ray/gcs/gcs_server")


def verify(archive: Path, pins: dict[str, str] | None = None) -> None:
    """The archive holds every PACK package at its pin (its dist-info), Ray's executables with
    their mode, and no jar; raises SystemExit naming what is wrong."""
    pins = pins or constraint_pins()
    with tarfile.open(archive) as tar:
        members = {m.name: m for m in tar.getmembers()}
    infos = {}
    for name in members:
        m = re.fullmatch(r"site/([^/]+)-([^-/]+)\.dist-info", name)
        if m:
            infos[canonical(m.group(1))] = m.group(2)
    wrong = [f"{n}=={pins[n]} (found {infos.get(n)})" for n in PACK if infos.get(n) != pins[n]]
    jars = [n for n in members if n.endswith(".jar")]
    not_exec = [n for n in EXECUTABLES if n not in members or not members[n].mode & 0o100]
    problems = ([f"packages missing or at other versions: {', '.join(wrong)}"] if wrong else []) + \
        ([f"jars: {', '.join(jars[:3])}"] if jars else []) + ([f"not executable: {', '.join(not_exec)}"] if not_exec else [])
    if problems:
        raise SystemExit(f"gpu-pack: {archive}: {'; '.join(problems)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".gpu-pack", help="folder of the wheels and the archive")
    ap.add_argument("--verify", type=Path, metavar="ARCHIVE", help="only check an archive made before")
    args = ap.parse_args(argv)
    if args.verify:
        verify(args.verify)
        print(f"gpu-pack: {args.verify}: {len(PACK)} packages at their pins, no jar, Ray's executables executable")
    else:
        pack(args.out)


if __name__ == "__main__":
    main()
