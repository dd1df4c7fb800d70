"""The model's own guarantees: fused calls equal their formulas, both attention paths compute the
same thing for every flag, nothing leaks from the future, the MoE loop equals its batched twin, and
the real shapes have their published parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tegaki.config import ModelConfig
from tegaki.mask import CAUSAL, build_attention_mask
from tegaki.model import (
    GPT,
    Attention,
    MoE,
    gelu_tanh_reference,
    layer_norm_reference,
    rms_norm_reference,
    softmax_reference,
)
from tegaki.rope import rope_cos_sin, rope_frequencies

pytestmark = pytest.mark.usefixtures("one_thread")

# -------------------------------------------------------------------------------------------------
# Formulas vs fused kernels
# -------------------------------------------------------------------------------------------------


def test_layer_norm_reference_equals_fused():
    x, w, b = torch.randn(3, 5, 16) * 3 + 1, torch.randn(16), torch.randn(16)
    for bias in (b, None):
        torch.testing.assert_close(layer_norm_reference(x, w, bias, 1e-5), F.layer_norm(x, (16,), w, bias, 1e-5))


def test_gelu_tanh_reference_equals_fused():
    x = torch.linspace(-8, 8, 1001)
    torch.testing.assert_close(gelu_tanh_reference(x), F.gelu(x, approximate="tanh"))
    assert (gelu_tanh_reference(x) - F.gelu(x)).abs().max() > 1e-4  # and it is not the exact erf GELU


def test_softmax_reference_equals_fused():
    x = torch.randn(4, 7, 9) * 10
    x[0, 0, 3:] = float("-inf")  # masked keys
    torch.testing.assert_close(softmax_reference(x), torch.softmax(x, dim=-1))
    nothing_visible = torch.full((2, 5), float("-inf"))
    assert torch.equal(softmax_reference(nothing_visible), torch.zeros(2, 5))  # zeros, not NaN


@pytest.mark.parametrize("eps", [1e-5, 1e-6, 0.1])
def test_rms_norm_reference_equals_fused(eps):
    x, w = torch.randn(3, 5, 16) * 2, torch.randn(16)
    torch.testing.assert_close(rms_norm_reference(x, w, eps), F.rms_norm(x, (16,), w, eps))
    # bf16 in, the statistics in float32, bf16 out
    xb = x.bfloat16()
    want = F.rms_norm(xb.float(), (16,), w, eps).bfloat16()
    out = rms_norm_reference(xb, w, eps)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want)


# -------------------------------------------------------------------------------------------------
# Every attention variant: both paths agree, nothing leaks from the future
# -------------------------------------------------------------------------------------------------

_BASE = dict(vocab_size=61, n_layer=2, n_head=4, n_embd=32, block_size=32)
_MODERN = dict(_BASE, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, intermediate_size=48)
_GPT_OSS = dict(
    _MODERN,
    mlp="moe",
    n_kv_head=2,
    head_dim=16,
    moe_expert="gpt-oss",
    n_experts=4,
    n_experts_per_tok=2,
    moe_router_bias=True,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    attn_sinks=True,
    sliding_window=4,
    layer_types=["sliding", "full"],
    rope_scaling="yarn",
    rope_factor=4.0,
    rope_original_max_len=8,
    rope_truncate=False,
    moe_aux_loss_coef=0.01,
)

VARIANTS = {
    "gpt2": dict(_BASE),
    "gpt2-no-final-norm-untied": dict(_BASE, final_norm=False, tie_embeddings=False, qkv_bias=False),
    "no-positions": dict(_BASE, pos_embedding="none"),
    "llama-gqa": dict(_MODERN, n_kv_head=2),
    "mqa-head-dim-48": dict(_MODERN, n_kv_head=1, head_dim=48),
    "qwen3-qk-norm": dict(_MODERN, n_kv_head=2, head_dim=16, qk_norm=True, norm_eps=1e-6),
    "rope-ntk": dict(_MODERN, rope_scaling="ntk", rope_factor=2.0),
    "rope-llama3": dict(_MODERN, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8),
    "sinks": dict(_MODERN, attn_sinks=True),
    "window-all-layers": dict(_MODERN, sliding_window=3),
    "window-per-layer": dict(_MODERN, n_layer=3, sliding_window=5, layer_types=["full", "sliding", "sliding"]),
    "gate-elementwise": dict(_MODERN, attn_gate="elementwise"),
    "gate-headwise-gqa": dict(_MODERN, attn_gate="headwise", n_kv_head=2),
    "scale-fixed": dict(_MODERN, attn_scale=0.5),
    "scale-learnable": dict(_MODERN, attn_scale_learnable=True),
    "layernorm-rope-biases": dict(_MODERN, norm="layernorm", bias=True, mlp_bias=False),
    "gpt-oss": _GPT_OSS,
    "moe-softmax-first": dict(
        _MODERN, mlp="moe", n_experts=3, n_experts_per_tok=2, moe_softmax_after_topk=False, moe_norm_topk_prob=False
    ),
    "everything": dict(_GPT_OSS, qk_norm=True, attn_gate="headwise", attn_scale_learnable=True, n_kv_head=1),
}


def build(flags: dict, perturb) -> GPT:
    return perturb(GPT(ModelConfig(**flags)), scale=0.3)


@torch.no_grad()
def logits_both_paths(model: GPT, ids: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    out = {}
    for impl in ("manual", "sdpa"):
        model.config.attn_impl = impl
        out[impl] = model(ids, **kw)
    model.config.attn_impl = "sdpa"
    return out


@pytest.mark.parametrize("name", VARIANTS)
def test_attention_paths_agree(name, perturb):
    model = build(VARIANTS[name], perturb)
    ids = torch.randint(0, 61, (2, 16))
    out = logits_both_paths(model, ids)
    torch.testing.assert_close(out["sdpa"], out["manual"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_no_leak_from_the_future(name, perturb):
    """Changing tokens after position k never changes the logits at positions <= k, on either path."""
    model = build(VARIANTS[name], perturb)
    ids = torch.randint(0, 61, (2, 16))
    k = 9
    changed = ids.clone()
    changed[:, k + 1 :] = (ids[:, k + 1 :] + 1 + torch.randint(0, 59, (2, 6))) % 61
    before, after = logits_both_paths(model, ids), logits_both_paths(model, changed)
    for impl in ("manual", "sdpa"):
        leak = (before[impl][:, : k + 1] - after[impl][:, : k + 1]).abs().max().item()
        # Not bit-exact: the MoE loop groups a different set of tokens per expert, so sums round
        # differently (~1e-6). A real leak moves logits by orders of magnitude more.
        assert leak < 1e-5, f"{impl}: the future moved the past by {leak}"
        assert (before[impl][:, k + 1 :] - after[impl][:, k + 1 :]).abs().max() > 1e-3  # the change is seen


def test_the_leak_check_catches_a_leak(perturb):
    """causal=False is the classic bug; the check above must notice it on both paths."""
    model = build(dict(_MODERN, causal=False), perturb)
    ids = torch.randint(0, 61, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 61
    before, after = logits_both_paths(model, ids), logits_both_paths(model, changed)
    for impl in ("manual", "sdpa"):
        assert (before[impl][:, 0] - after[impl][:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "window-per-layer", "gpt-oss"])
def test_left_padding_matches_unpadded(name, perturb):
    """A left-padded row gives the same logits as the same tokens alone (positions restart at 0)."""
    model = build(VARIANTS[name], perturb)
    ids = torch.randint(0, 61, (1, 10))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)  # (1, 13)
    valid = torch.tensor([[False] * 3 + [True] * 10])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    alone = logits_both_paths(model, ids)
    with_pad = logits_both_paths(model, padded, positions=positions, padding_mask=valid)
    for impl in ("manual", "sdpa"):
        torch.testing.assert_close(with_pad[impl][:, 3:], alone[impl], rtol=1e-5, atol=1e-5)


def test_attention_mask_orientation():
    """True = visible: key j for query i when j <= i and i - j < window."""
    pos = torch.arange(6)[None]
    mask = build_attention_mask(pos, pos, window=3)[0, 0]
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(mask, (j <= i) & (i - j < 3))


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_sliding_window_binds(impl, perturb):
    """One sliding layer of width w: the logits at position i depend on tokens i-w+1..i only."""
    w = 4
    model = build(dict(_MODERN, n_layer=1, sliding_window=w, attn_impl=impl), perturb)
    ids = torch.randint(0, 61, (1, 12))
    changed = ids.clone()
    changed[0, 2] = (ids[0, 2] + 1) % 61
    with torch.no_grad():
        diff = (model(ids) - model(changed)).abs().amax(dim=-1)[0]  # (T,)
    assert (diff[2 : 2 + w] > 1e-4).all() and (diff[2 + w :] == 0).all() and (diff[:2] == 0).all()


def test_layer_types_choose_each_layers_window():
    model = GPT(ModelConfig(**VARIANTS["window-per-layer"]))
    assert [b.attn.window for b in model.blocks] == [None, 5, 5]
    model = GPT(ModelConfig(**VARIANTS["window-all-layers"]))
    assert [b.attn.window for b in model.blocks] == [3, 3]


# -------------------------------------------------------------------------------------------------
# Sinks, gates and scales: each does what it claims
# -------------------------------------------------------------------------------------------------


def attention_pair(perturb, **flags) -> tuple[Attention, Attention, torch.Tensor, tuple]:
    """An Attention with the flags and one without, sharing every common weight."""
    config = ModelConfig(**dict(_MODERN, n_kv_head=2, **flags))
    with_flag = perturb(Attention(config, 0))
    plain = Attention(ModelConfig(**_MODERN, n_kv_head=2), 0).eval()
    plain.load_state_dict(with_flag.state_dict(), strict=False)
    x = torch.randn(2, 10, 32)
    inv_freq, factor = rope_frequencies(config)
    positions = torch.arange(10).expand(2, 10)
    return with_flag, plain, x, (rope_cos_sin(inv_freq, factor, positions, x.dtype), positions, CAUSAL)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@torch.no_grad()
def test_sinks_absorb_attention_mass(impl, perturb):
    """The sink scales each head's output by sigmoid(lse - sink), lse the log-sum-exp of the row's
    visible scores; a sink of -inf is no sink at all."""
    sinky, plain, x, args = attention_pair(perturb, attn_sinks=True, attn_impl=impl)
    plain.config.attn_impl = impl
    rope, positions, mask = args
    # out = o_proj(y): compare y by removing o_proj (a Linear without bias here) via a hook.
    captured = {}
    for name, m in (("sink", sinky), ("plain", plain)):
        m.o_proj.register_forward_hook(lambda mod, inp, out, name=name: captured.__setitem__(name, inp[0]))
        m(x, rope, positions, mask)
    q, k, _ = sinky.qkv(x).split(sinky.qkv_sizes, dim=-1)  # (B, T, H*D), (B, T, K*D)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k = k.view(2, 10, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    from tegaki.rope import apply_rope

    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    scores = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~build_attention_mask(positions, positions), float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)  # (B, H, T, 1)
    keep = torch.sigmoid(lse - sinky.sinks.view(1, 4, 1, 1))  # (B, H, T, 1)
    want = (captured["plain"].view(2, 10, 4, 8).transpose(1, 2) * keep).transpose(1, 2).reshape(2, 10, 32)
    torch.testing.assert_close(captured["sink"], want, rtol=1e-5, atol=1e-6)

    sinky.sinks.fill_(float("-inf"))
    torch.testing.assert_close(sinky(x, rope, positions, mask), plain(x, rope, positions, mask))


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
@torch.no_grad()
def test_gate_multiplies_each_heads_output(gate, perturb):
    """With the gate projection at zero, sigmoid(0) = 1/2 halves every head's output before o_proj;
    the gate's width is one value per channel (elementwise) or per head (headwise)."""
    gated, plain, x, args = attention_pair(perturb, attn_gate=gate)
    assert gated.gate_proj.out_features == (32 if gate == "elementwise" else 4)
    gated.gate_proj.weight.zero_()
    torch.testing.assert_close(gated(x, *args), 0.5 * plain(x, *args))


