"""Weight-only quantization: the formulas round-trip within half a step, the packed kernels equal
the readable dequantize-then-matmul path, and a quantized model still predicts like the float one."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from tegaki import device
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import (
    Int4Linear,
    Int8Linear,
    activation_range_halved,
    dequantize_int4,
    dequantize_int8,
    integer_matmul_available,
    quantize_int4,
    quantize_int8,
    quantize_model,
    set_fast,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py
AVX512_VNNI = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # rows of very different sizes
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-6).all())  # per row: its own step, not the largest row's


def test_int4_round_trip_is_within_half_a_step_per_group():
    w = torch.randn(32, 128)
    q, scale, zero = quantize_int4(w, 32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    err = (dequantize_int4(q, scale, zero, 32) - w).abs().view(32, 4, 32)
    assert bool((err <= scale[..., None] / 2 + 1e-5).all())


@pytest.mark.parametrize("kind", [Int8Linear, Int4Linear])
def test_the_packed_kernel_equals_the_readable_path(kind):
    torch.manual_seed(0)
    linear = nn.Linear(128, 96, bias=True)
    layer = kind(linear)
    x = torch.randn(3, 5, 128)
    fast, reference = layer.forward_fast(x), layer.forward_reference(x)
    assert fast.shape == reference.shape == (3, 5, 96)
    # int8's kernel rounds the activations to 8 bits too (about 1% of the largest output, the
    # documented cost of quantized activations); int4's takes float32 as given.
    tol = 2e-2 if kind is Int8Linear else 1e-4
    torch.testing.assert_close(fast, reference, atol=tol * reference.abs().max().item(), rtol=0)


@pytest.mark.skipif(not integer_matmul_available(), reason="no fbgemm (x86) int8 kernels here")
@pytest.mark.parametrize("shape", [(1, 1, 128), (3, 5, 128), (64, 128)])
@pytest.mark.parametrize("flags", [("avx2", *AVX512_VNNI), ("avx2",)])  # 8-bit / 7-bit activations
def test_the_integer_kernel_computes_the_written_out_steps(shape, flags, monkeypatch):
    """fbgemm's dynamic int8 matmul and the step-by-step twin agree to float rounding: the twin is
    not an approximation of the kernel but the same arithmetic (with VNNI's full 8-bit activations
    and with the 7 bits that AVX2's 16-bit sums need)."""
    monkeypatch.setattr(device, "_FLAGS", frozenset(flags))
    torch.manual_seed(1)
    layer = Int8Linear(nn.Linear(128, 96, bias=True))
    x = torch.randn(*shape) * 3 + 0.5  # an offset: the zero point is not the middle code
    fast, steps = layer.forward_fast(x), layer.forward_integer(x)
    torch.testing.assert_close(fast, steps, atol=1e-5 * steps.abs().max().item(), rtol=0)
    layer.load_state_dict({**layer.state_dict(), "weight_int8": -layer.weight_int8})  # repacked, not stale
    torch.testing.assert_close(layer.forward_fast(x), layer.forward_integer(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("flags", "cap", "halved"),
    [
        (("avx2", *AVX512_VNNI), "", False),  # fbgemm's VNNI kernel: 32-bit sums
        (("avx2", "avx_vnni"), "", True),  # AVX-VNNI without AVX-512 (laptop chips): fbgemm's AVX2 kernel
        (("avx2", "avx512f", "avx512_vnni"), "", True),  # fbgemm's AVX-512 kernels need BW, DQ and VL too
        (("avx2", *AVX512_VNNI), "AVX2", True),  # held back by fbgemm's own variable
        (("avx2", *AVX512_VNNI), "avx512", True),
        (("avx2", *AVX512_VNNI), "AVX512_E1", False),
    ],
)
def test_activations_get_7_bits_wherever_fbgemm_runs_its_16_bit_kernel(flags, cap, halved, monkeypatch):
    monkeypatch.setattr(device, "_FLAGS", frozenset(flags))
    monkeypatch.setenv("FBGEMM_ENABLE_INSTRUCTIONS", cap)
    assert activation_range_halved() is halved


@pytest.mark.skipif(
    not (integer_matmul_available() and device.cpu_has("avx512_vnni")), reason="needs fbgemm's VNNI kernel to cap"
)
def test_fbgemm_held_back_to_avx2_gives_the_written_out_steps():
    """Where fbgemm runs its AVX2 kernel, activations at 8 bits would saturate its 16-bit sums; the
    layer must know it. Here, in a process whose fbgemm is held back to AVX2, with inputs made to
    saturate (every weight +1, every activation near the top code), the kernel still equals the
    step-by-step twin."""
    code = (
        "import torch, torch.nn as nn\n"
        "from tegaki.quant import Int8Linear, activation_range_halved\n"
        "linear = nn.Linear(256, 8, bias=False)\n"
        "nn.init.ones_(linear.weight)\n"
        "layer = Int8Linear(linear)\n"
        "x = torch.rand(1, 256) * 0.1 + 4.0\n"
        "fast, steps = layer.forward_fast(x), layer.forward_integer(x)\n"
        "assert activation_range_halved()\n"
        "torch.testing.assert_close(fast, steps, atol=1e-5 * steps.abs().max().item(), rtol=0)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


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
    # Random Gaussian weights are the hard case for 4 bits (no outliers to spare, all range used);
    # int8 also rounds every activation to 8 bits (one scale for all 48 tokens of this call).
    assert rel < (0.03 if mode == "int8" else 0.25), rel
    torch.testing.assert_close(quantized, readable, atol=0.05 * reference.abs().max().item(), rtol=0)


def test_a_quantized_model_decodes_the_same_with_and_without_the_cache():
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(
        generate(model, prompt, 10, temperature=0), generate(model, prompt, 10, temperature=0, use_cache=False)
    )


def test_a_quantized_model_compiles_into_one_graph_that_runs_the_integer_kernel():
    """fbgemm's packed weight is a TorchScript object torch.compile cannot trace; each int8 layer is
    one operator running its eager forward (opaque.py): no graph break, the kernel's own numbers."""
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0
        eager = model(ids)
        assert torch.equal(torch.compile(model, backend="aot_eager")(ids), eager)
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(
        generate(model, prompt, 10, temperature=0, compile="aot_eager"), generate(model, prompt, 10, temperature=0)
    )
    # With gradients on (the operator has none) the layer calls its kernel directly, a graph break as before.
    torch.testing.assert_close(torch.compile(model, backend="aot_eager")(ids), eager, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_quantized_model_can_be_cast_afterwards(dtype):
    """.to(dtype) casts every float buffer, the int8 kernel's bf16 scales included; the kernel
    still gets bf16 scales, and the cast model predicts what the uncast one does."""
    torch.manual_seed(0)
    model = quantize_model(GPT(ModelConfig.preset("tiny").replace(n_layer=2)).eval(), "int8")
    ids = torch.randint(0, 4096, (1, 12))
    with torch.no_grad():
        before = model(ids)
        after = model.to(dtype)(ids).float()
    torch.testing.assert_close(after, before, atol=0.05 * before.abs().max().item(), rtol=0)


def test_an_unknown_mode_is_refused():
    with pytest.raises(TegakiError, match="int8"):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), "int3")


def test_quantizing_a_model_off_the_cpu_is_refused_clearly():
    with torch.device("meta"):
        model = GPT(ModelConfig.preset("tiny"))
    with pytest.raises(TegakiError, match="packed CPU kernels; the model is on meta"):
        quantize_model(model, "int8")
