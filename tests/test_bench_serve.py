"""benchmarks/bench_serve.py --hostile at toy size: a real server, a handful of clients (some of them
hanging up), the probe and the memory readings all reach the report. Latencies are printed, never
asserted: the machine may be busy with other work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed: pip install 'tegaki[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'tegaki[serve]'")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 12 seconds on two cores (a server start, two loads of 2 s)
def test_the_hostile_load_reports_the_probes_and_the_servers_memory():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    command = [sys.executable, "-m", "benchmarks.bench_serve", "--hostile", "--duration", "2", "--clients", "5"]
    done = subprocess.run(
        [*command, "--settle", "0.5", "--loads", "2"], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "### Hostile load," in out
    assert "| load | probes answered | probe median | probe max |" in out
    assert out.count("\n| 1 | ") == 1 and out.count("\n| 2 | ") == 1  # one row a load
    assert "- server memory (VmRSS): " in out and " MiB after one warm-up request" in out
    assert "after one more idle probe" in out and "its level after warm-up, the first load" in out
    for kind in ("| vanishing |", "| well-behaved |", "| 16 x n=16 |"):
        assert kind in out, kind
    assert "clients still running after a load: 0" in out
    assert results.read_bytes() == before  # nothing appended without --append-results