@torch.no_grad()
def test_attention_scale_fixed_and_learnable(perturb):
    fixed, plain, x, args = attention_pair(perturb, attn_scale=1.0 / 8**0.5)  # = the default 1/sqrt(D)
    torch.testing.assert_close(fixed(x, *args), plain(x, *args))
    fixed.scale = 0.9
    assert not torch.allclose(fixed(x, *args), plain(x, *args), atol=1e-4)

    learnable = Attention(ModelConfig(**dict(_MODERN, attn_scale_learnable=True)), 0)
    assert isinstance(learnable.scale, torch.nn.Parameter) and learnable.scale.item() == pytest.approx(8**-0.5)
    assert any(p is learnable.scale for p in learnable.parameters())


def test_learnable_scale_gets_a_gradient_on_both_paths(perturb):
    for impl in ("manual", "sdpa"):
        model = build(dict(_MODERN, attn_scale_learnable=True, attn_impl=impl), perturb).train()
        ids = torch.randint(0, 61, (2, 8))
        _, loss = model(ids, torch.randint(0, 61, (2, 8)))
        loss.backward()
        assert all(b.attn.scale.grad is not None and b.attn.scale.grad.abs() > 0 for b in model.blocks)


def test_biases_per_projection():
    def bias_names(**flags):
        model = GPT(ModelConfig(**dict(_MODERN, **flags)))
        return {
            n.split(".", 2)[2] for n, _ in model.named_parameters() if n.startswith("blocks.0.") and n.endswith("bias")
        }

    assert bias_names() == set()
    assert bias_names(qkv_bias=True) == {"attn.qkv.bias"}
    assert bias_names(attn_out_bias=True) == {"attn.o_proj.bias"}
    assert bias_names(mlp_bias=True) == {"mlp.gate.bias", "mlp.up.bias", "mlp.down.bias"}


