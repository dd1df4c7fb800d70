# The two commands of the README (demo, test), and the habits: lint, test-fast.
#
# On a fresh machine, make a virtual environment first: Debian's and Ubuntu's python3 refuse
# `pip install` outside one (PEP 668, "externally-managed-environment").
#
#     python3 -m venv .venv      # once (Debian, Ubuntu: `sudo apt install python3-venv` if it fails)
#     make demo
#     make test
#
# PYTHON: an activated environment's python3, else .venv/bin/python where it exists, else python3;
# `make demo PYTHON=path/to/bin/python` picks another. `make check` says whether pip may install there.
ifndef PYTHON
  ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
    PYTHON = python3
  else ifneq ($(wildcard .venv/bin/python),)
    PYTHON = .venv/bin/python
  else
    PYTHON = python3
  endif
endif
PIP = $(PYTHON) -m pip
# torch is pinned first: an unpinned install could pull a multi-GB build this project does not need.
TORCH ?= torch==2.13.0
# The demo's threads (OMP_NUM_THREADS): the cores nobody else is using, that is the cores less the
# load average, at least one. With another job on the second of two cores, two threads made each
# step 2.6 times slower than one (benchmarks/RESULTS.md, "The demo run"). `make demo THREADS=2`
# chooses, an OMP_NUM_THREADS of your own is kept, and without /proc/loadavg PyTorch chooses.
ifndef THREADS
  ifdef OMP_NUM_THREADS
    THREADS := $(OMP_NUM_THREADS)
  else
    THREADS := $(shell awk -v cores="$$(nproc)" '{ free = cores - int($$1 + 0.5); print (free > 1 ? free : 1) }' /proc/loadavg 2>/dev/null)
  endif
endif
THREADING = $(if $(THREADS),OMP_NUM_THREADS=$(THREADS))
# The fast tier leaves out what is slow by nature; tests/conftest.py marks each test from what it reaches.
FAST = not slow and not oracle and not subprocess and not distributed

.PHONY: check install install-dev demo test test-fast test-isa test-interop web lint

# Whether pip may install into PYTHON, said before pip would: yes in a virtual environment or a
# Python of its own (pyenv, conda, a container's); no in a system Python marked EXTERNALLY-MANAGED
# (PEP 668: Debian, Ubuntu, Homebrew), nor in a virtual environment made without pip (Debian
# without python3-venv). The Python must be 3.10 or newer.
VENV_HINT = make a virtual environment, then run make again (it uses .venv/bin/python): python3 -m venv .venv
WHERE = import os, sys, sysconfig, importlib.util; \
	managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")); \
	print("old" if sys.version_info < (3, 10) else "nopip" if not importlib.util.find_spec("pip") \
	else "venv" if sys.prefix != sys.base_prefix else "managed" if managed else "own")
check:
	@where=$$($(PYTHON) -c '$(WHERE)') || { echo "make: no Python at $(PYTHON): $(VENV_HINT)"; exit 1; }; \
	case $$where in \
	old) echo "make: tegaki needs Python 3.10 or newer; $(PYTHON) is $$($(PYTHON) -V 2>&1)."; exit 1;; \
	nopip) echo "make: $(PYTHON) has no pip. Debian, Ubuntu: sudo apt install python3-venv," \
		"then rm -rf .venv && python3 -m venv .venv"; exit 1;; \
	managed) echo "make: pip may not install into the system's Python ($(PYTHON), PEP 668)."; \
		echo "make: $(VENV_HINT)"; exit 1;; \
	own) echo "make: installing into $(PYTHON)'s own packages, not a virtual environment";; \
	esac

install: check
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .

install-dev: check
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,serve]"

# Main job: train the demo model on the bundled Shakespeare, then sample from it: two minutes on
# two idle cores (benchmarks/RESULTS.md, "The demo run"), in THREADS threads.
demo: install
	$(THREADING) $(PYTHON) -m tegaki train --data shakespeare --preset demo --out runs/demo
	$(THREADING) $(PYTHON) -m tegaki generate --model runs/demo --max-new-tokens 200 --num-samples 2 "ROMEO:"

test: install-dev
	$(PYTHON) -m pytest

# The edit loop: no subprocesses, no torchrun, no transformers oracle, no long end-to-end runs.
# One thread: on tiny models a second one only adds synchronisation, and on two busy cores it
# makes the tier two to three times slower.
test-fast:
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -p no:cacheprovider -m "$(FAST)"

# The CPU-specific tests again as on older CPUs: each kernel library held back by its own variable
# (oneDNN to AVX2, AVX-512, AVX-512 VNNI; PyTorch's own kernels and inductor's code to AVX2), each
# run in a fresh process with an inductor cache of its own (a kernel cached for one instruction set
# must not be loaded under another). tegaki.device reads a oneDNN cap as the CPU's flags too. The
# slow tests (inductor compiling whole steps) run under the cap that changes inductor's code only.
ISA_CAPS = ONEDNN_MAX_CPU_ISA=AVX2 ONEDNN_MAX_CPU_ISA=AVX512_CORE ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI ATEN_CPU_CAPABILITY=avx2
ISA_TESTS = tests/test_decoding.py tests/test_quant.py tests/test_native.py tests/test_device.py tests/test_generate.py
test-isa: install-dev
	@set -e; for cap in $(ISA_CAPS); do \
		echo "== make test-isa: $$cap"; \
		cache=$$(mktemp -d); \
		case $$cap in ATEN*) only="";; *) only="not slow";; esac; \
		env $$cap TORCHINDUCTOR_CACHE_DIR=$$cache OMP_NUM_THREADS=1 $(PYTHON) -m pytest -p no:cacheprovider -m "$$only" $(ISA_TESTS) \
			|| { rm -rf $$cache; exit 1; }; \
		rm -rf $$cache; \
	done

# The files tegaki writes for other engines, loaded by those engines themselves: GGUF in llama.cpp
# (llama-cpp-python builds llama.cpp from source: 10-20 minutes on two cores the first time).
test-interop: install-dev
	$(PIP) install -q gguf llama-cpp-python==0.3.36
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -p no:cacheprovider tests/test_gguf_export.py

# The browser page's kernels (docs/web.md): tegaki/web/kernels/kernels.rs -> tegaki/web/static/kernels.wasm
# with a rustc that has the wasm32 standard library (Debian: rustc + libstd-rust-dev-wasm32), then the
# check that the committed .wasm is the build of today's source (without a toolchain: the check only).
web:
	$(PYTHON) -m tegaki.web.build

# Style (ruff, configured in pyproject.toml) and the import direction (the layers contract in
# pyproject.toml, checked by import-linter and by tests/test_imports.py, which also finds cycles).
lint: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -c "from importlinter.cli import lint_imports_command; lint_imports_command()" --no-cache
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_imports.py
