"""benchmarks/bench_generate.py runs end to end, and its report goes to the end of a results file
without changing what was there. A tiny model and one quick round keep it cheap; CTranslate2 is
optional, so its rows are checked only where it is installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_generate.py"


def load_bench():
    if "bench_generate" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_generate", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_generate"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_generate"]


@pytest.mark.slow  # about 20 seconds on two cores
def test_bench_generate_runs_and_appends_its_report(tmp_path):
    pytest.importorskip("transformers")
    bench = load_bench()
    results = tmp_path / "RESULTS.md"
    before = "# Benchmark results\n\n## An earlier section\n\nkept byte for byte, even without a final newline"
    results.write_text(before, encoding="utf-8")
    args = ["--preset", "tiny", "--quick", "--no-compile", "--skip-perplexity", "--append-results", str(results)]
    report = bench.main(args)

    after = results.read_text(encoding="utf-8")
    assert after.startswith(before) and after.endswith(report)
    assert report.startswith("## Generation side by side")
    assert "bench_generate.py --preset tiny --quick" in report  # the command is recorded
    assert "CPU flags present:" in report and "threads" in report
    for title in ("**Batch 1:", "**Prefill:", "**Batch 8:"):
        assert title in report
    for row in ("transformers fp32", "tegaki fp32", "tegaki bf16", "tegaki int8", "tegaki int4"):
        assert f"| {row} |" in report
    assert "Every contestant made exactly the new tokens asked for: yes." in report
    assert "- batch 1, tegaki fp32: 32/32" in report  # greedy tokens as transformers'
    assert "- batch 8, tegaki fp32: 256/256" in report
    if importlib.util.find_spec("ctranslate2") is not None:
        assert "| CTranslate2 fp32 |" in report and "| CTranslate2 int8" in report
        against = " ".join(report.split("Against CTranslate2, ratios within each round:")[1].split("\n\n")[0].split())
        assert "tegaki fp32 " in against and "of CTranslate2 fp32" in against and "of CTranslate2 int8" in against
    else:
        assert "ctranslate2 is not installed" in report


def test_without_ctranslate2_its_rows_are_left_out(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now fails
    assert bench.ctranslate2_contestants("unused", "unused", vocab_size=16, threads=1) == []
    assert "ctranslate2 is not installed" in capsys.readouterr().err


def test_an_emulated_isa_must_be_set_before_the_libraries_load(monkeypatch):
    """--isa avx2 caps every kernel library through its own environment variable, which the library
    reads when it loads: called in a process where they are not set, the benchmark refuses rather
    than report an emulation that did not happen."""
    bench = load_bench()
    for name in bench.ISA_CAPS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="--isa avx2 must be set before the libraries load"):
        bench.main(["--isa", "avx2", "--quick"])
    assert set(bench.ISA_CAPS["avx2"]) >= {"ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY"}


def test_a_compiled_rows_first_call_is_reported_beside_its_eager_twins():
    bench = load_bench()
    row = bench.Row
    rows = {
        ("batch 1", "tegaki fp32"): row([1.0], [1.0], [[1]], first_call=2.0),
        ("batch 1", "tegaki fp32, compiled"): row([1.0], [1.0], [[1]], first_call=27.5),
        ("batch 1", "tegaki int8"): row([1.0], [1.0], [[1]], first_call=1.0),
        ("batch 8", "tegaki fp32"): row([1.0], [1.0], [[1]], first_call=9.0),
    }
    text = " ".join(" ".join(bench.compile_cost_lines(rows, inductor_files=0)).split())
    assert "cache empty at the start" in text and "tegaki fp32, compiled 27.5 s (eager: 2.0 s)" in text
    assert "int8" not in text and "9.0" not in text  # no compiled twin; another job
    assert "holding 12 files" in " ".join(bench.compile_cost_lines(rows, inductor_files=12))
    del rows["batch 1", "tegaki fp32, compiled"]
    assert bench.compile_cost_lines(rows, inductor_files=0) == []  # --no-compile: nothing to say


def test_setup_only_reports_the_first_token_of_a_call_per_layout(tmp_path):
    """--setup-only times the first token of a call for each layout a call can use, with the machine
    and the command, and appends the section like the full report."""
    bench = load_bench()
    results = tmp_path / "RESULTS.md"
    report = bench.main(["--preset", "tiny", "--setup-only", "--rounds", "2", "--append-results", str(results)])
    assert report.startswith("## What a call sets up") and results.read_text(encoding="utf-8").endswith(report)
    assert "--setup-only --rounds 2" in report and "CPU flags present:" in report
    rows = [line for line in report.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:3] == ["fp32, model.generate (default)", "fp32, prepared once", "fp32, nn.Linear (prepare=False)"]
    assert len(names) == (6 if bench.bf16_matmul_in_hardware() else 3)
    for row in rows:
        median, low_high = row.split("|")[2].strip(), row.split("|")[3].strip()
        low, high = (float(v) for v in low_high.split("-"))
        assert low <= float(median) <= high and low > 0