def test_tied_and_untied_head():
    tied = GPT(ModelConfig(**_BASE))
    untied = GPT(ModelConfig(**dict(_BASE, tie_embeddings=False)))
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.lm_head.weight is not untied.wte.weight
    assert untied.num_parameters() - tied.num_parameters() == 61 * 32


# -------------------------------------------------------------------------------------------------
# Mixture of experts
# -------------------------------------------------------------------------------------------------


def moe_layer(config: ModelConfig) -> MoE:
    """A lone MoE layer (its experts start at N(0, init_std), as inside GPT)."""
    return MoE(config)


MOE_FLAGS = {
    "gpt-oss": dict(moe_expert="gpt-oss", moe_router_bias=True, mlp_bias=True, moe_swiglu_limit=0.3),
    "softmax-first-renormalised": dict(moe_softmax_after_topk=False),
    "softmax-first-raw": dict(moe_softmax_after_topk=False, moe_norm_topk_prob=False, n_experts_per_tok=1),
    "all-experts": dict(n_experts_per_tok=4),
}


@pytest.mark.parametrize("name", MOE_FLAGS)
def test_moe_loop_equals_dense(name, perturb):
    config = ModelConfig(**dict(_MODERN, mlp="moe", n_experts=4, n_experts_per_tok=2) | MOE_FLAGS[name])
    moe = perturb(moe_layer(config), scale=0.5)
    x = torch.randn(3, 7, 32, requires_grad=True)
    outputs, grads = {}, {}
    for impl in ("loop", "dense"):
        config.moe_impl = impl
        out = moe(x)
        outputs[impl] = out
        grads[impl] = torch.autograd.grad(out.square().sum(), [x, moe.w_in, moe.router.weight])
    torch.testing.assert_close(outputs["loop"], outputs["dense"], rtol=1e-5, atol=1e-5)
    for g_loop, g_dense in zip(grads["loop"], grads["dense"]):
        # Gradients sum many products in a different order: compare relative to their scale.
        torch.testing.assert_close(g_loop, g_dense, rtol=1e-4, atol=1e-5 * g_dense.abs().max().item())


