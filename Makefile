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

# the main job on embedded defaults: train a tokenizer and a small Llama on Shakespeare, sample, compare with an n-gram
demo: venv
	$(BIN)/minillama quickstart

test: venv
	$(BIN)/python -m pytest

test-slow: venv
	$(BIN)/python -m pytest -m slow

.PHONY: venv demo test test-slow
