"""oneDNN's packed layout of the linear layers changes speed and nothing else: the same logits and
tokens, tied or untied, float32 or bfloat16; the layout for one call leaves the model exactly as it
was; a prepared model refuses to train instead of training a stale copy."""

import copy
import os
import pickle
import shutil

import pytest
import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code

from tegaki import decoding
from tegaki.config import ModelConfig
from tegaki.decoding import (
    PackedLinear,
    bf16_matmul_in_hardware,
    decoding_layout,
    layout_is_own,
    prepare_for_decoding,
    same_bytes,
)
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import Int8Linear, quantize_model


def random_model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(name).with_overrides(["n_layer=2"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def linear_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-gpt-oss"])  # tied, untied, untied with MoE
def test_a_prepared_model_gives_the_same_logits_and_tokens(name):
    model = random_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    tokens = generate(model, ids[:1], 12, temperature=0, prepare=False)
    linears = linear_count(model)
    assert torch.equal(generate(model, ids[:1], 12, temperature=0, prepare=True), tokens)
    assert isinstance(model.lm_head, PackedLinear) and isinstance(model.blocks[0].attn.qkv, PackedLinear)
    assert linear_count(model) == 0 and sum(isinstance(m, PackedLinear) for m in model.modules()) == linears
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_the_layout_for_one_call_leaves_the_model_as_it_was():
    """generate's default: packed while decoding, then the same nn.Linear objects and parameters,
    still trainable, and the packed path gave the plain path's tokens."""
    model = random_model("tiny")
    model.train()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters()]
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), decoding_layout(model):
        assert all(isinstance(model.get_submodule(n), PackedLinear) for n in linears)
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} == linears
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True)) and model.training
    model.eval()
    plain = generate(model, ids, 10, temperature=0, prepare=False)
    assert torch.equal(generate(model, ids, 10, temperature=0), plain)  # prepare=None: packed for the call
    assert linear_count(model) == len(linears)
    model.train()  # still allowed: nothing was left behind


def test_the_layout_is_undone_when_decoding_fails():
    model = random_model("tiny")
    too_long = torch.zeros(1, model.config.block_size + 1, dtype=torch.long)
    with pytest.raises(TegakiError, match="block_size"):
        generate(model, too_long, 3)
    assert linear_count(model) > 0 and not any(isinstance(m, PackedLinear) for m in model.modules())


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,  # read in place where oneDNN's layout is the weight's own: nothing to go stale
        pytest.param(
            torch.bfloat16,  # re-blocked into a packed copy, which must be made again
            marks=pytest.mark.skipif(not bf16_matmul_in_hardware(), reason="the CPU has no bf16 matmul"),
        ),
    ],
)
def test_a_packed_layer_packs_again_when_its_weight_changes(dtype):
    """load_state_dict writes the weight in place: the next call must not use the old packing."""
    torch.manual_seed(3)
    linear = nn.Linear(16, 24).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(5, 16, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), **tol)
        if dtype == torch.bfloat16:
            assert packed.packed is not None  # the copy that could go stale exists
        linear.weight.mul_(-2.0)  # the same storage, a new version
        torch.testing.assert_close(packed(x), linear(x), **tol)
        packed.load_state_dict({"weight": torch.randn(24, 16, dtype=dtype), "bias": torch.randn(24, dtype=dtype)})
        torch.testing.assert_close(packed(x), packed.forward_reference(x), **tol)


def test_the_layout_question_reads_the_packed_bytes():
    """same_bytes compares oneDNN's opaque tensor with the weight byte for byte: a plain oneDNN copy
    (to_mkldnn) is the same bytes, one changed element is seen, a transposed layout is not the
    weight's own; and layout_is_own reports what same_bytes finds."""
    torch.manual_seed(7)
    w = torch.randn(40, 24)
    assert same_bytes(w.to_mkldnn(), w)
    changed = w.clone()
    changed[3, 5] += 1.0
    assert not same_bytes(w.to_mkldnn(), changed)
    assert not same_bytes(w.t().contiguous().to_mkldnn(), w.t().contiguous().t())  # not row-major
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
    assert layout_is_own(w) == same_bytes(packed, w)


