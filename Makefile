# One command sets up and runs the local stack (`make dev`); one runs every check (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint typecheck generated unit dev clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The committed Envoy API stubs in typings/ must match a fresh buf generation (buf.gen.yaml).
generated: $(STAMP)
	$(BIN)/python scripts/gen_stubs.py --check

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck generated unit

dev: $(STAMP)
	$(BIN)/extproc dev

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
