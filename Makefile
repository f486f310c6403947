# Two commands from a fresh clone: `make demo` (the main job on the embedded default) and
# `make test`. Both run `setup` first, which is idempotent.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
# Torch's CPU wheels: PyPI's Linux torch is the CUDA build (gigabytes of nvidia-* wheels). An extra
# index, not the only one: pip picks 2.13.0+cpu from it, and where it is unreachable (an offline
# mirror) it is left out: asked anyway, pip retries it five times per package (about 75 s here)
# before it falls back to the other indexes. `TORCH_INDEX_URL=` leaves it out.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
# The resolved dependency set (torch apart): `make constraints` regenerates it.
CONSTRAINTS := constraints.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.danceopd-setup
DEMO_CONFIG ?= configs/demo.yaml
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup constraints demo demo-init test test-fast lint bench bench-scale bench-reference bench-faults bench-bytes bench-suite bench-table bench-table-quick gpu-pack clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS) Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: torch ($(TORCH_SPEC))"
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),$$($(BIN)/python deploy/reachable.py $(TORCH_INDEX_URL) && echo --extra-index-url $(TORCH_INDEX_URL)))
	@echo "setup: danceopd and its dependencies ($(CONSTRAINTS))"
	@$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev]"
	@echo "setup: deepspeed (no build isolation: it builds against the installed torch)"
	@$(BIN)/python -c "import deepspeed" >/dev/null 2>&1 || DS_BUILD_OPS=0 $(BIN)/pip install -q -c $(CONSTRAINTS) --no-build-isolation deepspeed
	@bash deploy/install-prometheus.sh
	@touch $(STAMP)

# The installed set (after `make setup`, or an upgrade in $(VENV)) as the new pins.
constraints:
	$(BIN)/python deploy/freeze_constraints.py > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)

demo: setup
	$(BIN)/danceopd train $(DEMO_CONFIG) --overwrite

# The committed model the demo starts from (configs/demo_init/): a local-edit model trained with sft
# on its own dataset (configs/demo_init.yaml says how), exported as a save_pretrained folder.
demo-init: setup
	$(BIN)/danceopd make-data shapes --out data/generated/demo-init --n-per-task 2000 --seed 1 --tasks local_edit
	OMP_NUM_THREADS=1 $(BIN)/danceopd train configs/demo_init.yaml --mode local --overwrite
	$(BIN)/danceopd export $$(ls -d runs/demo-init/checkpoints/step-* | tail -1) --out configs/demo_init --overwrite

# Two lanes (tests/lanes.py): the shared Ray cluster's tests in one pytest-xdist worker, the rest
# in the other, filling the cores the Ray lane leaves idle while it waits. More workers each
# start a Ray cluster of their own, and on two cores those starve each other (three took 31.8 min).
# Each lane runs to its end and the run reports every failure (xdist hands a lane over whole, so
# -x could not stop the other lane). TEST_LANES=0: one process, which stops at the first failure.
TEST_LANES ?= 1
test: setup
	$(BIN)/python -m pytest --timeout 900 --durations=20 $(if $(filter-out 0,$(TEST_LANES)),-n 2 --lanes,-x)

# The pure tests: no Ray, no other process, no long training; before every commit.
test-fast: setup
	$(BIN)/python -m pytest -x --timeout 120 --durations=5 -m fast

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/throughput.py

bench-scale: setup
	$(BIN)/python bench/scale.py

bench-reference: setup
	$(BIN)/python bench/reference.py

bench-faults: setup
	$(BIN)/python bench/faults.py

bench-bytes: setup
	$(BIN)/python bench/backend_bytes.py

# The suite's own time: make test-fast and make test, alone (bench/results/suite.md).
bench-suite: setup
	$(BIN)/python bench/suite.py

bench-table: setup
	$(BIN)/python bench/shapesbench.py

bench-table-quick: setup
	$(BIN)/python bench/shapesbench.py --quick

# The offline pack of bench/gpu_check.sh for a GPU machine without a registry (Ray, diffusers,
# DeepSpeed, pydantic and their needs beyond the GPU image, for cp312): .gpu-pack/danceopd-gpu-pack.tar.xz
gpu-pack: setup
	$(BIN)/python bench/gpu_pack.py

clean:
	rm -rf runs .pytest_cache
