# The two commands of the README (demo, test), and the habits: lint, test-fast.
# PYTHON may point at a virtual environment's python.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# torch is pinned first: an unpinned install could pull a multi-GB build this project does not need.
TORCH ?= torch==2.13.0
# The fast tier leaves out what is slow by nature; tests/conftest.py marks each test from what it reaches.
FAST = not slow and not oracle and not subprocess and not distributed

.PHONY: install install-dev demo test test-fast test-isa test-interop web lint

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
