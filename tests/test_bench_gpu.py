"""benchmarks/bench_gpu.py is run only where a GPU is lent, so its smoke mode (every section at toy
sizes on the CPU, nothing appended) is what keeps it runnable between such runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 15 seconds on two cores
def test_the_gpu_benchmark_runs_every_section_at_toy_sizes_and_leaves_results_alone():
    pytest.importorskip("transformers")
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_gpu", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for section in ("| GPT-2 |", "decoding:", "host CPU, 2 threads:", "training: 2 layers x 64"):
        assert section in out, section
    decode_rows = [line for line in out.splitlines() if line.startswith("| tegaki ") and "x |" not in line]
    assert {row.split("|")[1].strip() for row in decode_rows} >= {"tegaki fp32", "tegaki bf16", "tegaki int8"}
    assert "tegaki fp32's greedy tokens equal transformers fp32's: True" in out
    assert results.read_bytes() == before  # a smoke run appends nothing
