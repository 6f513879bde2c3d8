# Two commands: `make quickstart` and `make test`. Each creates .venv and installs the package when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The machine-wide pip config may point at a local CPU-only torch wheel that breaks torchvision: take the registry's.
PIP := PIP_FIND_LINKS= $(PY) -m pip

.PHONY: install quickstart test test-all lint clean

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

lint: $(STAMP)
	$(VENV)/bin/ruff check ldm tests

clean:
	rm -rf runs .pytest_cache
