# qvlsearch developer tasks. `make install && make test` is all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test lint format checkpoints bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,ray]"

# Targets that run in the venv make it first when it is missing
$(BIN)/qvlsearch:
	$(MAKE) install

test: lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: | $(BIN)/qvlsearch
	$(BIN)/ruff check qvlsearch tests benchmarks

format:
	$(BIN)/ruff format qvlsearch tests benchmarks
	$(BIN)/ruff check --fix qvlsearch tests benchmarks

# The CPU benchmark suite (not part of `make test`): figures beside goals, results in benchmarks/results/
bench: | $(BIN)/qvlsearch
	$(BIN)/python benchmarks/run.py

# Random-weight test checkpoints in ./checkpoints (tiny by default: make checkpoints PRESET=small)
PRESET ?= tiny
checkpoints: | $(BIN)/qvlsearch
	$(BIN)/python -m qvlsearch.tiny checkpoints/$(PRESET) --preset $(PRESET)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache *.egg-info
