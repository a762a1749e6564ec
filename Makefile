# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) .venv and install the project with what it needs. On a machine without a
# CUDA build of torch, torch==2.13.0 (CPU) is installed first so that no multi-GB CUDA build is
# pulled in; on a machine whose python3 already has a CUDA torch, the venv reuses it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clinvla-installed
NATIVE := $(shell find csrc -type f 2>/dev/null)
PYTEST_MARKERS ?= not gpu and not trt and not slow

.PHONY: setup test test-all demo reproduce bench clean

# A set-up that runs out of disk half-way leaves a broken venv and pip's "[Errno 28]" deep in its
# output; check first and say how much is needed where. torch, the extras and pip's build
# directories take about 4 GiB on a fresh venv; a reused venv with torch needs far less.
NEED_FREE_GIB ?= 5

$(STAMP): pyproject.toml setup.py $(NATIVE)
	@need=$(NEED_FREE_GIB); if [ -x $(BIN)/python ] && $(BIN)/python -c "import torch" 2>/dev/null; then need=1; fi; \
	for d in . "$${TMPDIR:-/tmp}"; do \
	  free_kib=$$(df -Pk "$$d" | awk 'NR==2 {print $$4}'); \
	  if [ -n "$$free_kib" ] && [ "$$free_kib" -lt $$((need * 1024 * 1024)) ]; then \
	    echo "error: $$(cd "$$d" && pwd) has $$((free_kib / 1024)) MiB free; setting up $(VENV) needs about $$need GiB there." >&2; \
	    echo "       Free some space (old clones, pip caches, /tmp/torchinductor_*) or point TMPDIR elsewhere, then rerun." >&2; \
	    exit 1; \
	  fi; \
	done
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "reusing the system's CUDA torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

# Debian packages the tests use: Chromium for the page test (tests/test_serve.py drives it with
# Playwright through executable_path; Playwright's own browser download is not used), Orthanc with
# its plugin SDK and GDCM decoder plugin for the PACS tests, nlohmann-json and OpenSSL's headers for
# libclinvla (make cpp). Installed when apt-get is there and we are root, as on CI; elsewhere the
# tests that need a missing one skip and say why. policy-rc.d keeps Debian's Orthanc service from
# starting: the tests start their own Orthanc on loopback.
SYSTEM_PACKAGES := chromium orthanc orthanc-dev orthanc-gdcm nlohmann-json3-dev libssl-dev zlib1g-dev
SYSTEM_STAMP := $(VENV)/.clinvla-system

$(SYSTEM_STAMP): | $(STAMP)
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "Debian packages$$missing are not installed and cannot be installed here: the tests that need them skip"; fi
	@touch $(SYSTEM_STAMP)

setup: $(STAMP) $(SYSTEM_STAMP)

test: setup
	$(BIN)/python -m pytest -q -m "$(PYTEST_MARKERS)"

test-all: setup
	$(BIN)/python -m pytest -q

# the demo needs the Python set-up only (no Orthanc, Chromium or C++ headers: those are the tests')
demo: $(STAMP)
	$(BIN)/python -m clinvla_engine.cli demo --out demo_out

# The claims study (not CI): every arm of clinvla_engine.claims_study over 3 seeds at the demo's
# settings -> benchmarks/quality.md. About 4 minutes per arm and seed on 2 CPU cores.
reproduce: setup
	$(BIN)/python -m benchmarks.reproduce --out reproduce_out --seeds 3

bench: setup
	$(BIN)/python -m benchmarks.bench_train_step

# libclinvla (C++ engine, tokenizer, DICOM, view rules, index; the Orthanc plugin where its SDK is
# installed): builds build/cpp (libclinvla.so, clinvla_cli) and installs the CMake package into
# clinvla_engine/cpp (clinvla_engine.cmake_prefix_path()). The commands live in clinvla_engine/cpp.py.
.PHONY: cpp
cpp: setup
	$(BIN)/python -m clinvla_engine.cpp build

clean:
	rm -rf build *.egg-info demo_out reproduce_out clinvla_engine/cpp
