"""Quantization: the formulas round-trip within half a step per group, the C++ loops equal their
readable twins (int8_matvec, q8_matvec), the fast paths stay within quantization error of the readable
dequantize-then-matmul path, and a quantized model still predicts like the float one."""

import pytest
import torch
import torch.nn as nn

from tegaki import native, quant
from tegaki.config import ModelConfig
from tegaki.device import has_cxx_compiler
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import (
    GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    int8_matvec,
    pack_q8,
    q8_matvec,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_rows_q8,
    quantized_kernels,
    set_fast,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
needs_cxx = pytest.mark.skipif(not has_cxx_compiler(), reason="the int8 loop is C++ and no C++ compiler is installed")


def test_int8_round_trip_is_within_half_a_step_per_group():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 96)[None, :]  # groups of very different sizes
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64, 96 // GROUP_SIZE) and q.abs().max() == 127
    err = (dequantize_int8(q, scale) - w).abs().view(64, 3, GROUP_SIZE)
    assert bool((err <= scale.float()[..., None] / 2 + 1e-7).all())  # per group: its own step, not the row's largest


def test_an_outlier_costs_precision_only_in_its_own_group():
    """q8_0's point: one large weight widens the step of its 32 neighbours, not of its whole row."""
    w = torch.randn(8, 128) * 0.02
    w[:, 5] = 5.0  # an outlier in the first group of every row
    q, scale = quantize_int8(w)
    err = (dequantize_int8(q, scale) - w).abs()
    per_channel_step = 5.0 / 127
    assert err[:, 32:].max() < per_channel_step / 20  # the other groups keep their fine step
    assert err[:, :32].max() <= per_channel_step / 2 + 1e-7


def test_a_row_that_32_does_not_divide_is_one_group():
    q, scale = quantize_int8(torch.randn(5, 40))
    assert scale.shape == (5, 1)
    assert Int8Linear(nn.Linear(40, 5)).extra_repr().endswith("int8 groups of 40")


def test_int4_round_trip_is_within_half_a_step_per_group():
    w = torch.randn(32, 128)
    q, scale, zero = quantize_int4(w, 32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    err = (dequantize_int4(q, scale, zero, 32) - w).abs().view(32, 4, 32)
    assert bool((err <= scale[..., None] / 2 + 1e-5).all())


@pytest.mark.parametrize("bias", [True, False])
def test_the_matvec_formula_is_the_dequantized_product(bias):
    """int8_matvec as written (eagerly) against dequantize-then-F.linear: the same sums."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(128, 96, bias=bias))
    x = torch.randn(3, 128)
    y = int8_matvec(x, layer.weight_int8, layer.scale, layer.bias)
    dequantized = dequantize_int8(layer.weight_int8, layer.scale)
    torch.testing.assert_close(y, nn.functional.linear(x, dequantized, layer.bias), rtol=1e-5, atol=1e-5)


@needs_cxx
@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("shape", [(1, 1, 128), (2, 3, 128), (3, 5, 128)])  # one row; a batch step; a prompt
def test_the_fast_kernel_equals_the_readable_path(kind, shape):
    torch.manual_seed(0)
    layer = kind(nn.Linear(128, 96, bias=True))
    x = torch.randn(*shape)
    fast, reference = layer.forward_fast(x), layer.forward_reference(x)
    assert fast.shape == reference.shape == (*shape[:-1], 96)
    torch.testing.assert_close(fast, reference, atol=1e-4 * reference.abs().max().item(), rtol=0)


@needs_cxx
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: eight together, then three
@pytest.mark.parametrize("shape", [(96, 128), (37, 96), (5, 40), (3, 24), (70, 3072)])  # groups of 32; whole rows
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpp_loop_is_the_int8_formula(rows, shape, bias):
    """The hand-written C++ loop against `int8_matvec` as written: groups of 32 and whole rows (of
    sizes the loop's lane count does and does not divide), one row to a batch step, with and
    without bias, on this CPU's instruction set (make test-isa runs it again as on older CPUs)."""
    torch.manual_seed(0)
    out_f, in_f = shape
    q, scale = quantize_int8(torch.randn(out_f, in_f))
    b = torch.randn(out_f) if bias else None
    x = torch.randn(rows, in_f)
    kernel = quant.int8_kernel()
    assert kernel is not None, "a C++ compiler is installed, so the loop must build"
    y = kernel(x, q, scale, b)
    torch.testing.assert_close(y, int8_matvec(x, q, scale, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernel(x.view(1, rows, in_f), q, scale, b), y[None], rtol=0, atol=0)  # (B, T, in)
    y16 = kernel(x.bfloat16(), q, scale, b)  # bf16 activations: float32 sums, a bf16 result
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16, int8_matvec(x.bfloat16().float(), q, scale, b).bfloat16())


@needs_cxx
def test_the_cpp_loop_refuses_what_it_cannot_read():
    q, scale = quantize_int8(torch.randn(8, 64))
    kernel = quant.int8_kernel()
    with pytest.raises(RuntimeError, match="int8_matvec"):
        kernel(torch.randn(1, 32), q, scale, None)  # 32 inputs for a 64-input weight
    with pytest.raises(RuntimeError, match="int8_matvec"):
        kernel(torch.randn(1, 64).double(), q, scale, None)


def test_the_scales_are_float16_and_a_group_is_a_q8_0_block():
    """A group is llama.cpp's q8_0 block: 32 int8 codes and one float16 scale. q is made with the
    scale as kept, so rounding the scale costs no more than half a step; an all-zero group keeps a
    usable scale and codes of zero."""
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[3, :32] = 0
    q, scale = quantize_int8(w)
    assert scale.dtype == torch.float16 and scale.shape == (16, 2)
    assert bool((q[3, :32] == 0).all()) and float(scale[3, 0]) > 0
    err = (dequantize_int8(q, scale) - w).abs().view(16, 2, 32)
    assert bool((err <= scale.float()[..., None] / 2 + 1e-7).all())


def test_activations_are_quantized_by_groups_to_nearest_with_ties_to_even():
    """quantize_rows_q8: the largest |x| of a group becomes +-127, and a value exactly between two
    codes goes to the even one (the rounding of the C++ loop)."""
    x = torch.zeros(2, 64)
    x[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -3.5])  # step 1: the ties are exact
    x[1, 32:] = torch.linspace(-2, 1, 32)
    qx, step = quantize_rows_q8(x)
    assert qx.dtype == torch.int8 and step.shape == (2, 2)
    assert qx[0, :6].tolist() == [127, 0, 2, 2, 0, -4]
    assert step[0].tolist() == [1.0, 0.0] and bool((qx[0, 32:] == 0).all())  # an all-zero group: step 0
    assert int(qx[1, 32]) == -127 and float(step[1, 1]) == pytest.approx(2 / 127)


def test_the_q8_formula_is_close_to_the_dequantized_product():
    """Quantizing the activations too costs about one more int8 rounding: q8_matvec stays within 1%
    of int8_matvec (float activations) on random rows."""
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(96, 256))
    x = torch.randn(4, 256)
    exact = int8_matvec(x, q, scale)
    assert ((q8_matvec(x, q, scale) - exact).norm() / exact.norm()).item() < 0.01


