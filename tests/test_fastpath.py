"""The decoding fast path (stacked q/k/v, decoding weight layouts) changes speed and nothing else:
the same logits and tokens, training exactly as before once `train()` undoes it, saved files
unchanged, and a stale stacked copy never read -- eagerly or compiled."""

import pytest
import torch
import torch.nn as nn

import tegaki.fastpath as fastpath
from tegaki.fastpath import StackedLinear, prepare_for_decoding, restore_plain_layout, set_layout
from tegaki.generate import generate
from tegaki.quant import Int8Linear, quantize_model, set_fast

from test_generate import FAMILIES, random_model


@pytest.fixture(params=["row", "column"])
def layout(request, monkeypatch):
    """Force each layout for every matrix, whatever the rule says, so both are always checked."""
    monkeypatch.setattr(fastpath, "decoding_layout", lambda weight: request.param)
    return request.param


def ids_for(model, T=9, seed=1):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def stacks_hold(model) -> list[bool]:
    return [b.attn.fused_qkv is not None and b.attn.fused_qkv.holds([b.attn.q_proj, b.attn.k_proj, b.attn.v_proj])
            for b in model.blocks]


@pytest.mark.parametrize("name", FAMILIES)
def test_prepared_model_gives_the_same_logits_and_tokens(name, layout):
    model = random_model(name)
    ids = ids_for(model)
    with torch.inference_mode():
        before = model(ids)
    tokens_before = generate(model, ids[:1], 12, temperature=0)
    prepare_for_decoding(model)
    assert all(stacks_hold(model))
    with torch.inference_mode():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(generate(model, ids[:1], 12, temperature=0), tokens_before)


def test_generate_leaves_the_model_alone_unless_asked():
    model = random_model("tiny")
    before = {n: (t.data_ptr(), t.stride()) for n, t in model.state_dict().items()}
    generate(model, ids_for(model)[:1], 4, temperature=0)
    assert {n: (t.data_ptr(), t.stride()) for n, t in model.state_dict().items()} == before
    generate(model, ids_for(model)[:1], 4, temperature=0, prepare=True)
    assert all(stacks_hold(model))


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


def test_the_layout_rule_is_fixed_and_follows_the_shape():
    def layout_of(out_f, in_f, dtype=torch.float32):
        return fastpath.decoding_layout(torch.empty(out_f, in_f, dtype=dtype))

    assert layout_of(2304, 768) == layout_of(768, 768) == layout_of(50257, 768) == "column"
    assert layout_of(768, 3072) == "row"  # narrow: row-major streamed faster
    assert layout_of(2304, 768, torch.bfloat16) == "row"


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
    assert all(stacks_hold(model))