def test_a_weight_that_reads_alike_in_another_order_is_not_asked():
    """A constant or symmetric matrix has the same bytes in a transposed or tiled layout too, so a
    random one of its shape is asked instead; the answer is then the one any weight of that shape
    gets. (bfloat16, re-blocked into 64 x 16 tiles, is the case that fails without the fallback on
    a CPU that packs it: a constant 64 x 64 matrix tiles into the very same bytes.)"""
    cases = [((43, 24), torch.float32, "constant"), ((37, 37), torch.float32, "symmetric")]
    if bf16_matmul_in_hardware():
        cases.append(((64, 64), torch.bfloat16, "constant"))
    for shape, dtype, kind in cases:
        random = torch.randn(shape, generator=torch.Generator().manual_seed(10)).to(dtype)
        expected = same_bytes(torch.ops.mkldnn._reorder_linear_weight(random, 1), random)
        decoding._own_layout.pop((torch.Size(shape), dtype), None)
        s = torch.randn(shape)
        weight = (s + s.t() if kind == "symmetric" else torch.full(shape, 0.5)).to(dtype)
        assert layout_is_own(weight) == expected, (shape, dtype, kind)
    assert not layout_is_own(torch.randn(24, 40).t())  # not contiguous: never read in place
    assert not layout_is_own(torch.empty(0, 8))


@pytest.mark.skipif(not bf16_matmul_in_hardware(), reason="the CPU has no bf16 matmul (AVX-512 BF16 or AMX)")
def test_a_re_blocked_layout_is_seen_as_one():
    """oneDNN re-blocks bfloat16 weights into tiles for its bf16 kernels: the question must say so,
    and the layer then keeps its packed copy."""
    torch.manual_seed(8)
    layer = PackedLinear(nn.Linear(64, 96).to(torch.bfloat16))
    assert not layout_is_own(layer.weight)
    with torch.no_grad():
        layer(torch.randn(1, 64, dtype=torch.bfloat16))
    assert layer.packed is not None


# oneDNN reads float32 in its own layout on x86 CPUs with AVX2 or AVX-512 (checked here, and with
# oneDNN held to AVX2): there the test must run, not skip.
X86_FP32_IN_PLACE = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.skipif(
    not X86_FP32_IN_PLACE and not layout_is_own(torch.randn(96, 64)),
    reason="oneDNN re-blocks float32 weights on this CPU",
)
def test_float32_weights_are_read_in_place_and_not_packed_again_per_call(op_calls):
    """Where oneDNN reads a float32 weight in its own layout, a layer keeps no copy and gives, bit for
    bit, what the kernel gives on a packed copy; generate's per-call layout then packs nothing."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9))
    generate(model, ids, 4, temperature=0)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.packed is None for m in layers)
    x = torch.randn(3, model.config.n_embd)
    layer = model.blocks[0].attn.qkv
    on_copy = torch.ops.mkldnn._linear_pointwise(
        x, torch.ops.mkldnn._reorder_linear_weight(layer.weight, 1), layer.bias, "none", [], ""
    )
    with torch.no_grad():
        assert torch.equal(layer(x), on_copy)
    plain = random_model("tiny")
    generate(plain, ids, 4, temperature=0)  # the shapes asked about once
    assert op_calls(lambda: generate(plain, ids, 4, temperature=0), "mkldnn::_reorder_linear_weight") == 0


def test_prepared_models_copy_and_pickle():
    """The packed tensor is opaque to copy and pickle; copies pack their own."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(copy.deepcopy(model)(ids), expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(ids), expected)


