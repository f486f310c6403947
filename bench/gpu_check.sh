#!/usr/bin/env bash
# GPU smoke check of the sd3 backend (not part of the tests): a small SD3-class pipeline of the real
# diffusers classes (12 blocks x 16 heads x 64, about 0.3 B parameters, random weights), trained
# for a few steps in bf16 with 2 rollout workers, then the same with the `collective` weight
# transport (NCCL). Prints samples/s per role and weight-sync seconds from each run's summary.json.
#
#   bash bench/gpu_check.sh            # on a machine with CUDA; ~5 minutes incl. set-up
#
# NCCL cannot put two ranks of one communicator on the same GPU, so the collective run needs a GPU
# each for the learner and both workers (3); with fewer it is skipped and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-runs/gpu_check}
STEPS=${STEPS:-20}
mkdir -p "$OUT"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
if [ ! -x .venv/bin/danceopd ]; then
  # a CUDA torch: the CPU pin of the Makefile is for the CPU machines
  make setup TORCH_SPEC="${TORCH_SPEC:-torch}"
fi
PY=.venv/bin/python
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$GPUS" -ge 1 ] || { echo "gpu_check: no CUDA device visible to torch" >&2; exit 1; }

PIPE="$OUT/pipeline"
[ -f "$PIPE/model_index.json" ] || .venv/bin/danceopd make-tiny sd3 --out "$PIPE" --layers 12 --heads 16 --head-dim 64

run() {  # run NAME [--set ...]: one training job, then its figures
  local name=$1; shift
  .venv/bin/danceopd train configs/sd3_tiny.yaml --overwrite --no-progress \
    --set backend.pretrained="$(realpath "$PIPE")" \
    --set "teachers.1.adapters={realism: $(realpath "$PIPE")/loras/realism, style: $(realpath "$PIPE")/loras/style}" \
    --set job.output_dir="$(realpath "$OUT")/$name" --set learner.steps="$STEPS" \
    --set backend.resolution=256 --set backend.dtype=bfloat16 --set rollout.workers=2 --set rollout.batch_size=8 \
    --set checkpoint.every=0 "$@"
  $PY - "$OUT/$name/summary.json" "$name" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
idle = s.get("idle_ratio", {})
print(f"[{sys.argv[2]}] learned samples/s {s['samples_per_s']}; idle ratio per role {idle}; "
      f"weight sync mean {s.get('sync_seconds_mean')} s (transfer {s.get('sync_transfer_seconds_mean')} s), "
      f"{s.get('sync_bytes')} bytes per push; nfe {s.get('nfe')}")
EOF
}

# one GPU shared by every role (fractions), object-store weight sync
G=$($PY -c "print(round(1 / 5, 2))")
run bf16_object_store --set sync.transport=object_store --set rollout.num_gpus=$G --set teachers.0.num_gpus=$G \
  --set teachers.1.num_gpus=$G --set learner.num_gpus=$G
if [ "$GPUS" -ge 3 ]; then
  run bf16_collective --set sync.transport=collective --set rollout.num_gpus=1 --set learner.num_gpus=1 \
    --set teachers.0.num_gpus=0.5 --set teachers.1.num_gpus=0.5
else
  echo "[bf16_collective] skipped: NCCL needs its own GPU for the learner and each of the 2 workers (found $GPUS)"
fi
