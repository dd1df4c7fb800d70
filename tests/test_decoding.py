"""The decoding layer changes speed and nothing else: every path (plain, oneDNN on the weight,
oneDNN on a packed copy) gives nn.Linear's logits and the same tokens, tied or untied, float32 or
bfloat16; the path is chosen by measuring, never a slower one on noise; the layout for one call
leaves the model exactly as it was; a prepared model refuses to train instead of training a stale
copy. No test assumes which path wins on this CPU, or what layout oneDNN picks."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

from tegaki import decoding
from tegaki.config import ModelConfig
from tegaki.decoding import (
    PATHS,
    Choice,
    FastLinear,
    choose,
    decoding_layout,
    describe,
    pick,
    prepare_for_decoding,
)
from tegaki.device import cpu_bf16_hardware, has_cxx_compiler
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import Int8Linear, quantize_model

needs_bf16 = pytest.mark.skipif(not cpu_bf16_hardware(), reason="the CPU has no bf16 hardware (AVX-512 BF16 or AMX)")


def random_model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(name).with_overrides(["n_layer=2"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def linear_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


def fast_layers(model: nn.Module) -> list[FastLinear]:
    return [m for m in model.modules() if isinstance(m, FastLinear)]


@pytest.mark.parametrize("path", [None, *PATHS])
@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-gpt-oss"])  # tied, untied, untied with MoE
def test_every_path_gives_the_same_logits_and_tokens(name, path):
    model = random_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    with decoding_layout(model, "plain"):
        tokens = generate(model, ids[:1], 12, temperature=0)
    linears = linear_count(model)
    prepare_for_decoding(model, path)
    assert torch.equal(generate(model, ids[:1], 12, temperature=0), tokens)
    assert isinstance(model.lm_head, FastLinear) and isinstance(model.blocks[0].attn.qkv, FastLinear)
    assert linear_count(model) == 0 and len(fast_layers(model)) == linears
    assert path is None or all(m.path == path for m in fast_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)


def test_the_layout_for_one_call_leaves_the_model_as_it_was():
    """generate's default: the decoding layer while decoding, then the same nn.Linear objects and
    parameters, still trainable, and the tokens of the plain path."""
    model = random_model("tiny")
    model.train()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    params = [p for p in model.parameters()]
    ids = torch.randint(0, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), decoding_layout(model):
        assert all(isinstance(model.get_submodule(n), FastLinear) for n in linears)
    assert {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)} == linears
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True)) and model.training
    model.eval()
    with decoding_layout(model, "plain"):
        plain = generate(model, ids, 10, temperature=0)
    assert torch.equal(generate(model, ids, 10, temperature=0), plain)
    assert linear_count(model) == len(linears)
    model.train()  # still allowed: nothing was left behind


def test_the_layout_is_undone_when_decoding_fails():
    model = random_model("tiny")
    too_long = torch.zeros(1, model.config.block_size + 1, dtype=torch.long)
    with pytest.raises(TegakiError, match="block_size"):
        generate(model, too_long, 3)
    assert linear_count(model) > 0 and not any(isinstance(m, FastLinear) for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
@pytest.mark.parametrize("path", PATHS)
def test_a_layer_follows_its_weight_when_it_changes(dtype, path):
    """load_state_dict writes the weight in place: the next call must not use an old packed copy."""
    torch.manual_seed(3)
    linear = nn.Linear(16, 24).to(dtype)
    layer = FastLinear(linear, path)
    x = torch.randn(5, 16, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), linear(x), **tol)
        assert (layer.packed is not None) == (path == "packed")  # only "packed" holds a copy
        linear.weight.mul_(-2.0)  # the same storage, a new version
        torch.testing.assert_close(layer(x), linear(x), **tol)
        layer.load_state_dict({"weight": torch.randn(24, 16, dtype=dtype), "bias": torch.randn(24, dtype=dtype)})
        torch.testing.assert_close(layer(x), layer.forward_reference(x), **tol)


@pytest.mark.skipif(not has_cxx_compiler(), reason="tegaki's loop is C++ and no C++ compiler is installed")
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: eight together, then three; past ROWS_BY_LOOP, oneDNN
@pytest.mark.parametrize("shape", [(96, 128), (37, 100), (5, 7)])  # inputs a lane count divides, or not
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loop_is_f_linear(rows, shape, bias, dtype):
    """tegaki's C++ loop against F.linear (the readable twin) on this CPU's instruction set, float32
    and bfloat16 weights; make test-isa runs it again as on older CPUs."""
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias).to(dtype)
    x = torch.randn(rows, shape[1], dtype=dtype)
    kernel = decoding.loop_kernel()
    assert kernel is not None, "a C++ compiler is installed, so the loop must build"
    with torch.no_grad():
        exact = F.linear(x.float(), linear.weight.float(), None if linear.bias is None else linear.bias.float())
        y = kernel(x, linear.weight, linear.bias)  # float32 sums, handed back in x's dtype
        torch.testing.assert_close(y, exact.to(dtype), **(dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}))
        torch.testing.assert_close(kernel(x[None], linear.weight, linear.bias), y[None], rtol=0, atol=0)  # (1, N, in)
        if dtype == torch.bfloat16 and not cpu_bf16_hardware():
            return  # no decoding layer takes bf16 here (candidates): many rows would go to oneDNN's bf16
        layer = FastLinear(linear, "loop")
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
        torch.testing.assert_close(layer(x[None]), linear(x[None]), **tol)
    assert "loop" in decoding.candidates(linear)


def test_an_unknown_path_is_refused():
    with pytest.raises(TegakiError, match="plain, loop, onednn, packed"):
        FastLinear(nn.Linear(4, 4), "fastest")


@pytest.mark.parametrize(
    ("ms", "chosen"),
    [
        ({"plain": 1.00, "onednn": 0.80, "packed": 0.79}, "onednn"),  # packed within the margin: no copy
        ({"plain": 1.00, "onednn": 0.80, "packed": 0.70}, "packed"),
        ({"plain": 1.00, "onednn": 0.97, "packed": 0.96}, "plain"),  # within noise of plain: plain
        ({"plain": 0.50, "onednn": 1.00, "packed": 0.90}, "plain"),  # the Xeon: plain was faster
        ({"plain": 1.00, "onednn": 1.20, "packed": 0.60}, "packed"),  # bf16: re-blocked wins
        ({"plain": 1.00, "loop": 0.70, "onednn": 0.69, "packed": 0.68}, "loop"),  # oneDNN within the margin
        ({"plain": 1.00, "loop": 0.80, "onednn": 0.70, "packed": 0.69}, "onednn"),
        ({"plain": 1.00}, "plain"),
    ],
)
def test_a_path_is_chosen_only_where_it_is_clearly_faster(ms, chosen):
    assert pick(ms) == chosen


def test_the_choice_is_measured_once_per_shape_on_the_models_own_weights(monkeypatch):
    """choose() times the paths of every shape of a model together, once per (shape, dtype, threads)
    in a process; a model's layers of one shape share the answer; describe() reports it."""
    calls = []

    def measure(groups, paths):
        calls.append({key: [w.shape for w in ws] for key, ws in groups.items()})
        return {key: {"plain": 2.0, "onednn": 1.0, "packed": 1.5} for key in groups}, 3

    monkeypatch.setattr(decoding, "measure", measure)
    monkeypatch.setattr(decoding, "CHOICES", {})
    model = prepare_for_decoding(random_model("tiny-llama"))
    shapes = {tuple(m.weight.shape) for m in fast_layers(model)}
    assert len(calls) == 1 and {key[:2] for key in calls[0]} == shapes  # every shape in one measurement
    assert all(tuple(ws[0]) == key[:2] for key, ws in calls[0].items())  # on weights of that shape
    assert all(m.path == "onednn" for m in fast_layers(model))
    prepare_for_decoding(random_model("tiny-llama"))
    assert len(calls) == 1  # the process remembers
    lines = describe(model)
    assert len(lines) == len(shapes) and all("onednn (plain 2.000, onednn 1.000, packed 1.500 ms" in x for x in lines)


