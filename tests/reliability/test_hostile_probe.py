"""tests/reliability/hostile_probe.py runs and finds nothing: the server's cases (a real server) and
train, finetune and export into every folder of a person's. The whole probe (676 cases, about a
minute on two cores) is run by hand; its figures are in benchmarks/RESULTS.md (Reliability)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

PROBE = Path(__file__).resolve().parent / "hostile_probe.py"


@pytest.mark.slow  # about 20 seconds on two cores
def test_the_hostile_probe_finds_nothing_in_serve_and_the_folders():
    command = [sys.executable, str(PROBE), "--only", "serve", "--only", "folders", "--case-timeout", "60"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0 and " 0 broken " in last, done.stdout[-3000:] + done.stderr[-2000:]
