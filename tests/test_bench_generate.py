"""benchmarks/bench_generate.py runs end to end, every engine in a worker process of its own
(benchmarks/engines.py), and its report goes to the end of a results file without changing what was
there. A tiny model and one quick round keep it cheap; CTranslate2 and llama.cpp are optional, so
their rows are checked only where they are installed, and left out with a note elsewhere."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import bench_generate as bench
from benchmarks import contestants, engines


@pytest.mark.slow  # about a minute on two cores: eight workers start
def test_bench_generate_runs_and_appends_its_report(tmp_path):
    pytest.importorskip("transformers")
    results = tmp_path / "RESULTS.md"
    before = "# Benchmark results\n\n## An earlier section\n\nkept byte for byte, even without a final newline"
    results.write_text(before, encoding="utf-8")
    args = ["--preset", "tiny", "--quick", "--no-compile", "--skip-perplexity", "--threads", "1"]
    report = bench.main([*args, "--append-results", str(results)])

    after = results.read_text(encoding="utf-8")
    assert after.startswith(before) and after.endswith(report)
    assert report.startswith("## Generation side by side")
    assert "python -m benchmarks.bench_generate --preset tiny --quick" in report  # the command is recorded
    assert "CPU flags present:" in report and "threads" in report
    for title in ("**Batch 1:", "**Prefill:", "**Batch 8:"):
        assert title in report
    rows = ["transformers fp32", "tegaki fp32, default", "tegaki fp32, plain", "tegaki int8"]
    rows += ["transformers bf16", "tegaki bf16"] if bench.cpu_bf16_hardware() else []
    for row in rows:
        assert f"| {row} |" in report
        assert f"- {row}: " in report.split("What each worker loaded:")[1]  # its worker said what it loaded
    assert "| tegaki fp32, compiled |" not in report  # --no-compile
    assert "Every contestant made exactly the new tokens asked for: yes." in report
    batch1 = report.split("**Batch 1:")[1].split("**Prefill:")[0]
    # greedy tokens as transformers': the same prefix, the same positions, of the 32 made
    assert "| tegaki fp32, default |" in batch1 and "| 32 | 32/32 | 32/32 |" in line_of(batch1, "tegaki fp32, default")
    assert "| 256 | 256/256 | 256/256 |" in line_of(report.split("**Batch 8:")[1], "tegaki fp32, plain")
    assert "Memory-read ceiling, measured in this run" in batch1 and "GB/s" in batch1
    for precision in ("fp32", "bf16", "int8"):
        assert f"{precision} " in batch1.split("allows at most")[1]
    if importlib.util.find_spec("ctranslate2") is not None:
        assert "| CTranslate2 fp32 |" in report and "| CTranslate2 int8 |" in report
        against = " ".join(report.split("Against CTranslate2 and llama.cpp, ratios within each round:")[1].split())
        assert "tegaki fp32, default " in against and "of CTranslate2 fp32" in against
    else:
        assert "ctranslate2 is not installed" in report
    if importlib.util.find_spec("llama_cpp") is not None:  # the tiny preset's 4,096 ids: no GPT-2 tokenizer
        assert "llama.cpp's rows are left out: its converter reads the vocabulary" in report
    else:
        assert "llama-cpp-python is not installed" in report


def line_of(text: str, row: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {row} |"))


def test_agreement_counts_the_prefix_and_the_positions_over_rows():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert contestants.agreement(reference, reference) == (8, 8, 8)
    # row 1 parts at its third token and finds its way back; row 2 differs from the first
    assert contestants.agreement([[1, 2, 9, 4], [0, 6, 7, 8]], reference) == (2, 6, 8)
    assert contestants.agreement([[1, 2]], [[1, 2, 3, 4]]) == (2, 2, 4)  # a short row: the missing ones differ


def test_without_ctranslate2_its_rows_are_left_out(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now fails
    notes = []
    assert contestants.ctranslate2_contestants("unused", "unused", vocab_size=16, threads=1, notes=notes) == []
    assert "ctranslate2 is not installed" in capsys.readouterr().err and "ctranslate2 is not installed" in notes[0]


def test_without_llama_cpp_its_rows_are_left_out(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now fails
    config = bench.ModelConfig.preset("gpt2")
    notes = []
    assert contestants.llama_cpp_contestants("unused", tmp_path, config, 1, None, notes) == []
    assert notes == ["llama-cpp-python is not installed (pip install llama-cpp-python): its rows are left out"]
    assert "llama-cpp-python is not installed" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing converted, nothing downloaded


def test_llama_cpp_rows_need_a_vocabulary_that_holds_gpt2s_tokenizer(monkeypatch, tmp_path):
    """llama.cpp's converter reads the vocabulary from the folder's tokenizer, and GPT-2's is the one
    the benchmark writes: a model with fewer ids is left out with a note, before any download."""
    monkeypatch.setattr(contestants, "engine_available", lambda module: True)
    monkeypatch.setattr(contestants, "llama_cpp_converter", lambda source: pytest.fail("nothing to convert"))
    notes = []
    assert contestants.llama_cpp_contestants("unused", tmp_path, bench.ModelConfig.preset("tiny"), 1, None, notes) == []
    assert "GPT-2's (50,257 ids) does not fit this model's 4,096" in notes[0]


def fake_sdist(path: Path, files: dict[str, str]) -> Path:
    """A llama-cpp-python source distribution holding `files` (path under vendor/llama.cpp -> text)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"llama_cpp_python-9.9.9/vendor/llama.cpp/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return path


