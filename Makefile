# One command per habit. `make test` works on a fresh machine: it makes .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned and installed before the project so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-long lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/gkd demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

test-long: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m long

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline workers tests
	$(VENV)/bin/ruff format --check pipeline workers tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/gkd bench all --json

clean:
	rm -rf $(VENV) .gkd build *.egg-info
