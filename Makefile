# Distillery. Quickstart: `make demo` runs the stack end to end, `make test` runs the tests.
# Both create ./.venv on first use. TORCH overrides the torch requirement (e.g. a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test demo proto bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/distillery teacher demo

proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) bench/teacher_bench.py

clean:
	rm -rf $(VENV) .pytest_cache