def test_the_loop_order_puts_sixteen_rows_side_by_side():
    """pack_q8: tiles[t, g, j, lane, b] is q[16 t + lane, 32 g + 4 j + b]; past the last row, zeros."""
    torch.manual_seed(0)
    q, scale = quantize_int8(torch.randn(37, 96))
    tiles, tile_scale = pack_q8(q, scale)
    assert tiles.shape == (3, 3, 8, 16, 4) and tile_scale.shape == (3, 3, 16)
    t, g, j, lane, b = 1, 2, 5, 7, 3
    assert tiles[t, g, j, lane, b] == q[16 * t + lane, 32 * g + 4 * j + b]
    assert tile_scale[t, g, lane] == scale[16 * t + lane, g]
    assert bool((tiles[2, :, :, 5:] == 0).all()) and bool((tile_scale[2, :, 5:] == 0).all())  # rows 37-47


@needs_cxx
@pytest.mark.parametrize("rows", [1, 3, 8, 11])  # 11: eight together, then three
@pytest.mark.parametrize("shape", [(96, 128), (37, 96), (16, 32), (70, 3072)])  # 37, 70: a part-padded last tile
@pytest.mark.parametrize("bias", [True, False])
def test_the_cpp_q8_loop_is_the_q8_formula(rows, shape, bias):
    """The int8 x int8 C++ loop against `q8_matvec` as written, on this CPU's instruction set (VNNI's
    vpdpbusd, AVX2's vpmaddubsw, or plain C++; make test-isa runs it again as on older CPUs). The
    integer dot products are exact, so only the float sums' order differs: a code rounded another way
    would move y by about a step squared times 127, far past the tolerance."""
    torch.manual_seed(0)
    out_f, in_f = shape
    q, scale = quantize_int8(torch.randn(out_f, in_f))
    b = torch.randn(out_f) if bias else None
    x = torch.randn(rows, in_f)
    x[0, :32] = torch.arange(32) - 15.5  # ties: x * 127 / 16.5 lands on no tie, x / 1 below does
    x[-1, :32] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -3.5] + [0.0] * 26)
    kernel = quant.q8_kernel()
    assert kernel is not None, "a C++ compiler is installed, so the loop must build"
    y = kernel(x, *pack_q8(q, scale), b, out_f)
    assert y.shape == (rows, out_f)
    torch.testing.assert_close(y, q8_matvec(x, q, scale, b), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kernel(x.view(1, rows, in_f), *pack_q8(q, scale), b, out_f), y[None], rtol=0, atol=0)
    y16 = kernel(x.bfloat16(), *pack_q8(q, scale), b, out_f)  # bf16 activations: a bf16 result
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16, q8_matvec(x.bfloat16().float(), q, scale, b).bfloat16())


