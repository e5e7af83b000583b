# qvlsearch developer tasks. `make install && make test` is all a fresh clone needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: install test lint wheels format checkpoints bench clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,ray]"

# Targets that run in the venv make it first when it is missing
$(BIN)/qvlsearch:
	$(MAKE) install

test: lint wheels
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25

lint: | $(BIN)/qvlsearch
	$(BIN)/ruff check qvlsearch tests benchmarks tools

# Every default dependency, and theirs, has a wheel for macOS arm64, Linux aarch64/x86_64 and Windows amd64,
# CPython 3.10-3.13 (asks the package index through pip; cached a day in ~/.cache/qvlsearch-wheels)
wheels: | $(BIN)/qvlsearch
	$(BIN)/python tools/check_wheels.py

format:
	$(BIN)/ruff format qvlsearch tests benchmarks tools
	$(BIN)/ruff check --fix qvlsearch tests benchmarks tools

# The CPU benchmark suite (not part of `make test`): figures beside goals, results in benchmarks/results/
bench: | $(BIN)/qvlsearch
	$(BIN)/python benchmarks/run.py

# Random-weight test checkpoints in ./checkpoints (tiny by default: make checkpoints PRESET=small)
PRESET ?= tiny
checkpoints: | $(BIN)/qvlsearch
	$(BIN)/python -m qvlsearch.tiny checkpoints/$(PRESET) --preset $(PRESET)

clean:
	rm -rf $(VENV) checkpoints .pytest_cache .ruff_cache *.egg-info