def test_gpt_oss_expert_clamps():
    config = ModelConfig(**dict(_MODERN, mlp="moe", n_experts=2, moe_expert="gpt-oss", moe_swiglu_limit=7.0))
    h = torch.tensor([[100.0, 100.0, -100.0, -100.0, 1.0, -2.0]])  # pairs (gate, up): interleaved
    got = MoE(config).activation(h)
    gate, up = torch.tensor([7.0, -100.0, 1.0]), torch.tensor([7.0, -7.0, -2.0])
    torch.testing.assert_close(got[0], (up + 1) * gate * torch.sigmoid(1.702 * gate))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@torch.no_grad()
def test_softmax_before_topk_equals_qwen3_moe_block(norm_topk_prob, perturb):
    """Mixtral / Qwen3-MoE routing (softmax over all experts, keep the k best, renormalise or not)
    against transformers' Qwen3-MoE block; its experts store [gate; up] stacked, tegaki interleaves."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_config = transformers.Qwen3MoeConfig(
        hidden_size=32, moe_intermediate_size=24, num_experts=5, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob
    )
    theirs = Qwen3MoeSparseMoeBlock(hf_config)
    for p in theirs.parameters():  # the block leaves its expert tensors uninitialised (empty)
        torch.nn.init.normal_(p, std=0.02)
    theirs = perturb(theirs, scale=0.5)
    ours = moe_layer(
        ModelConfig(
            **dict(
                _MODERN,
                mlp="moe",
                n_experts=5,
                n_experts_per_tok=2,
                intermediate_size=24,
                moe_softmax_after_topk=False,
                moe_norm_topk_prob=norm_topk_prob,
            )
        )
    )
    gate, up = theirs.experts.gate_up_proj.chunk(2, dim=1)  # (E, I, C) each
    ours.router.weight.copy_(theirs.gate.weight)
    ours.w_in[:, :, 0::2] = gate.transpose(1, 2)
    ours.w_in[:, :, 1::2] = up.transpose(1, 2)
    ours.w_out.copy_(theirs.experts.down_proj.transpose(1, 2))
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_aux_loss_is_added_in_training_only(perturb):
    model = build(VARIANTS["gpt-oss"], perturb)
    ids, targets = torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 12))
    logits, loss_eval = model(ids, targets)
    cross_entropy = F.cross_entropy(logits.view(-1, 61), targets.view(-1))
    torch.testing.assert_close(loss_eval, cross_entropy)
    model.train()
    _, loss_train = model(ids, targets)
    aux = model.moe_aux_loss()
    assert aux > 0
    torch.testing.assert_close(loss_train, cross_entropy + 0.01 * aux)
    # The router learns from it: the aux loss alone has a gradient on every router.
    aux.backward()
    assert all(b.mlp.router.weight.grad.abs().sum() > 0 for b in model.blocks)


def test_aux_loss_equals_transformers_formula_per_layer(perturb):
    """Switch-Transformer balance loss E * sum_e f_e P_e, for one layer, against transformers'."""
    pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = ModelConfig(**dict(_MODERN, mlp="moe", n_experts=6, n_experts_per_tok=2))
    moe = perturb(moe_layer(config), scale=1.0)
    x = torch.randn(4, 5, 32)
    moe.train()  # the balance loss is computed while training only
    moe(x)
    router_logits = moe.router(x.view(-1, 32))
    torch.testing.assert_close(moe.aux_loss, load_balancing_loss_func((router_logits,), 6, 2))


