"""Generation: the KV cache changes nothing but speed, batches equal single prompts, bad input is
refused with a clear message, and the `tegaki generate` command samples and streams text."""

import os

import pytest
import torch

from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.decoding import prepare_for_decoding
from tegaki.device import has_cxx_compiler
from tegaki.errors import TegakiError
from tegaki.generate import StopText, generate, generate_tokens, left_pad
from tegaki.kv_cache import KVCache
from tegaki.model import GPT
from tegaki.sampling import SamplingSettings

FAMILIES = ["tiny", "tiny-llama", "tiny-qwen3", "tiny-gpt-oss", "tiny-gpt-oss-yarn", "tiny-gated"]
WINDOW = 12  # shrunk from the presets' 64 so a short generation wraps the ring buffer twice


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def random_model(name: str, **changes) -> GPT:
    """A preset with random weights, made 'opinionated': the default init (std 0.02) gives nearly
    uniform logits whose greedy choice repeats one token, which would hide cache bugs."""
    torch.manual_seed(0)
    config = ModelConfig.preset(name)
    if config.layer_types is not None:
        changes = dict(layer_types=["sliding", "full"], sliding_window=WINDOW) | changes
    config = config.replace(n_layer=2, **changes)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.add_(0.1 * torch.randn_like(p))  # norms, biases, sinks away from their init
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_tokens_are_the_same_with_and_without_the_cache(name):
    model = random_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    with_cache = generate(model, prompt, 30, temperature=0)
    without = generate(model, prompt, 30, temperature=0, use_cache=False)
    assert with_cache.shape == (1, 37)
    assert torch.equal(with_cache[:, :7], prompt)  # the prompt comes back in front
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, 7:].tolist())) > 5  # not a degenerate repetition


def test_written_out_attention_agrees_with_the_cache_too():
    model = random_model("tiny-gpt-oss", attn_impl="manual")
    prompt = torch.randint(0, 4096, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        generate(model, prompt, 25, temperature=0), generate(model, prompt, 25, temperature=0, use_cache=False)
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt-oss"])
def test_cache_fed_in_chunks_gives_the_full_forward_logits(name):
    # Chunks longer than the window and chunks after the ring has wrapped take the cache's
    # "several tokens into a wrapped ring" path; single tokens take the in-place path.
    model = random_model(name)
    ids = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)  # (2, 40, V)
        cache = KVCache(model.config, 2, 40)
        pieces, start = [], 0
        for size in (15, 1, 1, 13, 1, 9):
            pieces.append(model(ids[:, start : start + size], kv_cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt-oss", "tiny-qwen3"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_left_padded_batch_gives_each_prompt_its_own_tokens(name, use_cache):
    model = random_model(name)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 4096, (n,), generator=g).tolist() for n in (9, 3, 6)]
    ids, mask = left_pad(prompts, pad_id=0)
    batch = generate(model, ids, 20, temperature=0, attention_mask=mask, use_cache=use_cache)
    for b, p in enumerate(prompts):
        alone = generate(model, torch.tensor([p]), 20, temperature=0, use_cache=use_cache)
        assert batch[b, 9:].tolist() == alone[0, len(p) :].tolist()


def test_the_same_seed_gives_the_same_sample():
    model = random_model("tiny-llama")
    prompt = torch.tensor([[1, 2, 3]])
    kw = dict(temperature=1.0, top_k=50, top_p=0.95, min_p=0.01)
    a = generate(model, prompt, 20, seed=7, **kw)
    assert torch.equal(a, generate(model, prompt, 20, seed=7, **kw))
    assert not torch.equal(a, generate(model, prompt, 20, seed=8, **kw))


