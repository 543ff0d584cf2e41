# The README's two commands: `make run` and `make test`. Both work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TRAIN_MINUTES ?= 10
RUN_DIR ?= runs/default
HOST ?= 127.0.0.1
PORT ?= 5000

.PHONY: run test setup assets lint format bench clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/tinyllm fetch-assets

run: assets
	$(VENV)/bin/tinyllm run --run-dir $(RUN_DIR) --minutes $(TRAIN_MINUTES) --host $(HOST) --port $(PORT)

test: assets
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist src/*.egg-info
