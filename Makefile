# llm-nb: the two set-up commands of the README are `make demo` and `make test`.
# Both work on a fresh machine with Python 3.11 (and, for the tests, apt and node).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# The CPU build of torch that these machines carry; any other spec pulls GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install install-test demo test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(BIN)/python
	$(PIP) install --quiet -e .

# Install, then chat with the embedded default model (SmolLM2-135M) through the shared host.
demo: install
	$(BIN)/llm-nb load smollm2
	$(BIN)/llm-nb chat -v "In two sentences, why should notebooks share one loaded model?"
	$(BIN)/llm-nb ps
	@echo "The host keeps running for your notebooks; 'llm-nb stop' stops it."

install-test: $(BIN)/python
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,transformers,widgets,consume]"

# Install everything the tests need, then run them all.
test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything not marked slow or browser.
test-fast:
	$(BIN)/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

lint:
	$(BIN)/ruff check llm_nb tests benchmarks
	$(BIN)/ruff format --check llm_nb tests benchmarks

bench:
	$(BIN)/python benchmarks/bench_host.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
