"""`tegaki export RUN OUT --web`: the folder, the refusals, and the page in a real browser.

The browser tests serve the exported folder with Python's static file server and open it in
headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; skipped, with the
reason, when missing). The page's greedy ids must equal tegaki's, and its first-step logits be
within 1e-4 of tegaki's, with the WebAssembly kernels and with the JavaScript fallback. The
reference is tegaki's own model with its weights rounded to the file's float16, computed in
float32 as the page computes.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import shutil
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import torch
from finetune_models import make_run

from tegaki.checkpoint import (
    load_run_model,
    load_run_tokenizer,
    read_safetensors,
    safetensors_metadata,
    save_checkpoint,
)
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.model import GPT
from tegaki.tokenizer import Tokenizer, train_bpe
from tegaki.tokenizer import load as tokenizer_load
from tegaki.web import WEB_FILES, build, export_web, web_refusals, write_web_folder
from tegaki.web.build import check as check_wasm
from tegaki.web.export import web_tokenizer

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
PROMPT = "To be, or not to be: 吾輩は猫である。"
# What pre-tokenizing regexes treat differently: contractions in any case, digit runs, runs of
# spaces and newlines, punctuation, Japanese, a special token in the text, an emoji (4 bytes).
TRICKY = (
    " The quick brown fox jumps over the lazy dog. 名前はまだ無い。 I'M sure it's 12345 DON'T\n\n  x\t!!?"
    "<|endoftext|>😀 "
)
STEPS = 64


# -------------------------------------------------------------------------------------------------
# Run folders and the reference
# -------------------------------------------------------------------------------------------------


def web_run(
    folder: Path, preset: str, seed: int = 0, vocab_size: int | None = None, pattern: str = "gpt2", **overrides
) -> Path:
    """A run folder of `preset` at its own shape, its random weights spread wider than at
    initialisation so greedy choices are clear, with a 400-token BPE that has seen Japanese (the
    model's vocabulary that BPE's, or `vocab_size` when a speed needs the preset's own)."""
    tokenizer = train_bpe([(PROMPT + TRICKY) * 8], 400, pattern=pattern)
    config = ModelConfig.preset(preset).replace(
        vocab_size=vocab_size or tokenizer.vocab_size, block_size=256, **overrides
    )
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True)
    tokenizer.save(folder / "tokenizer")
    info = {"model_config": config.to_dict(), "tokenizer": "tokenizer", "train": {}}
    (folder / "run.json").write_text(json.dumps(info))
    save_checkpoint(folder, 1, model.state_dict(), {}, {}, config, keep=1)
    return folder


def reference(run: Path, prompt: str, steps: int, dtype=torch.float16) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, greedy ids, first-step logits) from tegaki, weights rounded to the file's dtype."""
    model = load_run_model(run)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    prompt_ids = load_run_tokenizer(run).encode(prompt)
    ids = torch.tensor([prompt_ids])
    generated, first = [], None
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids)[0, -1]
            first = logits if first is None else first
            token = int(logits.argmax())
            generated.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return prompt_ids, generated, first


# -------------------------------------------------------------------------------------------------
# The folder, without a browser
# -------------------------------------------------------------------------------------------------


