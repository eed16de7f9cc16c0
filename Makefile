# The two commands of the README. Both set up .venv on first use (CPU torch, the package, assets).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup main test lint bench

setup:
	bash scripts/setup_env.sh

## The main job on the embedded default (offline MiniLM encoder, real data).
main: setup
	$(VENV)/bin/hf-efficient convert --attention improved-clustered --clusters 25 --topk 32 --out out/minilm-improved-clustered

## The test suite (slow checks are deselected; they live in scripts/).
test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) scripts/bench_attention.py --quick
