# Two commands from a fresh clone: `make demo` (the main job on the embedded default) and
# `make test`. Both run `setup` first, which is idempotent.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.danceopd-setup
DEMO_CONFIG ?= configs/demo.yaml
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast lint bench bench-scale bench-reference bench-faults bench-bytes bench-table bench-table-quick clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: torch ($(TORCH_SPEC))"
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	@echo "setup: danceopd and its dependencies"
	@$(BIN)/pip install -q -e ".[dev]"
	@echo "setup: deepspeed (no build isolation: it builds against the installed torch)"
	@$(BIN)/python -c "import deepspeed" >/dev/null 2>&1 || DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed
	@bash deploy/install-prometheus.sh
	@touch $(STAMP)

demo: setup
	$(BIN)/danceopd train $(DEMO_CONFIG) --overwrite

test: setup
	$(BIN)/python -m pytest -x --timeout 900 --durations=20

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

bench-table: setup
	$(BIN)/python bench/shapesbench.py

bench-table-quick: setup
	$(BIN)/python bench/shapesbench.py --quick

clean:
	rm -rf runs .pytest_cache