LLAMA_FILES = {
    "convert_hf_to_gguf.py": "# the converter",
    "conversion/__init__.py": "",
    "gguf-py/gguf/__init__.py": "",
    "ggml/src/ggml.c": "int main;",  # C++ sources: not needed to convert
    "tests/test_tokenizer.py": "",
}


def test_the_converter_is_unpacked_from_a_source_distribution_once(tmp_path):
    sdist = fake_sdist(tmp_path / "llama_cpp_python-9.9.9.tar.gz", LLAMA_FILES)
    folder = engines.unpack_converter(sdist, tmp_path / "cache")
    assert folder == tmp_path / "cache" / "llama_cpp_python-9.9.9" == engines.find_converter(folder)
    assert (folder / "convert_hf_to_gguf.py").read_text() == "# the converter"
    assert (folder / "conversion" / "__init__.py").exists() and (folder / "gguf-py" / "gguf" / "__init__.py").exists()
    assert not (folder / "ggml").exists() and not (folder / "tests").exists()
    sdist.unlink()  # a second call finds it unpacked
    assert engines.unpack_converter(sdist, tmp_path / "cache") == folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no half-made folder left


def test_the_converter_comes_from_the_source_named_or_the_installed_versions_sdist(tmp_path, monkeypatch, capsys):
    llama = tmp_path / "llama.cpp"  # a llama.cpp checkout
    for name in ("convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"):
        (llama / name).parent.mkdir(parents=True, exist_ok=True)
        (llama / name).write_text("")
    assert engines.llama_cpp_converter(str(llama)) == llama
    sdist_folder = tmp_path / "llama_cpp_python-1.0"  # an unpacked llama-cpp-python source
    (sdist_folder / "vendor").mkdir(parents=True)
    llama.rename(sdist_folder / "vendor" / "llama.cpp")
    assert engines.llama_cpp_converter(str(sdist_folder)) == sdist_folder / "vendor" / "llama.cpp"
    with pytest.raises(SystemExit, match="expected llama.cpp's source folder"):
        engines.llama_cpp_converter(str(tmp_path))

    # None named: the installed version's source, downloaded once into the cache, and said so
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("importlib.metadata.version", lambda name: "9.9.9")
    commands = []

    def pip(command, **kwargs):
        commands.append(command)
        dest = Path(command[command.index("--dest") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        fake_sdist(dest / "llama_cpp_python-9.9.9.tar.gz", LLAMA_FILES)

    monkeypatch.setattr(engines.subprocess, "run", pip)
    folder = engines.llama_cpp_converter(None)
    assert folder == tmp_path / "xdg" / "tegaki" / "llama.cpp" / "llama_cpp_python-9.9.9"
    assert commands[0][1:] == [
        "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python==9.9.9",
        "--dest", str(tmp_path / "xdg" / "tegaki" / "llama.cpp"),
    ]  # fmt: skip
    assert "downloading its source (llama-cpp-python 9.9.9)" in capsys.readouterr().err
    assert engines.llama_cpp_converter(None) == folder and len(commands) == 1  # once


def tiny_folder(tmp_path: Path, **changes) -> tuple[object, Path]:
    """A tiny random GPT-2 written as a transformers folder (with GPT-2's tokenizer where it fits)."""
    from tegaki import tokenizer as tokenizers
    from tegaki.config import ModelConfig
    from tegaki.load import export_hf
    from tegaki.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny").replace(n_layer=2, **changes)).eval()
    tokenizer = tokenizers.load("gpt2") if model.config.vocab_size >= 50257 else None
    return model, export_hf(model, tmp_path / "hf", tokenizer=tokenizer)


def test_a_worker_answers_jobs_with_the_tokens_of_its_engine(tmp_path):
    """The worker protocol end to end on a tiny model: a tegaki worker loads the folder, says what it
    loaded, returns the greedy tokens the same model makes here, times the call itself, and ends
    when its stdin closes. A worker that cannot load says which, and how it ended."""
    model, folder = tiny_folder(tmp_path)
    spec = {"engine": "tegaki", "folder": str(folder), "precision": "fp32", "path": "plain", "threads": 1}
    worker = engines.Worker(spec)
    try:
        assert worker.ready().startswith("tegaki, fp32, linear layers (out x in): ")
        ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
        tokens, seconds = worker(ids.tolist(), 7)
        want = engines.tegaki_generate(engines.prepare_tegaki(model, "plain"), ids, 7)[:, 5:].tolist()
        assert tokens == want and seconds > 0
        assert worker(ids[:1].tolist(), 3)[0] == [want[0][:3]]  # kept for the next job
    finally:
        worker.close()
    assert worker.process.returncode == 0

    broken = engines.Worker(
        {"engine": "tegaki", "folder": str(tmp_path / "missing"), "precision": "fp32", "threads": 1}
    )
    with pytest.raises(RuntimeError, match="the tegaki worker .* stopped with exit status 1"):
        broken([[1, 2]], 1)
    broken.close()


def llama_cpp_source() -> str | None:
    """llama.cpp's source for its converter, without downloading: $TEGAKI_LLAMA_CPP_SOURCE, or the
    installed version's source where an earlier benchmark run downloaded it."""
    if os.environ.get("TEGAKI_LLAMA_CPP_SOURCE"):
        return os.environ["TEGAKI_LLAMA_CPP_SOURCE"]
    from importlib.metadata import version

    name = f"llama_cpp_python-{version('llama-cpp-python')}"
    for cached in (engines.cache_folder() / name, engines.cache_folder() / f"{name}.tar.gz"):
        if cached.exists():
            return str(cached)
    return None


@pytest.mark.slow  # two conversions and a llama.cpp model: about 30 seconds
def test_llama_cpp_decodes_the_greedy_tokens_of_tegaki_fp32(tmp_path, monkeypatch):
    """llama.cpp's own converter makes GGUF files of the folder the other engines load, and
    llama.cpp, given the same token ids, makes the same greedy tokens in f32 as tegaki fp32: the
    same weights, read the same way (q/k/v, the tied head, the positions). q8_0 makes as many, most of
    them the same."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    pytest.importorskip("transformers", reason="llama.cpp's converter reads the folder with transformers")
    source = llama_cpp_source()
    if source is None:
        pytest.skip("llama.cpp's source is not at hand: set TEGAKI_LLAMA_CPP_SOURCE to it (no download in tests)")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a source distribution unpacks there
    model, folder = tiny_folder(tmp_path, vocab_size=50257)
    ids = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    want = engines.tegaki_generate(engines.prepare_tegaki(model, "plain"), ids, 16)[:, 12:].tolist()
    notes = []
    llama = contestants.llama_cpp_contestants(str(folder), tmp_path / "gguf", model.config, 1, source, notes)
    try:
        assert [(c.name, c.precision, c.jobs) for c in llama] == [
            ("llama.cpp f32", "fp32", ("batch 1", "prefill")),
            ("llama.cpp q8_0", "int8", ("batch 1", "prefill")),
        ]
        f32, q8_0 = ([c.worker.ready(), *c.run(ids, 16)] for c in llama)
    finally:
        for c in llama:
            c.worker.close()
    assert f32[0].startswith("llama-cpp-python ") and f32[0].endswith("model-f32.gguf")
    assert f32[1] == want and f32[2] > 0
    assert [len(row) for row in q8_0[1]] == [16, 16]
    assert contestants.agreement(q8_0[1], want)[1] >= 24  # q8_0 moves the logits by about a percent: a tie may flip
    assert notes == ["llama.cpp runs batch 1 and the prefill: llama-cpp-python's Llama holds one sequence."]


def test_an_emulated_isa_must_be_set_before_the_libraries_load(monkeypatch):
    """--isa avx2 caps every kernel library through its own environment variable, which the library
    reads when it loads: called in a process where they are not set, the benchmark refuses rather
    than report an emulation that did not happen."""
    for name in bench.ISA_CAPS["avx2"]:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit, match="--isa avx2 must be set before the libraries load"):
        bench.main(["--isa", "avx2", "--quick"])
    assert set(bench.ISA_CAPS["avx2"]) >= {"ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "TORCHINDUCTOR_CACHE_DIR"}


def test_a_compiled_rows_first_call_is_reported_beside_its_eager_twins():
    row = bench.Row
    rows = {
        ("batch 1", "tegaki fp32, default"): row([1.0], [1.0], [[1]], first_call=2.0),
        ("batch 1", "tegaki fp32, compiled"): row([1.0], [1.0], [[1]], first_call=27.5),
        ("batch 1", "tegaki int8"): row([1.0], [1.0], [[1]], first_call=1.0),
        ("batch 8", "tegaki fp32, default"): row([1.0], [1.0], [[1]], first_call=9.0),
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
    results = tmp_path / "RESULTS.md"
    report = bench.main(["--preset", "tiny", "--setup-only", "--rounds", "2", "--append-results", str(results)])
    assert report.startswith("## What a call sets up") and results.read_text(encoding="utf-8").endswith(report)
    assert "--setup-only --rounds 2" in report and "CPU flags present:" in report
    rows = [line for line in report.splitlines() if line.startswith("| fp32") or line.startswith("| bf16")]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:3] == ["fp32, model.generate (default)", "fp32, prepared once", "fp32, plain nn.Linear"]
    assert len(names) == (6 if bench.cpu_bf16_hardware() else 3)
    for row in rows:
        median, low_high = row.split("|")[2].strip(), row.split("|")[3].strip()
        low, high = (float(v) for v in low_high.split("-"))
        assert low <= float(median) <= high and low > 0


def test_perplexity_token_by_token_is_what_generation_computes():
    """logits_token_by_token steps through the KV cache: in fp32 it gives the whole-sequence logits
    (up to float order), over more sequences than one decode step takes; int8 there runs its
    decode-step formula (int8 activations), close to but not the same as its whole-sequence one."""
    from tegaki.config import ModelConfig
    from tegaki.model import GPT
    from tegaki.quant import ROWS_BY_LOOP

    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny").replace(n_layer=2, vocab_size=256, block_size=16)).eval()
    x = torch.randint(0, 256, (ROWS_BY_LOOP + 3, 6))
    with torch.inference_mode():
        whole = model(x)
        torch.testing.assert_close(bench.logits_token_by_token(model, x), whole, rtol=1e-4, atol=1e-4)
        int8 = engines.tegaki_variant(model, "int8")
        by_token, at_once = bench.logits_token_by_token(int8, x), int8(x)
    assert not torch.equal(by_token, at_once)
    assert ((by_token - at_once).norm() / at_once.norm()).item() < 0.02
