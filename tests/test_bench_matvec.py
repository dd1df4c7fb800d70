"""benchmarks/bench_matvec.py runs end to end on a tiny model and appends its report, with a row per
kernel and per step run (CTranslate2's only where it is installed)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from benchmarks import bench_matvec as bench


@pytest.mark.slow  # about 10 seconds on two cores
def test_bench_matvec_runs_and_appends_its_report(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "PAUSE", 0.0)
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## before\n", encoding="utf-8")
    with_ct2 = importlib.util.find_spec("ctranslate2") is not None and importlib.util.find_spec("transformers")
    imported_before = "ctranslate2" in sys.modules  # another test may have imported it
    report = bench.main(["--preset", "tiny", "--rounds", "1", "--append-results", str(results)])
    assert results.read_text(encoding="utf-8") == "# Benchmark results\n\n## before\n\n" + report
    assert report.startswith("## float32 matrix-vector kernels and the decode step")
    assert "python -m benchmarks.bench_matvec --preset tiny --rounds 1" in report and "CPU flags present:" in report
    for row in (
        'F.linear, plain weights (tegaki\'s "plain" path)',
        'oneDNN on the weight ("onednn")',
        'oneDNN packed copy ("packed")',
        "ceiling: read every weight once (a sum)",
    ):
        assert f"| {row} |" in report
    assert "products alone (measured paths) |" in report and "| tegaki fp32, whole eager decoding |" in report
    assert ("| CTranslate2 fp32, whole decoding |" in report) == bool(with_ct2)
    assert imported_before or "ctranslate2" not in sys.modules  # CTranslate2 ran in its own process