def test_a_stop_token_ends_the_row_and_pads_the_finished_rows():
    model = random_model("tiny-llama")
    ids, mask = left_pad([[5, 6, 7], [8, 9]])
    free = generate(model, ids, 12, temperature=0, attention_mask=mask)
    stop = int(free[0, 3 + 4])  # row 0's fifth new token
    out = generate(model, ids, 12, temperature=0, attention_mask=mask, stop_tokens=[stop], pad_id=-1)
    first = free[0, 3:].tolist().index(stop)
    assert out[0, 3 : 3 + first + 1].tolist() == free[0, 3 : 3 + first + 1].tolist()
    assert set(out[0, 3 + first + 1 :].tolist()) <= {-1}  # padding after the stop
    row1 = out[1, 3:].tolist()
    assert stop in row1 or row1 == free[1, 3:].tolist()


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i % 26): enough to test stop strings."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_a_stop_string_ends_generation_once_it_appears():
    model = random_model("tiny-llama")
    prompt = torch.tensor([[1, 2, 3]])
    free = generate(model, prompt, 15, temperature=0)
    text = CharTokenizer().decode(free[0, 3:].tolist())
    stop = text[6:8]
    out = generate(model, prompt, 15, temperature=0, stop_strings=[stop], tokenizer=CharTokenizer())
    produced = CharTokenizer().decode(out[0, 3:].tolist())
    assert produced.endswith(stop) and produced == text[: text.index(stop) + 2]


def test_stop_text_holds_back_what_may_start_a_stop_and_cuts_before_it():
    """While text streams, the last (longest stop - 1) characters wait: they may begin a stop
    string. Once one appears the text ends before it, and nothing more is handed out."""
    text = StopText(["\n\n", "END"])
    assert text.add("Hello E") == "Hello"  # " E" may begin "END": held
    assert text.add("xtra") == " Ext"
    assert text.add("\n") == "r"
    assert text.add("\nmore") == "a" and text.stopped  # cut before the blank line
    assert text.text == "Hello Extra" and text.add("anything", final=True) == ""
    assert StopText(["END"]).add("the E", final=True) == "the E"  # the end: nothing is held
    assert StopText([]).add("all at once") == "all at once"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(min_p=2.0), "min_p"),
    ],
)
def test_bad_sampling_settings_are_refused_clearly(kwargs, message):
    model = random_model("tiny")
    with pytest.raises(TegakiError, match=message):
        generate(model, torch.tensor([[1, 2]]), 3, **kwargs)


def test_an_empty_prompt_and_a_too_long_request_are_refused_clearly():
    model = random_model("tiny")  # learned positions: block_size 256 is a hard limit
    with pytest.raises(TegakiError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(TegakiError, match="learned position table"):
        generate(model, torch.ones(1, 250, dtype=torch.long), 10)
    with pytest.raises(TegakiError, match="more than the model's context"):
        generate(random_model("tiny-llama"), torch.ones(1, 300, dtype=torch.long), 1)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt-oss"])
def test_the_static_cache_that_compiling_uses_gives_the_same_tokens(name):
    # A decode_step makes generate use the static cache (every slot, tensor-built masks); here the
    # step is the eager model, so this checks the static cache itself, cheaply, ring included.
    model = random_model(name)
    ids, mask = left_pad([[5, 9, 2, 7, 1, 3], [4, 8]])
    dynamic = generate(model, ids, 25, temperature=0, attention_mask=mask)
    greedy = SamplingSettings(temperature=0)
    static = torch.stack(list(generate_tokens(model, ids, 25, greedy, attention_mask=mask, decode_step=model)), 1)
    assert torch.equal(dynamic[:, 6:], static)


@pytest.mark.slow  # ~10 s of tracing on a quiet machine; the static cache alone is tested above
def test_a_traced_decode_step_gives_the_same_tokens():
    # torch.compile's tracing, graph capture and the static cache's in-place updates, with the
    # cheap aot_eager backend (no code generation); the next test adds inductor's code generation.
    # A Llama with one sliding-window layer, so the ring is traced too. (MoE's per-expert loop has
    # data-dependent shapes; compile an MoE model with moe_impl="dense".)
    model = random_model(
        "tiny-llama",
        n_embd=64,
        n_head=2,
        n_kv_head=1,
        intermediate_size=64,
        sliding_window=WINDOW,
        layer_types=["sliding", "full"],
    )
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(
        generate(model, prompt, 16, temperature=0), generate(model, prompt, 16, temperature=0, compile="aot_eager")
    )


@pytest.mark.slow  # a few seconds of tracing
@pytest.mark.parametrize("name", ["tiny", "tiny-gpt-oss"])  # plain; sinks, sliding window and GQA
def test_a_compiled_cpu_decode_step_attends_written_out_with_the_same_tokens(name, op_calls):
    """decoding.CompiledCpuStep: a compiled one-token step takes the written-out attention (which
    inductor fuses), the eager prompt pass the fused kernel; the tokens are the eager ones."""
    model = random_model(name, **({"moe_impl": "dense"} if name == "tiny-gpt-oss" else {}))
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    eager = generate(model, prompt, 12, temperature=0)
    generate(model, prompt, 12, temperature=0, compile="aot_eager")  # compiled once, outside the count
    fused = "aten::_scaled_dot_product"  # the kernel itself: a traced graph calls it without the wrapper
    assert op_calls(lambda: generate(model, prompt, 12, temperature=0), fused) == 12 * model.config.n_layer
    compiled = []
    run = lambda: compiled.append(generate(model, prompt, 12, temperature=0, compile="aot_eager"))  # noqa: E731
    assert op_calls(run, fused) == model.config.n_layer  # the prompt's pass only
    assert torch.equal(compiled[0], eager)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("TEGAKI_TEST_INDUCTOR") != "1" or not has_cxx_compiler(),
    reason="inductor compiles C++ for a minute or more on 2 cores; set TEGAKI_TEST_INDUCTOR=1 to run it",
)
def test_inductor_compiled_decoding_gives_the_same_tokens():
    model = random_model("tiny-llama", n_embd=64, n_head=2, n_kv_head=1, intermediate_size=128)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(
        generate(model, prompt, 8, temperature=0), generate(model, prompt, 8, temperature=0, compile=True)
    )