def test_the_folder_holds_the_page_the_weights_and_the_tokenizer(tmp_path):
    run = make_run(tmp_path / "run", preset="tiny")
    out = export_web(run, tmp_path / "web")
    assert sorted(p.name for p in out.iterdir()) == sorted(WEB_FILES)
    spec = json.loads((out / "tokenizer.bpe.json").read_text())
    tokenizer = load_run_tokenizer(run)
    assert len(spec["vocab"]) == tokenizer.vocab_size and len(spec["merges"]) == 3 * len(tokenizer.merges)
    export_web(run, tmp_path / "web")  # an earlier web export is overwritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(TegakiError, match="did not write"):
        export_web(run, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_the_same_compiler_builds_the_same_wasm_bytes(tmp_path):
    """Where the recorded rustc is installed, the committed module is byte for byte its build."""
    rustc = build.find_rustc()
    recorded = json.loads(build.RECORD.read_text())["rustc"]
    if rustc is None or build.rustc_version(rustc) != recorded:
        pytest.skip(f"no {recorded} with the wasm32 standard library (apt-get install rustc libstd-rust-dev-wasm32)")
    build.compile_kernels(rustc, tmp_path / "kernels.wasm")
    assert (tmp_path / "kernels.wasm").read_bytes() == build.WASM.read_bytes()


@pytest.mark.parametrize(
    "preset, refused",
    [("tiny-gpt-oss", "mixture of experts .*, attention sinks"), ("tiny-gated", "gated attention")],
)
def test_families_the_kernels_do_not_compute_are_refused_before_writing(tmp_path, preset, refused):
    run = make_run(tmp_path / "run", preset=preset, n_layer=4)
    with pytest.raises(TegakiError, match=refused):
        export_web(run, tmp_path / "web")
    assert not (tmp_path / "web").exists()


def test_a_run_the_page_cannot_hold_is_refused_before_its_weights_are_read(tmp_path):
    run = tmp_path / "run"  # run.json alone: reading weights would fail first ("no checkpoint yet")
    run.mkdir()
    config = ModelConfig.preset("llama-3.2-1b")
    (run / "run.json").write_text(json.dumps({"model_config": config.to_dict(), "tokenizer": "gpt2", "train": {}}))
    with pytest.raises(TegakiError, match="GiB of float32 weights"):
        export_web(run, tmp_path / "web")


def test_gpt2_and_llama_style_flags_are_accepted():
    for preset in ("gpt2", "gpt2-medium", "demo", "tiny-llama", "tiny-qwen3", "qwen3-0.6b"):
        assert web_refusals(ModelConfig.preset(preset)) == [], preset
    assert "attention sinks (attn_sinks)" in web_refusals(ModelConfig.preset("gpt-oss-20b"))
    (too_big,) = web_refusals(ModelConfig.preset("llama-3.2-1b"))  # 1.2B parameters: 4.6 GiB in float32
    assert "GiB of float32 weights" in too_big


def test_the_command_writes_the_folder_and_says_how_to_open_it(tmp_path, capsys):
    from tegaki.cli import main

    run = make_run(tmp_path / "run", preset="tiny-llama")
    assert main(["export", str(run), str(tmp_path / "web"), "--web", "--dtype", "float32"]) == 0
    assert "python -m http.server" in capsys.readouterr().err
    metadata = json.loads(safetensors_metadata(tmp_path / "web" / "model.safetensors")["tegaki_web"])
    assert metadata["config"]["n_kv_head"] == 2 and metadata["config"]["mlp"] == "swiglu"
    assert {t.dtype for t in read_safetensors(tmp_path / "web" / "model.safetensors").values()} == {torch.float32}


def test_tokenizers_the_page_cannot_run_are_refused(tmp_path):
    own_regex = train_bpe(["some text, some more text"] * 4, 270, pattern=r"\w+|\s+|[^\w\s]+")
    with pytest.raises(TegakiError, match="its own regex"):
        web_tokenizer(own_regex)
    with pytest.raises(TegakiError, match="byte-level BPE"):
        web_tokenizer(Tokenizer())


def test_the_committed_wasm_is_the_build_of_the_kernel_source(tmp_path, monkeypatch):
    assert build.main(["--check"]) == 0  # make web rebuilds it where a wasm32 rustc is installed
    changed = tmp_path / "kernels.rs"
    changed.write_text(build.SOURCE.read_text() + "// an edit\n")
    monkeypatch.setattr(build, "SOURCE", changed)
    with pytest.raises(TegakiError, match="changed since kernels.wasm was built"):
        check_wasm()


# -------------------------------------------------------------------------------------------------
# The page in headless Chromium
# -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def static_server(folder: Path):
    """Python's static file server on a free port, in a thread: the page needs nothing else."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium and chromedriver found (apt-get install chromium chromium-driver)")
    from test_page_browser import headless_chromium  # the server page's tests start Chromium the same way

    profile = tempfile.mkdtemp(prefix="tegaki-chromium-")
    driver = headless_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_page(
    driver, url: str, prompt: str, steps: int, kernels: str | None = None, timeout: float = 120, **sampling
) -> dict:
    """Open the page with ?prompt=...&greedy=N (with sampling settings: &sample=N&temperature=...)
    and read what it wrote into its <pre> elements."""
    mode = "sample" if sampling else "greedy"
    query = {"prompt": prompt, mode: steps, **({"kernels": kernels} if kernels else {}), **sampling}
    driver.get(f"{url}/index.html?{urllib.parse.urlencode(query)}")
    deadline = time.monotonic() + timeout
    read = "return ['prompt-ids','result','logits','speed','error'].map(id => document.getElementById(id).textContent);"
    while time.monotonic() < deadline:
        prompt_ids, result, logits, speed, error = driver.execute_script(read)
        assert not error, f"the page failed: {error}"
        if result:
            return {
                "prompt_ids": json.loads(prompt_ids),
                "ids": json.loads(result),
                "logits": torch.tensor(json.loads(logits)),
                "speed": json.loads(speed),
                "kernels": json.loads(speed)["kernels"],
            }
        time.sleep(0.05)
    raise AssertionError(f"the page wrote no result in {timeout} s")


@pytest.mark.slow  # a browser starts
@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_the_page_tokenizes_and_streams_as_tegaki_does(browser, tmp_path, pattern):
    """The regex in JavaScript's dialect, the merges, special tokens; decoding token by token never
    shows a half character (each piece is what tegaki's stream decoder gives)."""
    run = web_run(tmp_path / "run", "demo", pattern=pattern)
    out = export_web(run, tmp_path / "web")
    tokenizer = load_run_tokenizer(run)
    texts = [PROMPT, TRICKY, TRICKY.upper() + PROMPT * 2, "  leading and trailing  \n", "ね"]
    with static_server(out) as url:
        browser.get(f"{url}/index.html")
        page = browser.execute_async_script(
            """const [texts, done] = arguments;
            Tokenizer.load("tokenizer.bpe.json").then((tok) => done(texts.map((text) => {
                const ids = tok.encode(text), d = tok.decoder();
                return {ids, pieces: [...ids.map((id) => d.push(id)), d.flush()]};
            })));""",
            texts,
        )
    for text, got in zip(texts, page):
        ids = tokenizer.encode(text)
        assert got["ids"] == ids, text
        assert "".join(got["pieces"]) == text
        assert [p for p in got["pieces"] if p] == [p for p in tokenizer.stream_decode(ids) if p]


@pytest.mark.slow  # a browser starts
def test_gpt2s_vocabulary_tokenizes_english_and_japanese_text_as_tegaki_does(browser, tmp_path):
    """GPT-2's 50,000 merges on Shakespeare and on Japanese manual pages (../shared/data, when there)."""
    from tegaki.data import shakespeare_text

    tokenizer = tokenizer_load("gpt2")
    tiny = ModelConfig.preset("gpt2").replace(n_layer=1, n_head=1, n_embd=8, block_size=16)
    out = write_web_folder(GPT(tiny), tokenizer, tmp_path / "web", name="gpt2-vocabulary")
    english = shakespeare_text()[:20_000]
    japanese = Path(__file__).resolve().parents[2] / "shared" / "data" / "ja_manpages_sec1.txt"
    texts = [english[i : i + 2000] for i in range(0, len(english), 2000)]
    if japanese.exists():
        text = japanese.read_text(encoding="utf-8")[:20_000]
        texts += [text[i : i + 2000] for i in range(0, len(text), 2000)]
    with static_server(out) as url:
        browser.get(f"{url}/index.html")
        ids = browser.execute_async_script(
            """const [texts, done] = arguments;
            Tokenizer.load("tokenizer.bpe.json").then((tok) => done(texts.map((text) => tok.encode(text))));""",
            texts,
        )
    assert ids == [tokenizer.encode(text) for text in texts]


@pytest.mark.slow  # a browser starts
def test_sampling_repeats_with_its_seed_and_narrows_to_greedy(browser, tmp_path):
    """temperature, top-k, top-p and seed from the URL; the page's views drawn after a run."""
    run = web_run(tmp_path / "run", "tiny-llama")
    out = export_web(run, tmp_path / "web")
    greedy = reference(run, PROMPT, 16)[1]
    with static_server(out) as url:
        first = run_page(browser, url, PROMPT, 16, temperature=1.5, seed=7)["ids"]
        assert run_page(browser, url, PROMPT, 16, temperature=1.5, seed=7)["ids"] == first
        assert run_page(browser, url, PROMPT, 16, temperature=1.5, seed=8)["ids"] != first
        assert first != greedy[: len(first)]
        assert run_page(browser, url, PROMPT, 16, temperature=1.5, top_k=1, seed=7)["ids"] == greedy
        bars = browser.execute_script("return document.querySelectorAll('#bars .bar-row').length")
        rendered = browser.execute_script("return Number(document.getElementById('attention-view').dataset.rendered)")
    assert bars == 10 and rendered == len(reference(run, PROMPT, 0)[0]) + 16


@pytest.mark.slow  # a browser starts
@pytest.mark.parametrize("preset", ["demo", "tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("kernels", ["wasm", "js"])
def test_the_page_generates_tegakis_greedy_tokens(browser, tmp_path_factory, preset, kernels):
    run = web_run(tmp_path_factory.mktemp(preset) / "run", preset)
    out = export_web(run, run.parent / "web")
    prompt_ids, ids, logits = reference(run, PROMPT, STEPS)
    with static_server(out) as url:
        page = run_page(browser, url, PROMPT, STEPS, kernels)
    assert page["kernels"] == {"wasm": "wasm-simd128", "js": "javascript"}[kernels]
    assert page["prompt_ids"] == prompt_ids  # the tokenizer, Japanese included
    assert (page["logits"] - logits).abs().max() < 1e-4
    assert page["ids"] == ids


@pytest.mark.slow  # a browser starts
def test_the_flags_mixed_differently_give_tegakis_tokens(browser, tmp_path):
    """No positions at all, RMSNorm with GELU, an untied head without a final norm, a set attention
    scale, a rotary model with Llama 3's frequency scaling: each path of model.js, once more."""
    runs = {
        "plain": web_run(
            tmp_path / "plain",
            "tiny",
            pos_embedding="none",
            norm="rmsnorm",
            tie_embeddings=False,
            final_norm=False,
            attn_scale=0.3,
        ),
        "llama3": web_run(
            tmp_path / "llama3", "tiny-llama", rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32
        ),
    }
    for name, run in runs.items():
        out = export_web(run, tmp_path / f"{name}-web")
        _, ids, logits = reference(run, PROMPT, 32)
        with static_server(out) as url:
            page = run_page(browser, url, PROMPT, 32)
        # Without a final norm the logits grow to hundreds: float32 holds them to about 1e-5 of their size.
        assert (page["logits"] - logits).abs().max() < 1e-4 * max(1.0, float(logits.abs().max())), name
        assert page["ids"] == ids, name


@pytest.mark.slow  # a browser starts
def test_a_browser_that_cannot_run_the_wasm_gets_the_javascript_kernels(browser, tmp_path):
    """As a browser without wasm SIMD sees kernels.wasm: a module it cannot validate."""
    run = web_run(tmp_path / "run", "demo")
    out = export_web(run, tmp_path / "web")
    (out / "kernels.wasm").write_bytes(b"\0asm\x01\0\0\0 not a module this browser runs")
    _, ids, _ = reference(run, PROMPT, 16)
    with static_server(out) as url:
        page = run_page(browser, url, PROMPT, 16)
    assert page["kernels"] == "javascript" and page["ids"] == ids


@pytest.mark.slow  # a browser starts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_weights_in_float32_or_bfloat16_give_tegakis_tokens(browser, tmp_path, dtype):
    run = web_run(tmp_path / "run", "tiny-llama")
    out = export_web(run, tmp_path / "web", dtype=dtype)
    _, ids, logits = reference(run, PROMPT, STEPS, dtype=getattr(torch, dtype))
    with static_server(out) as url:
        page = run_page(browser, url, PROMPT, STEPS)
    assert (page["logits"] - logits).abs().max() < 1e-4
    assert page["ids"] == ids


# -------------------------------------------------------------------------------------------------
# Speed (benchmarks/RESULTS.md, "The page in a browser"): tokens/s of the page's generation loop,
# views included, after the prompt; several page loads, their figures printed (pytest -s)
# -------------------------------------------------------------------------------------------------


def page_speeds(driver, url: str, prompt: str, steps: int, rounds: int, timeout: float = 120, kernels=None) -> list:
    """Tokens/s of `rounds` page loads, printed with the load times; the last page's answer too."""
    pages = [run_page(driver, url, prompt, steps, kernels, timeout=timeout) for _ in range(rounds)]
    runs = [page["speed"] for page in pages]
    speeds = [r["tokens_per_s"] for r in runs]
    figures = ", ".join(f"{v:.1f}" for v in speeds)
    loads = ", ".join(f"{r['load_ms'] / 1000:.1f}" for r in runs)
    print(f"\n{steps} tokens, {runs[0]['kernels']}, {rounds} page loads: tokens/s {figures}; loaded in s {loads}")
    return speeds, pages[-1]


@pytest.mark.slow  # a browser starts
def test_the_demo_model_generates_200_tokens_per_second(browser, tmp_path):
    """The demo preset at its own size (1.35M parameters, vocabulary 4,096), WebAssembly kernels."""
    out = export_web(web_run(tmp_path / "run", "demo", vocab_size=4096), tmp_path / "web")
    assert sum(f.stat().st_size for f in out.iterdir()) < 5e6  # the folder a friend downloads
    with static_server(out) as url:
        speeds, _ = page_speeds(browser, url, PROMPT, 200, rounds=3)
        page_speeds(browser, url, PROMPT, 200, rounds=2, kernels="js")  # the fallback, for the record
        drawn = browser.execute_script("return Number(document.getElementById('attention-view').dataset.rendered)")
    assert drawn == 160  # a long text: the attention maps keep its last 160 tokens
    assert max(speeds) >= 200


@pytest.mark.slow  # a 250 MB folder, a browser
def test_gpt2_124m_loads_and_generates_5_tokens_per_second(browser, tmp_path):
    """GPT-2 small's shape (124M parameters, random weights, float16 in the file) with GPT-2's tokenizer."""
    out = write_web_folder(GPT(ModelConfig.preset("gpt2")), tokenizer_load("gpt2"), tmp_path / "web", name="gpt2")
    with static_server(out) as url:
        speeds, page = page_speeds(browser, url, "Hello, I am", 32, rounds=2, timeout=300)
    assert page["prompt_ids"] == [15496, 11, 314, 716]  # GPT-2's own ids
    assert max(speeds) >= 5