@pytest.mark.skipif(not bf16_matmul_in_hardware(), reason="the CPU has no bf16 matmul (AVX-512 BF16 or AMX)")
def test_bf16_packed_layers_match_bf16_linear():
    model = random_model("tiny").to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).float()
        with decoding_layout(model):
            assert isinstance(model.lm_head, PackedLinear)
            after = model(ids).float()
    # Both sum in float32 inside the kernel, in different orders, then round to bf16 (3 digits).
    torch.testing.assert_close(after, before, rtol=0, atol=0.02 * before.abs().max().item())


def test_the_embedding_is_untouched_and_training_is_refused():
    model = random_model("tiny")
    wte = model.wte.weight.detach().clone()
    prepare_for_decoding(model)
    assert torch.equal(model.wte.weight, wte) and model.wte.weight.is_contiguous()
    assert "lm_head.weight" in model.state_dict() and not any("lm_head" in n for n, _ in model.named_parameters())
    with pytest.raises(TegakiError, match="prepared for decoding.*load it again to train"):
        model.train()
    model.eval()  # switching to evaluation stays allowed


def test_quantized_layers_are_left_alone():
    model = quantize_model(random_model("tiny"), "int8")
    prepare_for_decoding(model)
    assert isinstance(model.lm_head, Int8Linear) and not any(isinstance(m, PackedLinear) for m in model.modules())


def packed_calls_of_compiled_generation(model: GPT, ids: torch.Tensor, op_calls) -> tuple[torch.Tensor, int]:
    generate(model, ids, 8, temperature=0, compile="aot_eager")  # compiled once, outside the count
    compiled = []
    calls = op_calls(
        lambda: compiled.append(generate(model, ids, 8, temperature=0, compile="aot_eager")),
        "mkldnn::_linear_pointwise",
    )
    return compiled[0], calls


def test_a_prepared_model_compiles_into_one_graph_that_reads_the_packed_weights_for_several_rows(op_calls):
    """Under torch.compile a packed layer given several rows is one operator that runs its eager
    forward (opaque.py): no graph break, the same tokens, and oneDNN's kernel (not the traced plain
    twin) is what every layer of every compiled step calls."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0
    eager = generate(model, ids, 8, temperature=0)
    compiled, packed_calls = packed_calls_of_compiled_generation(model, ids, op_calls)
    assert torch.equal(compiled, eager)
    layers = sum(isinstance(m, PackedLinear) for m in model.modules())
    assert packed_calls >= 7 * layers  # every layer of every compiled one-token step


def test_a_compiled_float32_decode_step_multiplies_one_row_by_the_plain_weights(op_calls):
    """One float32 row under compile is forward_matvec (the compiler's own loop over W, faster than
    the packed kernel): the same tokens as eager decoding, and only the eager prompt pass calls the
    packed kernel."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    eager = generate(model, ids, 8, temperature=0)
    compiled, packed_calls = packed_calls_of_compiled_generation(model, ids, op_calls)
    assert torch.equal(compiled, eager)
    assert packed_calls == sum(isinstance(m, PackedLinear) for m in model.modules())  # the prompt's pass alone


# Inductor writes and compiles C++: without a compiler torch.compile's default backend cannot run.
needs_cxx = pytest.mark.skipif(
    not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "clang++")),
    reason="inductor compiles C++ and no C++ compiler is installed",
)


def code_lines(code: str) -> list[str]:
    """Inductor's output code without its comments (they quote the Python source)."""
    return [line for line in code.splitlines() if not line.lstrip().startswith("#")]


@pytest.mark.slow  # a few seconds of C++ compiling
@needs_cxx
@pytest.mark.parametrize("bias", [True, False])
def test_the_matvec_form_is_the_linear_layer(bias):
    """forward_matvec eagerly, and as the C++ loop inductor makes of it (no oneDNN call, no opaque
    operator), against nn.Linear."""
    torch.manual_seed(3)
    linear = nn.Linear(40, 24, bias=bias).eval()
    layer = PackedLinear(linear)
    x = torch.randn(1, 1, 40)
    with torch.no_grad():
        expected = linear(x)
        torch.testing.assert_close(layer.forward_matvec(x), expected, rtol=1e-5, atol=1e-6)
        compiled, (code,) = run_and_get_code(torch.compile(layer, dynamic=False), x)
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-6)
    lines = code_lines(code)
    assert any("cpp_fused" in line and "sum" in line for line in lines)  # inductor's own fused loop
    assert not any(name in line for line in lines for name in ("mkldnn", "eager_layer", "extern_kernels."))


