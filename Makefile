# Every target sets itself up: a fresh machine needs only python3 (3.10+).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test test-slow test-all lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The local CPU wheel first: an unpinned torch would pull gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,postgres,dashboard,onnx]'
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default (scikit-learn digits): search, report, export.
demo: $(STAMP)
	$(BIN)/slimsearch run studies/quickstart.toml
	$(BIN)/slimsearch report studies/quickstart.toml
	$(BIN)/slimsearch export studies/quickstart.toml --trial best --format pt2

## The default test run (CI runs this plus the slow tests).
test: $(STAMP)
	$(BIN)/pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