def test_model_aux_loss_pools_the_layers_as_transformers_does(perturb):
    """Over several MoE layers transformers pools the counts of every token of every layer before
    multiplying; the mean of per-layer losses would differ whenever the layers route differently."""
    pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    model = build(VARIANTS["gpt-oss"], perturb)
    assert sum(isinstance(b.mlp, MoE) for b in model.blocks) >= 2
    router_logits = []
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, out: router_logits.append(out)) for b in model.blocks]
    model.train()
    model(torch.randint(0, 61, (2, 12)), torch.randint(0, 61, (2, 12)))
    for h in hooks:
        h.remove()
    cfg = model.config
    expected = load_balancing_loss_func(tuple(router_logits), cfg.n_experts, cfg.n_experts_per_tok)
    torch.testing.assert_close(model.moe_aux_loss(), expected)
    per_layer_mean = torch.stack([b.mlp.aux_loss for b in model.blocks]).mean()
    assert not torch.allclose(per_layer_mean, expected)  # the layers did route differently


# -------------------------------------------------------------------------------------------------
# Parameter counts of the real shapes, built on the meta device (no memory)
# -------------------------------------------------------------------------------------------------


def meta_model(preset: str, **changes) -> GPT:
    with torch.device("meta"):
        return GPT(ModelConfig.preset(preset).replace(**changes))


