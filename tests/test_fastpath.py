"""The decoding fast path (stacked q/k/v, chosen weight layouts) changes speed and nothing else:
the same logits and tokens, training untouched, saved checkpoints unchanged, and a stale stacked
copy never used after the model is cast, moved or changed."""

import pytest
import torch
import torch.nn as nn

import tegaki.fastpath as fastpath
from tegaki.fastpath import StackedLinear, prepare_for_decoding, set_layout
from tegaki.generate import generate
from tegaki.quant import Int8Linear, quantize_model, set_fast

from test_generate import FAMILIES, random_model


@pytest.fixture(params=["row", "column"])
def layout(request, monkeypatch):
    """Force each layout, whatever this machine measures, so both are always checked."""
    monkeypatch.setattr(fastpath, "faster_layout", lambda out_f, in_f, dtype: request.param)
    return request.param


def ids_for(model, T=9, seed=1):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_prepared_model_gives_the_same_logits_and_tokens(name, layout):
    model = random_model(name)
    ids = ids_for(model)
    with torch.inference_mode():
        before = model(ids)
    tokens_before = generate(model, ids[:1], 12, temperature=0, prepare=False)
    prepare_for_decoding(model)
    assert all(b.attn.fused_qkv is not None for b in model.blocks)
    with torch.inference_mode():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, ids[:1], 12, temperature=0), tokens_before)


def test_the_projections_become_views_of_the_stacked_weight(layout):
    model = prepare_for_decoding(random_model("tiny"))
    attn = model.blocks[0].attn
    stacked = attn.fused_qkv.inner.weight
    C = model.config.n_embd
    assert stacked.shape == (3 * C, C)
    assert attn.q_proj.weight.data_ptr() == stacked.data_ptr()
    with torch.no_grad():
        attn.k_proj.weight.mul_(-2.0)  # an in-place change to one part is a change to the stack
    torch.testing.assert_close(stacked[C : 2 * C], attn.k_proj.weight)
    # parameters() and state_dict() see each number once, under its usual name
    assert not any("fused" in name for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == random_model("tiny").num_parameters()


def test_layout_keeps_values_parameter_and_tying():
    model = random_model("tiny")
    head = model.lm_head.weight
    values = head.detach().clone()
    for layout in ("column", "row", "column"):
        set_layout(model.lm_head, layout)
        assert model.lm_head.weight is head and model.wte.weight is head  # still tied
        assert torch.equal(head, values)
    assert head.stride() == (1, head.shape[0])  # column-major now
    ids = ids_for(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), random_model("tiny")(ids), rtol=1e-5, atol=1e-5)


def test_a_replaced_or_cast_projection_is_not_read_from_the_stale_stack(layout):
    model = prepare_for_decoding(random_model("tiny-llama"))
    reference = random_model("tiny-llama")
    attn, ref_attn = model.blocks[1].attn, reference.blocks[1].attn
    new = nn.Linear(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    ref_attn.q_proj.weight.data.copy_(new.weight.data)
    attn.q_proj = new  # the stacked copy still holds the old q weights
    assert not attn.fused_qkv.holds([attn.q_proj, attn.k_proj, attn.v_proj])
    ids = ids_for(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)

    stale = model.blocks[0].attn.fused_qkv
    model.to(torch.float64)  # .to() gives every part storage of its own, and drops the stacks
    assert not stale.holds([model.blocks[0].attn.q_proj, model.blocks[0].attn.k_proj, model.blocks[0].attn.v_proj])
    assert all(b.attn.fused_qkv is None for b in model.blocks)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference.to(torch.float64)(ids), rtol=1e-9, atol=1e-9)
    prepare_for_decoding(model)  # and preparing again stacks the new tensors
    assert all(b.attn.fused_qkv.holds([b.attn.q_proj, b.attn.k_proj, b.attn.v_proj]) for b in model.blocks)


def test_quantized_projections_stack_too_and_follow_the_readable_switch():
    model, plain = quantize_model(random_model("tiny"), "int8"), quantize_model(random_model("tiny"), "int8")
    ids = ids_for(model)
    prepare_for_decoding(model)
    assert isinstance(model.blocks[0].attn.fused_qkv.inner, Int8Linear)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-4, atol=1e-4)
        set_fast(model, False)  # the readable dequantize path, through the stacked layer as well
        set_fast(plain, False)
        torch.testing.assert_close(model(ids), plain(ids), rtol=1e-5, atol=1e-5)
    assert not model.blocks[0].attn.fused_qkv.inner.fast


