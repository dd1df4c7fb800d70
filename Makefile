# The two commands of the README (demo, test), and the habits: lint, test-fast.
# PYTHON may point at a virtual environment's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# torch is pinned first: an unpinned install could pull a multi-GB build this project does not need.
TORCH ?= torch==2.13.0
# The fast tier leaves out what is slow by nature; tests/conftest.py marks each test from what it reaches.
FAST = not slow and not oracle and not subprocess and not distributed

.PHONY: install install-dev demo test test-fast lint

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,serve]"

# Main job: train the demo model on the bundled Shakespeare, then sample from it: two minutes on
# two idle cores (benchmarks/RESULTS.md, "The demo run").
demo: install
	$(PYTHON) -m tegaki train --data shakespeare --preset demo --out runs/demo
	$(PYTHON) -m tegaki generate --model runs/demo --max-new-tokens 200 --num-samples 2 "ROMEO:"

test: install-dev
	$(PYTHON) -m pytest

# The edit loop: no subprocesses, no torchrun, no transformers oracle, no long end-to-end runs.
# One thread: on tiny models a second one only adds synchronisation, and on two busy cores it
# makes the tier two to three times slower.
test-fast:
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -p no:cacheprovider -m "$(FAST)"

# Style (ruff, configured in pyproject.toml) and the import direction (the layers contract in
# pyproject.toml, checked by import-linter and by tests/test_imports.py, which also finds cycles).
lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_imports.py
