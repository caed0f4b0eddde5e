PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test test-hf lint bench

venv: $(STAMP)

# Rebuilt only when pyproject.toml or constraints.txt change (or .venv is missing).
# torch is installed first, pinned, so pip takes the local CPU wheel and never a CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt torch==2.13.0
	$(BIN)/pip install -c constraints.txt -e ".[dev,plot]"
	touch $@

demo: venv
	$(BIN)/python examples/train_char_gpt.py

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n auto

# The Hugging Face callbacks' tests (tests/test_transformers.py skips them without the hf extra).
test-hf: venv
	$(BIN)/pip install -c constraints.txt -e ".[hf]"
	$(BIN)/python -m pytest -q tests/test_transformers.py

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python benchmarks/overhead.py
