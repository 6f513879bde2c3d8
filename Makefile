# Two commands: `make quickstart` and `make test`. Each creates .venv and installs the package when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine-wide pip config may point at a local CPU-only torch wheel that breaks torchvision: take the registry's.
PIP := PIP_FIND_LINKS= $(PY) -m pip

.PHONY: install quickstart test test-all test-gpu lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/quickstart.sh

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

# The GPU path (bf16 / fp16 training of both stages, compile, flash attention, DDP / FSDP, encoding, sampling) on a
# CUDA machine; then `$(PY) benchmarks/gpu.py` for the SD 1.5 UNet's figures.
test-gpu: $(STAMP)
	$(PY) -m pytest -m gpu tests/test_gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ldm tests benchmarks

# Caches and build output only: runs/ (checkpoints, exports) and data/ are the user's to delete.
clean:
	rm -rf .pytest_cache .ruff_cache build ./*.egg-info
