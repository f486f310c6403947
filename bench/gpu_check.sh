#!/usr/bin/env bash
# GPU check of the sd3 backend (not part of the tests), on SD3-class pipelines of the real
# diffusers classes with random weights, in bf16 (`backend.dtype`), in under 8 minutes on one GPU:
#   1. local_bf16      --mode local, a ~0.3 B pipeline (12 blocks x 16 heads x 64), 256 px;
#   2. ray_fractions   --mode ray, the same pipeline, 2 rollout workers, every role on a fraction of
#                      the GPU, object-store weight sync;
#   3. sd35m_512       --mode local, an SD3.5-Medium-shaped transformer (24 blocks x 24 heads x 64,
#                      ~2 B), 512 px: with the tiny pipeline's VAE (factor 4) that is 64 x 64
#                      patches, the sequence SD3.5-Medium trains on at 1024 px; gradient checkpointing;
#   4. bf16_collective --mode ray with the `collective` weight transport (NCCL), only with >= 3 GPUs
#                      (NCCL puts one rank per GPU: the learner and both workers).
# Each prints samples/s per role, the learner's mean step, weight-sync seconds and the peak GPU
# memory per role (summary.json); all of them land in $RUNS/figures.jsonl.
#
#   bash bench/gpu_check.sh                  # with .venv (`make setup TORCH_SPEC=torch` and a CUDA torch)
#   bash bench/gpu_check.sh --offline [PACK] # a bare GPU machine: its own python3 and CUDA torch, the
#                                            # rest from `make gpu-pack` (default .gpu-pack/danceopd-gpu-pack.tar.xz)
# Without .venv and with the pack present, --offline is the default. Environment: RUNS (default
# runs/gpu_check), STEPS (learner steps of runs 1, 2, 4; default 20), BIG_STEPS (run 3; default 6),
# PYTHON (the offline interpreter; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
RUNS=${RUNS:-runs/gpu_check}
STEPS=${STEPS:-20}
BIG_STEPS=${BIG_STEPS:-6}
PACK=.gpu-pack/danceopd-gpu-pack.tar.xz
OFFLINE=0
if [ "${1:-}" = "--offline" ]; then
  OFFLINE=1; PACK=${2:-$PACK}
elif [ -n "${1:-}" ]; then
  echo "gpu_check: unknown argument $1 (--offline [PACK])" >&2; exit 2
elif [ ! -x .venv/bin/python ] && [ -f "$PACK" ]; then
  OFFLINE=1
fi
mkdir -p "$RUNS"
RUNS=$(realpath "$RUNS")
T0=$(date +%s)
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; fi

if [ "$OFFLINE" = 1 ]; then
  PY=${PYTHON:-python3}
  [ -f "$PACK" ] || { echo "gpu_check: no offline pack at $PACK (make gpu-pack, on a machine with the registry)" >&2; exit 2; }
  SITE=$(mktemp -d /tmp/danceopd-gpu-pack.XXXXXX)
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$PACK" "$SITE"
  export PYTHONPATH="$PWD:$SITE/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  # The image's packages the pack relies on, and the packed ones' own requirements: one line each
  # that is not met (a warning: an older version often still works), a missing package ends here.
  "$PY" - "$SITE/pack.json" <<'EOF'
import json, sys
from importlib import metadata
from packaging.requirements import Requirement
pack = json.load(open(sys.argv[1]))
missing = []
for name in pack["image"]:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_check: this machine lacks {', '.join(missing)} (the pack expects the GPU image to have them)")
for name in pack["packages"]:
    for r in map(Requirement, metadata.distribution(name).requires or ()):
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(r.name)
        except metadata.PackageNotFoundError:
            print(f"gpu_check: warning: {name} requires {r}, which is not installed")
            continue
        if r.specifier and not r.specifier.contains(have, prereleases=True):
            print(f"gpu_check: warning: {name} requires {r}, this machine has {have}")
print(f"gpu_check: offline pack of {len(pack['packages'])} packages on python {sys.version.split()[0]}")
EOF
  DANCEOPD=("$PY" -m services.cli)
else
  if [ ! -x .venv/bin/danceopd ]; then
    make setup TORCH_SPEC="${TORCH_SPEC:-torch}"  # a CUDA torch: the CPU pin of the Makefile is for the CPU machines
  fi
  PY=.venv/bin/python
  DANCEOPD=(.venv/bin/danceopd)
