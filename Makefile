# The two commands of the README. PYTHON may point at a virtual environment's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# torch is pinned first: an unpinned install could pull a multi-GB build this project does not need.
TORCH ?= torch==2.13.0

.PHONY: install install-dev demo test

install:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev]"

# Main job: train the tiny model on the bundled Shakespeare, then sample from it.
demo: install
	$(PYTHON) -m tegaki train --data shakespeare --preset tiny --out runs/demo
	$(PYTHON) -m tegaki generate --model runs/demo --max-new-tokens 200 --num-samples 2 "ROMEO:"

test: install-dev
	$(PYTHON) -m pytest