# --- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A small GPT-2-shaped model with GPT-2's vocabulary, written as a transformers folder."""
    from tegaki.load import export_hf

    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)
    model = GPT(config).eval()
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.3)
    return export_hf(model, tmp_path_factory.mktemp("gpt2") / "model")


def test_the_command_samples_and_streams_the_same_text(gpt2_folder, capsys):
    args = ["generate", "--model", str(gpt2_folder), "--max-new-tokens", "12", "--seed", "3", "--top-k", "40"]
    prompt = "吾輩は猫である。ROMEO:"
    assert main(args + [prompt]) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--stream", prompt]) == 0
    streamed = capsys.readouterr().out
    assert plain.startswith(prompt) and len(plain) > len(prompt) + 1
    assert streamed == plain  # piece by piece, the same characters as the one-shot decode


def test_the_command_refuses_bad_input_with_a_message(gpt2_folder, capsys):
    base = ["generate", "--model", str(gpt2_folder)]
    assert main(base + ["--top-p", "1.5", "hi"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(base + ["word " * 80]) == 2
    assert "longer than the model's context" in capsys.readouterr().err
    assert main(["generate", "--model", "/no/such/folder", "hi"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_command_runs_quantized_in_bf16_with_several_samples_and_a_stop(gpt2_folder, capsys):
    args = [
        "generate",
        "--model",
        str(gpt2_folder),
        "--max-new-tokens",
        "10",
        "--seed",
        "0",
        "--dtype",
        "bf16",
        "--quantize",
        "int8",
        "--num-samples",
        "2",
        "--temperature",
        "0",
    ]
    assert main(args + ["Hello"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    first = out.split("--- sample 2 ---")[0].split("\n", 1)[1].rstrip("\n")  # sample 1's text
    stop = first[len("Hello") + 2 : len("Hello") + 4]  # two characters from the middle of it
    assert main(args[:-4] + ["--temperature", "0", "--stop", stop, "Hello"]) == 0
    cut = capsys.readouterr().out.rstrip("\n")
    assert stop not in cut[len("Hello") :] and first.startswith(cut)


def test_a_stop_given_with_shell_escapes_means_the_characters():
    """--stop '\\n\\n' (backslashes and n's, as a shell passes them) means a blank line; an
    escaped backslash stays a backslash; other text, Japanese too, is left as it is."""
    from tegaki.cli import build_parser

    def stops(*values):
        argv = ["generate", "--model", "m"] + [a for v in values for a in ("--stop", v)] + ["hi"]
        return build_parser().parse_args(argv).stop

    assert stops("\\n\\n", "\\t", "END") == ["\n\n", "\t", "END"]
    assert stops("a\\\\nb") == ["a\\nb"]  # \\ then n: a backslash and a plain n
    assert stops("終わり\\n") == ["終わり\n"]


def test_version_and_a_closed_pipe_end_quietly():
    import subprocess
    import sys

    import tegaki

    done = subprocess.run([sys.executable, "-m", "tegaki", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"tegaki {tegaki.__version__}"
    piped = subprocess.run(
        f"{sys.executable} -m tegaki params gpt2 | head -2", shell=True, capture_output=True, text=True
    )
    assert len(piped.stdout.splitlines()) == 2
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr


# -------------------------------------------------------------------------------------------------
# One qkv projection, one sampling-settings object, compiled steps that read the current weights
# -------------------------------------------------------------------------------------------------


def test_the_joint_projection_is_q_k_and_v_side_by_side():
    """qkv's rows are H*D query, then K*D key, then K*D value rows (GQA: K < H): the written-out
    x @ Wq^T, x @ Wk^T, x @ Wv^T with Wq, Wk, Wv its row blocks."""
    model = random_model("tiny-llama")  # 4 query heads, 2 key/value heads, head_dim 48
    attn = model.blocks[0].attn
    H, K, D = 4, 2, 48
    assert attn.qkv_sizes == (H * D, K * D, K * D) and attn.qkv.weight.shape == ((H + 2 * K) * D, 192)
    x = torch.randn(2, 5, 192)
    W = attn.qkv.weight
    q, k, v = attn.qkv(x).split(attn.qkv_sizes, dim=-1)
    torch.testing.assert_close(q, x @ W[: H * D].T)
    torch.testing.assert_close(k, x @ W[H * D : (H + K) * D].T)
    torch.testing.assert_close(v, x @ W[(H + K) * D :].T)


def test_sampling_settings_travel_as_one_object():
    model = random_model("tiny")
    prompt = torch.tensor([[3, 1, 4]])
    settings = SamplingSettings(temperature=0.7, top_k=20, top_p=0.9)
    as_object = generate(model, prompt, 10, sampling=settings, seed=3)
    as_keywords = generate(model, prompt, 10, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    assert torch.equal(as_object, as_keywords)
    assert torch.equal(model.generate(prompt, 10, temperature=0.7, top_k=20, top_p=0.9, seed=3), as_keywords)
    with pytest.raises(TegakiError, match="unknown sampling setting.*top_q.*Known: temperature"):
        generate(model, prompt, 5, top_q=0.9)
    with pytest.raises(TegakiError, match="not both"):
        generate(model, prompt, 5, sampling=settings, temperature=0.5)


def test_a_model_prepared_for_decoding_gives_the_same_tokens():
    """prepare_for_decoding swaps the linear layers for good (tests/test_decoding.py); generate
    then decodes through them as they are."""
    model = random_model("tiny")
    prompt = torch.tensor([[3, 1, 4]])
    plain = model.generate(prompt, 8, temperature=0)
    assert torch.equal(prepare_for_decoding(model).generate(prompt, 8, temperature=0), plain)


@pytest.mark.slow  # a few seconds of tracing
def test_a_compiled_step_reads_weights_loaded_after_it_was_built():
    """Weights swapped with load_state_dict(assign=True) after a compiled step ran: the next
    compiled generation uses the new weights (the model keeps no second copy of any weight)."""
    model = random_model("tiny", n_embd=64, n_head=2)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    generate(model, prompt, 4, temperature=0, compile="aot_eager")
    fresh = random_model("tiny", n_embd=64, n_head=2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(-1.0)
    model.load_state_dict(fresh.state_dict(), assign=True)
    expected = generate(fresh, prompt, 10, temperature=0)
    assert torch.equal(generate(model, prompt, 10, temperature=0, compile="aot_eager"), expected)
    compiled = torch.compile(model, backend="aot_eager")
    ids = torch.randint(0, 4096, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), fresh(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a few seconds of tracing
def test_a_traced_int8_decode_step_gives_the_same_tokens():
    """The compiled int8 row of bench_generate: quantized (the joint qkv too), traced (aot_eager:
    the same graph capture as inductor, without code generation)."""
    from tegaki.quant import Int8Linear, quantize_model

    model = quantize_model(random_model("tiny", n_embd=64, n_head=2), "int8")
    assert isinstance(model.blocks[0].attn.qkv, Int8Linear)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = generate(model, prompt, 10, temperature=0)
    assert torch.equal(generate(model, prompt, 10, temperature=0, compile="aot_eager"), eager)