def test_a_real_measurement_times_every_path_of_every_shape():
    groups = {
        (48, 32, torch.float32): [torch.randn(48, 32) for _ in range(3)],
        (32, 64, torch.float32): [torch.randn(32, 64)],
    }
    paths = {key: PATHS for key in groups}
    ms, rounds = decoding.measure(groups, paths)
    assert set(ms) == set(groups) and all(set(by_path) == set(PATHS) for by_path in ms.values())
    assert all(t > 0 for by_path in ms.values() for t in by_path.values())
    assert decoding.MIN_ROUNDS <= rounds <= decoding.MAX_ROUNDS
    choices = choose(groups, paths)
    assert set(choices) == set(groups) and all(isinstance(c, Choice) and c.path in PATHS for c in choices.values())
    assert choices[(48, 32, torch.float32)].layers == 3


def test_a_measurement_reads_past_the_largest_cache():
    """Weights are streamed from memory in a decode step: the measurement streams several times the
    CPU's largest cache, so that a kernel is not judged on weights the cache still holds."""
    from tegaki.device import last_level_cache_bytes

    assert 4 * last_level_cache_bytes() <= decoding.MEASURED_BYTES
    ws = [torch.zeros(256, 256) for _ in range(10)]  # 256 KiB each
    assert len(decoding._enough(ws, 600 * 1024)) == 3 and len(decoding._enough(ws, 1)) == 1