@pytest.mark.slow  # ~15 s of C++ compiling on 2 cores with an empty inductor cache
@needs_cxx
def test_what_generate_compile_runs_on_a_cpu_gives_the_eager_tokens():
    """`tegaki generate --compile` on a CPU, end to end through inductor: prepared layers, the decode
    step's products as inductor's own loops, attention written out. The same greedy tokens as the
    eager default, and the decode step's code calls no oneDNN kernel and no opaque operator."""
    model = random_model("tiny")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = generate(model, prompt, 8, temperature=0, prepare=True)
    compiled, codes = run_and_get_code(lambda: generate(model, prompt, 8, temperature=0, prepare=True, compile=True))
    assert torch.equal(compiled, eager)
    assert codes, "nothing was compiled"
    for code in codes:  # (attention's small batched products may go to extern_kernels.bmm: allowed)
        lines = code_lines(code)
        banned = ("mkldnn", "eager_layer", "extern_kernels.mm(", "extern_kernels.addmm(")
        assert not any(name in line for line in lines for name in banned)
        assert any("cpp_fused" in line and "sum" in line for line in lines)


def test_a_copy_of_a_prepared_model_compiles_to_its_own_layers():
    """A compiled graph names each layer by id; a copy registers its own, so a compiled copy
    computes with the copy's weights, not the original's."""
    model = prepare_for_decoding(random_model("tiny"))
    twin = copy.deepcopy(model)
    assert {int(m.layer_id) for m in twin.modules() if isinstance(m, PackedLinear)}.isdisjoint(
        {int(m.layer_id) for m in model.modules() if isinstance(m, PackedLinear)}
    )
    with torch.no_grad():
        twin.lm_head.weight.mul_(-1.0)  # the twin's head only (the copy has its own storage)
        ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(7))
        compiled = torch.compile(twin, backend="aot_eager")
        torch.testing.assert_close(compiled(ids), twin(ids))
        assert not torch.allclose(twin(ids), model(ids))


def test_compiled_with_gradients_on_it_traces_the_readable_twin():
    """The operator has no gradient: outside no_grad a compiled prepared model still runs (through
    nn.Linear's formula) and gives the eager logits."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    compiled = torch.compile(model, backend="aot_eager")(ids)  # embeddings and norms want gradients here
    assert compiled.requires_grad
    torch.testing.assert_close(compiled, model(ids), rtol=1e-5, atol=1e-5)


def test_a_layers_hooks_run_once_in_a_compiled_step():
    model = prepare_for_decoding(random_model("tiny"))
    model.lm_head.register_forward_hook(lambda module, args, out: out + 100.0)
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids), model(ids))


def graphs_compiled(n_layer: int) -> int:
    """Graphs torch.compile builds for a prepared MoE model whose expert loop breaks the graph in
    every block (each block is then a frame of its own)."""
    torch.manual_seed(0)
    model = prepare_for_decoding(
        GPT(
            ModelConfig.preset("tiny-llama").replace(n_layer=n_layer, mlp="moe", n_experts=4, n_experts_per_tok=2)
        ).eval()
    )
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=counting)(torch.tensor([[1, 2, 3, 4]]))
    return len(graphs)


def test_one_compiled_graph_serves_every_layer():
    """A layer names itself to the graph by a tensor, not a number the compiler specialises on: a
    model twice as deep compiles no more graphs (with a number, every block recompiled)."""
    assert graphs_compiled(6) == graphs_compiled(3)