fi
"$PY" -c "import torch, diffusers, ray, deepspeed, pydantic; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__, '| pydantic', pydantic.__version__)"
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }
# bf16 end to end where the learner has the switch (else backend.dtype's autocast alone)
PRECISION=()
if [ "$("$PY" -c "from danceopd.config import LearnerConfig; print('precision' in LearnerConfig.model_fields)")" = True ]; then
  PRECISION=(--set learner.precision=bf16)
fi

tiny() {  # tiny NAME LAYERS HEADS: a random pipeline of that transformer size (once)
  [ -f "$RUNS/$1/model_index.json" ] || "${DANCEOPD[@]}" make-tiny sd3 --out "$RUNS/$1" --layers "$2" --heads "$3" --head-dim 64
}

run() {  # run NAME PIPELINE [--set ...]: one training job, then its figures
  local name=$1 pipe=$RUNS/$2; shift 2
  local t
  t=$(date +%s)
  "${DANCEOPD[@]}" train configs/sd3_tiny.yaml --overwrite --no-progress \
    --set backend.pretrained="$pipe" --set "teachers.1.adapters={realism: $pipe/loras/realism, style: $pipe/loras/style}" \
    --set job.output_dir="$RUNS/$name" --set learner.steps="$STEPS" --set backend.dtype=bfloat16 \
    --set rollout.workers=2 --set rollout.batch_size=8 --set checkpoint.every=0 --set eval.enabled=false \
    "${PRECISION[@]}" "$@"
  "$PY" - "$RUNS/$name/summary.json" "$name" "$(( $(date +%s) - t ))" "$RUNS/figures.jsonl" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
gib = {r: round(b / 2**30, 2) for r, b in s.get("peak_gpu_memory_bytes", {}).items()}
fig = {"run": sys.argv[2], "job_seconds": int(sys.argv[3]), "steps": s["steps"], "mode": s["mode"],
       "samples_per_s": {"learner": s["samples_per_s"], "rollout": s.get("rollout_samples_per_s"),
                         "teacher_rows": s.get("teacher_rows_per_s")},
       "learner_step_s": s.get("learner_step_seconds_mean"), "idle_ratio": s.get("idle_ratio"),
       "weight_sync_s": s.get("sync_seconds_mean"), "weight_sync_transfer_s": s.get("sync_transfer_seconds_mean"),
       "sync_bytes": s.get("sync_bytes"), "peak_gpu_memory_gib": gib, "nfe": s.get("nfe")}
open(sys.argv[4], "a").write(json.dumps(fig) + "\n")
print(f"[{fig['run']}] {fig['steps']} steps in {fig['job_seconds']} s ({fig['mode']}); samples/s learner {s['samples_per_s']}, "
      f"rollout {fig['samples_per_s']['rollout']}, teacher rows {fig['samples_per_s']['teacher_rows']}; learner step "
      f"{fig['learner_step_s']} s; weight sync {fig['weight_sync_s']} s (transfer {fig['weight_sync_transfer_s']} s, "
      f"{fig['sync_bytes']} bytes); peak GPU memory GiB {gib}; idle {fig['idle_ratio']}")
EOF
}

rm -f "$RUNS/figures.jsonl"
tiny pipe_0p3b 12 16
run local_bf16 pipe_0p3b --mode local --set backend.resolution=256
# one GPU shared by every role: 2 workers, 2 teachers and the learner, a fifth each
run ray_fractions pipe_0p3b --mode ray --set backend.resolution=256 --set sync.transport=object_store \
  --set rollout.num_gpus=0.2 --set teachers.0.num_gpus=0.2 --set teachers.1.num_gpus=0.2 --set learner.num_gpus=0.2
tiny pipe_sd35m 24 24
STEPS=$BIG_STEPS run sd35m_512 pipe_sd35m --mode local --set backend.resolution=512 --set rollout.batch_size=4 \
  --set backend.gradient_checkpointing=true
if [ "$GPUS" -ge 3 ]; then
  run bf16_collective pipe_0p3b --mode ray --set backend.resolution=256 --set sync.transport=collective \
    --set rollout.num_gpus=1 --set learner.num_gpus=1 --set teachers.0.num_gpus=0.5 --set teachers.1.num_gpus=0.5
else
  echo "[bf16_collective] skipped: NCCL needs its own GPU for the learner and each of the 2 workers (found $GPUS)"
fi
echo "gpu_check: done in $(( $(date +%s) - T0 )) s; figures in $RUNS/figures.jsonl"
