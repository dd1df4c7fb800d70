"""Rotary tables against transformers' own rope initialisation, for every scaling tegaki has."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from tegaki.config import ModelConfig  # noqa: E402
from tegaki.rope import apply_rope, rope_cos_sin, rope_frequencies  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def configs(
    head_dim: int, theta: float, max_pos: int, scaling: str, factor: float = 1.0, original: int | None = None, **extra
) -> tuple[ModelConfig, transformers.LlamaConfig]:
    """The same rotary setup as a tegaki ModelConfig and as a transformers LlamaConfig."""
    ours = ModelConfig(
        n_embd=4 * head_dim,
        n_head=4,
        n_layer=1,
        block_size=max_pos,
        vocab_size=8,
        pos_embedding="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        rope_factor=factor,
        rope_original_max_len=original,
        **{f"rope_{k}": v for k, v in extra.items()},
    )
    hf_type = {"none": "default", "ntk": "dynamic"}.get(scaling, scaling)
    params = dict(rope_type=hf_type, rope_theta=theta)
    if scaling != "none":
        params["factor"] = factor
    if original is not None:
        params["original_max_position_embeddings"] = original
    hf_names = {
        "low_freq_factor": "low_freq_factor",
        "high_freq_factor": "high_freq_factor",
        "beta_fast": "beta_fast",
        "beta_slow": "beta_slow",
        "truncate": "truncate",
        "attention_factor": "attention_factor",
    }
    params.update({hf_names[k]: v for k, v in extra.items()})
    theirs = transformers.LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=max_pos,
        vocab_size=8,
        rope_parameters=params,
    )
    return ours, theirs


CASES = {
    "none-64": ("none", dict(head_dim=64, theta=10000.0, max_pos=2048)),
    "none-qwen3": ("none", dict(head_dim=128, theta=1_000_000.0, max_pos=40960)),
    "linear": ("linear", dict(head_dim=64, theta=10000.0, max_pos=4096, factor=4.0)),
    "llama3-1b": (
        "llama3",
        dict(
            head_dim=64,
            theta=500_000.0,
            max_pos=131072,
            factor=32.0,
            original=8192,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
        ),
    ),
    "llama3-odd": (
        "llama3",
        dict(
            head_dim=32, theta=10000.0, max_pos=512, factor=8.0, original=64, low_freq_factor=2.0, high_freq_factor=8.0
        ),
    ),
    "yarn-truncate": ("yarn", dict(head_dim=64, theta=10000.0, max_pos=8192, factor=4.0, original=2048)),
    "yarn-gpt-oss-20b": (
        "yarn",
        dict(
            head_dim=64,
            theta=150_000.0,
            max_pos=131072,
            factor=32.0,
            original=4096,
            beta_fast=32.0,
            beta_slow=1.0,
            truncate=False,
        ),
    ),
    "yarn-betas-attention-factor": (
        "yarn",
        dict(
            head_dim=32,
            theta=10000.0,
            max_pos=256,
            factor=2.5,
            original=64,
            beta_fast=16.0,
            beta_slow=2.0,
            attention_factor=1.3,
        ),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_frequencies_equal_transformers(name):
    scaling, kw = CASES[name]
    ours, theirs = configs(scaling=scaling, **kw)
    inv_freq, attention_factor = rope_frequencies(ours)
    if scaling == "none":
        want, want_factor = LlamaRotaryEmbedding.compute_default_rope_parameters(theirs)
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[scaling](theirs, "cpu")
    assert inv_freq.shape == (kw["head_dim"] // 2,)
    torch.testing.assert_close(inv_freq, want, rtol=1e-6, atol=0)
    assert attention_factor == pytest.approx(want_factor, rel=1e-12)
    if scaling != "none":  # the scaling really changed something, so the comparison has teeth
        plain = rope_frequencies(ours.replace(rope_scaling="none"))[0]
        assert not torch.allclose(inv_freq, plain)


def test_static_ntk_equals_dynamic_ntk_where_they_coincide():
    """tegaki's "ntk" is static: theta' = theta * s^(d/(d-2)), always. transformers' "dynamic" grows
    the base with the sequence: theta * (s*L/M - (s-1))^(d/(d-2)) for length L past M =
    max_position_embeddings. The two agree when s*L/M - (s-1) = s, i.e. at L = M(2s-1)/s."""
    s, M = 2.0, 64
    L = int(M * (2 * s - 1) / s)  # 96
    ours, theirs = configs(head_dim=64, theta=10000.0, max_pos=M, scaling="ntk", factor=s)
    want, want_factor = ROPE_INIT_FUNCTIONS["dynamic"](theirs, "cpu", seq_len=L)
    inv_freq, attention_factor = rope_frequencies(ours)
    torch.testing.assert_close(inv_freq, want, rtol=1e-6, atol=0)
    assert attention_factor == want_factor == 1.0
    # Anywhere else they differ: at L = M dynamic is still plain RoPE.
    plain, _ = ROPE_INIT_FUNCTIONS["dynamic"](theirs, "cpu", seq_len=M)
    assert not torch.allclose(inv_freq, plain)


@pytest.mark.parametrize("name", ["none-64", "yarn-gpt-oss-20b", "llama3-odd"])
def test_rotation_equals_transformers(name):
    """cos/sin tables and the rotation itself, at arbitrary (offset) positions, against transformers'
    rotary module and apply_rotary_pos_emb (half-split pairs, attention factor on cos and sin)."""
    scaling, kw = CASES[name]
    ours, theirs = configs(scaling=scaling, **kw)
    positions = torch.stack([torch.arange(5, 25), torch.arange(1000, 1020)])  # (B=2, T=20)
    q, k = torch.randn(2, 4, 20, kw["head_dim"]), torch.randn(2, 2, 20, kw["head_dim"])

    inv_freq, factor = rope_frequencies(ours)
    cos, sin = rope_cos_sin(inv_freq, factor, positions, torch.float32)  # (B, 1, T, D)
    want_cos, want_sin = LlamaRotaryEmbedding(theirs)(q, positions)  # (B, T, D)
    torch.testing.assert_close(cos[:, 0], want_cos, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin[:, 0], want_sin, rtol=1e-5, atol=1e-5)

    want_q, want_k = apply_rotary_pos_emb(q, k, want_cos, want_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin), want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apply_rope(k, cos, sin), want_k, rtol=1e-5, atol=1e-5)


def test_scores_depend_only_on_distance():
    """Why RoPE: rotate q at m and k at n; q.k depends on m - n alone, so shifting both positions
    leaves every attention score unchanged."""
    ours, _ = configs(head_dim=32, theta=10000.0, max_pos=256, scaling="none")
    inv_freq, factor = rope_frequencies(ours)
    q, k = torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32)

    def scores(offset: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(inv_freq, factor, torch.arange(8)[None] + offset, torch.float32)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)  # (1, 1, 8, 8)

    torch.testing.assert_close(scores(0), scores(117), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(scores(0), q @ k.transpose(-1, -2), atol=1e-2)  # the rotation did act