def test_a_parametrized_projection_is_not_read_from_the_stack():
    """register_parametrization changes the layer's class under the stack's feet."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    model, reference = prepare_for_decoding(random_model("tiny")), random_model("tiny")
    for m in (model, reference):
        parametrize.register_parametrization(m.blocks[0].attn.v_proj, "weight", Doubled())
    ids = ids_for(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a few seconds of tracing
def test_a_compiled_step_never_reads_a_stale_stack():
    """A compiled step cannot check the stack's addresses; generate() drops stale stacks first.
    Here the weights are swapped with load_state_dict(assign=True) after preparing."""
    model = prepare_for_decoding(random_model("tiny", n_embd=64, n_head=2))
    torch.manual_seed(5)
    fresh = random_model("tiny", n_embd=64, n_head=2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(-1.0)
    model.load_state_dict(fresh.state_dict(), assign=True)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    expected = generate(fresh, prompt, 10, temperature=0)
    assert torch.equal(generate(model, prompt, 10, temperature=0, compile="aot_eager"), expected)


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


def test_train_undoes_the_decoding_layout_and_training_matches(layout):
    """Optimizers, the fused AdamW above all, assume each parameter is its own contiguous tensor
    (a column-major or stacked one makes the fused CPU kernel update the wrong elements). So
    `train()` restores plain tensors; then a real optimizer step equals the unprepared model's."""
    from tegaki.train import TrainConfig, build_optimizer

    prepared, plain = random_model("tiny"), random_model("tiny")
    ids = ids_for(prepared)
    generate(prepared, ids[:1], 3, prepare=True)
    prepared.eval()  # eval() keeps the decoding layout ...
    assert all(stacks_hold(prepared))
    prepared.train()  # ... train() undoes it
    assert all(b.attn.fused_qkv is None for b in prepared.blocks)
    for p in prepared.parameters():
        assert p.is_contiguous() and p.untyped_storage().nbytes() == p.numel() * p.element_size()
    cfg = TrainConfig()
    for model in (prepared, plain):
        model.train()
        opt = build_optimizer(model, cfg, torch.device("cpu"))
        for _ in range(2):
            _, loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (name, a), b in zip(prepared.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_gradients_taken_while_prepared_are_made_plain_too(layout):
    """backward on a prepared model, then train(), then a fused AdamW step: a gradient keeps the
    column-major layout of its parameter unless train() makes it plain as well."""
    from tegaki.train import TrainConfig, build_optimizer

    prepared, plain = prepare_for_decoding(random_model("tiny")), random_model("tiny")
    ids = ids_for(prepared)
    for model in (prepared, plain):
        _, loss = model(ids[:, :-1], ids[:, 1:])  # still in eval mode, still prepared
        loss.backward()
        model.train()
        build_optimizer(model, TrainConfig(), torch.device("cpu")).step()
    for (name, a), b in zip(prepared.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_a_no_op_move_then_train_still_gives_every_tensor_its_own_memory():
    model = prepare_for_decoding(random_model("tiny"))
    model.to("cpu")  # drops the stacks, though nothing moved
    model.train()
    for t in list(model.parameters()) + list(model.buffers()):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.slow  # a few seconds of tracing
def test_a_compiled_forward_after_loading_new_weights_reads_them():
    """Outside generate(): load_state_dict(assign=True) itself drops the stacks."""
    model = prepare_for_decoding(random_model("tiny", n_embd=64, n_head=2))
    fresh = random_model("tiny", n_embd=64, n_head=2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(-1.0)
    model.load_state_dict(fresh.state_dict(), assign=True)
    compiled = torch.compile(model, backend="aot_eager")
    ids = ids_for(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), fresh(ids), rtol=1e-5, atol=1e-5)


def test_restore_gives_plain_tensors_with_the_same_values(layout):
    model = random_model("tiny-llama")
    values = {n: t.clone() for n, t in model.state_dict().items()}
    restore_plain_layout(prepare_for_decoding(model))
    for name, t in model.state_dict().items():
        assert t.is_contiguous() and torch.equal(t, values[name]), name


def test_a_prepared_model_saves_and_exports_like_any_other(tmp_path, layout):
    """Stacked q/k/v share one tensor's memory (and may be column-major): safetensors refuses
    shared memory, so tegaki's save paths copy them out. Both files load back exactly."""
    from safetensors.torch import load_file, save_file

    from tegaki.load import export_hf, from_pretrained
    from tegaki.train import _model_tensors

    model = prepare_for_decoding(random_model("tiny-llama"))
    save_file(_model_tensors(model.state_dict(), model.config), str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    for name, t in model.state_dict().items():
        if name in loaded:
            assert torch.equal(loaded[name], t), name
    export_hf(model, tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf").eval()
    ids = ids_for(model)
    with torch.inference_mode():
        torch.testing.assert_close(back(ids), model(ids), rtol=1e-5, atol=1e-5)


def test_stacking_refuses_what_cannot_share_one_matrix():
    linear = nn.Linear(8, 8)
    assert StackedLinear.stack([linear, Int8Linear(nn.Linear(8, 8))]) is None  # different kinds
    assert StackedLinear.stack([linear, nn.Linear(4, 8)]) is None  # different inputs
    assert StackedLinear.stack([linear, nn.Linear(8, 8).to(torch.bfloat16)]) is None  # different dtypes
    assert linear.weight.dtype == torch.float32  # and nothing was cast on the way


@pytest.mark.slow  # a few seconds of tracing
def test_a_traced_int8_decode_step_with_stacked_projections_gives_the_same_tokens():
    """The compiled int8 row of bench_generate: quantized, stacked, traced (aot_eager: the same
    graph capture as inductor, without code generation)."""
    model = quantize_model(random_model("tiny", n_embd=64, n_head=2), "int8")
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    eager = generate(model, prompt, 10, temperature=0)
    traced = generate(model, prompt, 10, temperature=0, compile="aot_eager", prepare=True)
    assert model.blocks[0].attn.fused_qkv is not None
    assert torch.equal(traced, eager)