@pytest.mark.parametrize(
    "preset, changes, total",
    [
        ("gpt2", {}, 124_439_808),
        ("gpt2", dict(qkv_bias=False), 124_412_160),  # the variant without q/k/v biases
        ("gpt2", dict(tie_embeddings=False), 163_037_184),
        ("gpt2-medium", {}, 354_823_168),
        ("llama-3.2-1b", {}, 1_235_814_400),  # Meta's model card: 1.23B
        ("qwen3-0.6b", {}, 596_049_920),  # Qwen's card: 0.6B, 0.44B without embeddings (checked below)
        ("gpt-oss-20b", {}, 20_914_757_184),  # OpenAI's card: 20.91B
    ],
)
def test_parameter_counts(preset, changes, total):
    assert meta_model(preset, **changes).num_parameters() == total


def test_qwen3_non_embedding_count():
    assert round(meta_model("qwen3-0.6b").num_parameters(exclude_embeddings=True) / 1e9, 2) == 0.44


def active_parameters(model: GPT) -> int:
    """Per token: everything but the embedding table, and only k of E experts."""
    cfg = model.config
    n = model.num_parameters() - model.wte.weight.numel()
    for block in model.blocks:
        experts = sum(p.numel() for name, p in block.mlp.named_parameters() if not name.startswith("router"))
        n -= experts * (cfg.n_experts - cfg.n_experts_per_tok) // cfg.n_experts
    return n


def test_gpt_oss_active_parameters():
    assert active_parameters(meta_model("gpt-oss-20b")) == 3_608_307_264
    big = meta_model("gpt-oss-120b")
    # OpenAI's model card: 116.83B total, 5.13B active.
    assert round(big.num_parameters() / 1e9, 2) == 116.83
    assert round(active_parameters(big) / 1e9, 2) == 5.13


# -------------------------------------------------------------------------------------------------
# docs/architectures.md points at real code
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["architectures.md", "architectures.ja.md"])
def test_architecture_doc_quotes_code_that_exists(doc):
    """Each `[model.py:N](../tegaki/model.py#LN) `code`` (or moe.py, ...) in the doc quotes code that
    file really has, so the page cannot silently drift from the model. Line numbers move whenever the
    file is edited: a moved line is a warning that says where it is now; a vanished quote is a failure."""
    import re
    import warnings
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    text = (root / "docs" / doc).read_text(encoding="utf-8")
    links = re.findall(r"\[(\w+)\.py:(\d+)\]\(\.\./tegaki/\1\.py#L(\d+)\) `([^`]+)`", text)
    assert len(links) >= 20 and len(links) == len(re.findall(r"\.py#L", text)), "every link must quote its code"
    for name, label, anchor, code in links:
        source = (root / "tegaki" / f"{name}.py").read_text(encoding="utf-8").splitlines()
        assert label == anchor, f"{doc}: link text says line {label}, the link goes to {anchor}"
        found = [i + 1 for i, line in enumerate(source) if code in line]
        assert found, f"{doc}: {name}.py does not have `{code}`"
        if int(anchor) not in found:
            warnings.warn(
                f"docs/{doc}: `{code}` stands at {name}.py line(s) {found}, not {anchor}; "
                "run python scripts/refresh_doc_links.py",
                stacklevel=1,
            )


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt-oss"])
def test_last_only_logits_equal_the_last_row_of_all_logits(preset):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(preset)).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(ids)
        last = model(ids, last_only=True)
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)