def test_the_largest_cache_is_read_from_sysfs(tmp_path):
    from tegaki.device import last_level_cache_bytes

    for index, size in enumerate(["32K", "1024K", "32768K", "junk"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert last_level_cache_bytes(str(tmp_path)) == 32 * 2**20
    assert last_level_cache_bytes(str(tmp_path / "missing")) == 32 * 2**20  # unreadable: a usual L3


def test_a_forced_path_is_reported_as_forced():
    model = prepare_for_decoding(random_model("tiny"), "packed")
    assert all(": packed;" in line for line in describe(model))


def test_prepared_models_copy_and_pickle():
    """The packed tensor is opaque to copy and pickle; copies pack their own."""
    model = prepare_for_decoding(random_model("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(ids)
        torch.testing.assert_close(copy.deepcopy(model)(ids), expected)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(ids), expected)


@needs_bf16
def test_bf16_packed_layers_match_bf16_linear():
    model = random_model("tiny").to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(ids).float()
        with decoding_layout(model):
            assert isinstance(model.lm_head, FastLinear)
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
    assert isinstance(model.lm_head, Int8Linear) and not any(isinstance(m, FastLinear) for m in model.modules())


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
    model = prepare_for_decoding(random_model("tiny"), "packed")
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0
    eager = generate(model, ids, 8, temperature=0)
    compiled, packed_calls = packed_calls_of_compiled_generation(model, ids, op_calls)
    assert torch.equal(compiled, eager)
    layers = sum(isinstance(m, FastLinear) for m in model.modules())
    assert packed_calls >= 7 * layers  # every layer of every compiled one-token step


def test_a_compiled_float32_decode_step_multiplies_one_row_by_the_plain_weights(op_calls):
    """One float32 row under compile is forward_matvec (the compiler's own loop over W, faster than
    the packed kernel): the same tokens as eager decoding, and only the eager prompt pass calls the
    packed kernel."""
    model = prepare_for_decoding(random_model("tiny"), "packed")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(6))
    eager = generate(model, ids, 8, temperature=0)
    compiled, packed_calls = packed_calls_of_compiled_generation(model, ids, op_calls)
    assert torch.equal(compiled, eager)
    assert packed_calls == sum(isinstance(m, FastLinear) for m in model.modules())  # the prompt's pass alone


# Inductor writes and compiles C++: without a compiler torch.compile's default backend cannot run.
needs_cxx = pytest.mark.skipif(not has_cxx_compiler(), reason="inductor compiles C++ and no C++ compiler is installed")


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
    layer = FastLinear(linear, "onednn")
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
    eager = generate(prepare_for_decoding(model, "onednn"), prompt, 8, temperature=0)
    compiled, codes = run_and_get_code(lambda: generate(model, prompt, 8, temperature=0, compile=True))
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
    model = prepare_for_decoding(random_model("tiny"), "packed")
    twin = copy.deepcopy(model)
    assert {int(m.layer_id) for m in twin.modules() if isinstance(m, FastLinear)}.isdisjoint(
        {int(m.layer_id) for m in model.modules() if isinstance(m, FastLinear)}
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
    model = prepare_for_decoding(random_model("tiny"), "packed")
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(8))
    compiled = torch.compile(model, backend="aot_eager")(ids)  # embeddings and norms want gradients here
    assert compiled.requires_grad
    torch.testing.assert_close(compiled, model(ids), rtol=1e-5, atol=1e-5)


def test_a_layers_hooks_run_once_in_a_compiled_step():
    # A fresh compile: torch.compile does not guard on hooks (skip_nnmodule_hook_guards), so a graph
    # an earlier test compiled for a model of the same shape would be reused without the hook.
    torch._dynamo.reset()
    model = prepare_for_decoding(random_model("tiny"), "packed")
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
        ).eval(),
        "packed",
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