def test_int4_projections_are_left_unstacked():
    model = quantize_model(random_model("tiny"), "int4", group_size=32)
    prepare_for_decoding(model)
    assert model.blocks[0].attn.fused_qkv is None
    assert generate(model, ids_for(model)[:1], 4, temperature=0).shape == (1, 13)


def test_training_after_decoding_still_trains_every_projection(layout):
    """The stacked matmul is for inference only: with gradients on, the three projections run as
    three, so each gets its gradient (the stack would have taken it)."""
    prepared, plain = prepare_for_decoding(random_model("tiny")), random_model("tiny")
    ids = ids_for(prepared)
    generate(prepared, ids[:1], 3)
    for model in (prepared, plain):
        model.train()
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
    for name in ("q_proj", "k_proj", "v_proj"):
        g_prepared = getattr(prepared.blocks[0].attn, name).weight.grad
        g_plain = getattr(plain.blocks[0].attn, name).weight.grad
        assert g_prepared is not None and g_prepared.abs().sum() > 0
        torch.testing.assert_close(g_prepared, g_plain, rtol=1e-5, atol=1e-6)


def test_a_prepared_model_saves_and_exports_like_any_other(tmp_path, monkeypatch):
    """Row-major stacking makes q/k/v contiguous views of one tensor: safetensors refuses shared
    memory, so the save paths copy them out."""
    monkeypatch.setattr(fastpath, "faster_layout", lambda out_f, in_f, dtype: "row")
    from safetensors.torch import load_file

    from tegaki.hf import export_hf
    from tegaki.train import _model_tensors

    model = prepare_for_decoding(random_model("tiny-llama"))
    tensors = _model_tensors(model.state_dict(), model.config)
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    for name, t in model.state_dict().items():
        if name in loaded:
            assert torch.equal(loaded[name], t), name
    export_hf(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 0


def test_stacking_refuses_layers_of_different_kinds():
    linear = nn.Linear(8, 8)
    assert StackedLinear.stack([linear, Int8Linear(nn.Linear(8, 8))]) is None
    assert StackedLinear.stack([linear, nn.Linear(4, 8)]) is None


def test_measured_layout_is_one_of_the_two_and_remembered():
    choice = fastpath.faster_layout(96, 32, torch.float32)
    assert choice in ("row", "column")
    assert fastpath._measured[(96, 32, torch.float32, torch.get_num_threads())] == choice


@pytest.mark.slow  # a few seconds of tracing
def test_a_traced_int8_decode_step_with_stacked_projections_gives_the_same_tokens():
    """The compiled int8 row of bench_generate: quantized, stacked, traced (aot_eager: the same
    graph capture as inductor, without code generation)."""
    model = quantize_model(random_model("tiny", n_embd=64, n_head=2), "int8")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = generate(model, prompt, 10, temperature=0)
    assert model.blocks[0].attn.fused_qkv is not None
    assert torch.equal(generate(model, prompt, 10, temperature=0, compile="aot_eager"), eager)


def test_measuring_a_huge_matrix_uses_a_smaller_one_of_the_same_kind(monkeypatch):
    shapes = []
    real = fastpath._column_major

    def spy(w):
        shapes.append(tuple(w.shape))
        return real(w)

    monkeypatch.setattr(fastpath, "_column_major", spy)
    monkeypatch.setattr(fastpath, "MEASURE_BYTES", 1 << 20)
    fastpath._time_layouts(100_000, 128, torch.float32)  # a wide 51 MB matrix
    fastpath._time_layouts(64, 50_000, torch.float32)  # a narrow 12.8 MB one
    wide, narrow = shapes[0], shapes[-1]
    assert wide[1] == 128 and 128 <= wide[0] <= 2048  # still out >= in, at most ~1 MiB
    assert narrow[1] == 50_000 and narrow[0] <= 64 and narrow[0] * 50_000 * 4 <= 1 << 20
