# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8080
DATA_DIR ?= .data
PYTEST_ARGS ?=

.PHONY: run test venv generate check-generated lint bench clean

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

run: venv
	$(BIN)/pyth-on up --port $(PORT) --data-dir $(DATA_DIR)

test: venv check-generated lint
	$(BIN)/pytest $(PYTEST_ARGS)

generate: venv
	$(BIN)/python tools/generate.py

check-generated: venv
	$(BIN)/python tools/generate.py --check

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
