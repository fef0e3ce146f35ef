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

# llama.cpp runs our GGUF exports: the llamacpp extra compiles llama.cpp once (~5 min on 2 cores; pip caches the wheel)
test-llamacpp: venv
	$(BIN)/pip install -q -e '.[test,llamacpp]'
	$(BIN)/python -m pytest -m llamacpp

.PHONY: venv demo test test-slow test-llamacpp
