# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project with what it needs. On a machine without a
# CUDA build of torch, torch==2.13.0 (CPU) is installed first so that no multi-GB CUDA build is
# pulled in; on a machine whose python3 already has a CUDA torch, the venv reuses it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clinvla-installed
NATIVE := $(shell find csrc -type f 2>/dev/null)
PYTEST_MARKERS ?= not gpu and not trt and not slow and not orthanc

.PHONY: setup test test-all demo bench clean

$(STAMP): pyproject.toml setup.py $(NATIVE)
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "reusing the system's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "$(PYTEST_MARKERS)"

test-all: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python -m clinvla_engine.cli demo --out demo_out

bench: setup
	$(BIN)/python -m benchmarks.bench_train_step

clean:
	rm -rf build *.egg-info demo_out