@needs_cxx
def test_the_cpp_q8_loop_refuses_what_it_cannot_read():
    q, scale = quantize_int8(torch.randn(20, 64))
    tiles, tile_scale = pack_q8(q, scale)
    kernel = quant.q8_kernel()
    with pytest.raises(RuntimeError, match="q8_matvec: shapes"):
        kernel(torch.randn(1, 32), tiles, tile_scale, None, 20)  # 32 inputs for a 64-input weight
    with pytest.raises(RuntimeError, match="q8_matvec: shapes"):
        kernel(torch.randn(1, 64), tiles, tile_scale, None, 40)  # more rows than the tiles hold
    with pytest.raises(RuntimeError, match="q8_matvec"):
        kernel(torch.randn(1, 64).double(), tiles, tile_scale, None, 20)
    with pytest.raises(RuntimeError, match="q8_matvec"):
        kernel(torch.randn(1, 64), tiles, tile_scale.float(), None, 20)


def test_a_layer_takes_int8_activations_only_for_groups_of_32():
    """Groups of 32 go through the q8 loop (its weight copy is not saved); whole rows through the
    float-activation loop."""
    assert Int8Linear(nn.Linear(64, 20)).q8 and not Int8Linear(nn.Linear(40, 20)).q8
    assert set(Int8Linear(nn.Linear(64, 20)).state_dict()) == {"weight_int8", "scale", "bias"}


def test_without_a_compiler_int8_takes_the_readable_path(monkeypatch):
    monkeypatch.setattr(native, "cxx_compiler", lambda: None)
    monkeypatch.setattr(native, "_loaded", {})
    layer = Int8Linear(nn.Linear(64, 32))
    x = torch.randn(1, 64)
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(layer.forward_fast(x), layer.forward_reference(x))
    assert "no C++ compiler" in quantized_kernels(nn.Sequential(layer))[0]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_model_keeps_the_float_models_predictions(mode):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny-llama").replace(n_layer=2)).eval()
    ids = torch.randint(0, 4096, (2, 24))
    with torch.no_grad():
        reference = model(ids)
        quantize_model(model, mode)
        quantized = model(ids)
        set_fast(model, False)
        readable = model(ids)
    assert isinstance(model.lm_head, Int8Linear if mode == "int8" else Int4Linear)
    rel = ((quantized - reference).norm() / reference.norm()).item()
    # Random Gaussian weights are the hard case for 4 bits (no outliers to spare, all range used).
    assert rel < (0.02 if mode == "int8" else 0.25), rel
    torch.testing.assert_close(quantized, readable, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_a_quantized_model_decodes_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(
        generate(model, prompt, 10, temperature=0), generate(model, prompt, 10, temperature=0, use_cache=False)
    )


def test_a_quantized_model_compiles_into_one_graph():
    """Under torch.compile an int8 layer traces its formula into the graph (no graph break), and
    compiled decoding gives the eager tokens."""
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0
        eager = model(ids)
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids), eager, rtol=1e-5, atol=1e-5)
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(
        generate(model, prompt, 10, temperature=0, compile="aot_eager"), generate(model, prompt, 10, temperature=0)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_can_be_cast_afterwards(dtype):
    """.to(dtype) casts every float buffer; the int8 scales keep float16, and the cast model predicts
    what the uncast one does."""
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    ids = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        before = model(ids)
        after = model.to(dtype)(ids).float()
        one_row = model(ids[:, :1]).float()  # the compiled int8 loop, on bf16 activations too
    int8 = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert all(m.scale.dtype == m.tile_scale.dtype == torch.float16 for m in int8)
    torch.testing.assert_close(after, before, atol=0.05 * before.abs().max().item(), rtol=0)
    torch.testing.assert_close(one_row, before[:, :1], atol=0.05 * before.abs().max().item(), rtol=0)


def test_an_unknown_mode_is_refused():
    with pytest.raises(TegakiError, match="int8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")


def test_quantizing_a_model_off_the_cpu_is_refused_clearly():
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("tiny"))
    with pytest.raises(TegakiError, match="packed CPU kernels; the model is on meta"):
        quantize_model(model, "int8")
