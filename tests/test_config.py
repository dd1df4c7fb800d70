"""ModelConfig: inconsistent flags fail when the config is built; the presets are what they claim."""

from __future__ import annotations

import pytest
import torch

from tegaki.config import PRESETS, ModelConfig
from tegaki.errors import TegakiError
from tegaki.hf import config_from_hf, config_to_hf
from tegaki.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")

_ROPE = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu")

INCONSISTENT = [
    (dict(n_embd=30, n_head=4), "n_head=4 does not divide n_embd=30"),
    (dict(n_head=12, n_kv_head=5), "n_kv_head=5 must divide n_head=12"),
    (dict(block_size=64, sliding_window=65), "sliding_window=65 is larger than the context block_size=64"),
    (dict(sliding_window=0), "sliding_window must be >= 1"),
    (dict(_ROPE, n_embd=36, n_head=4), "even head_dim"),
    (dict(rope_scaling="linear", rope_factor=2.0), "rope_scaling needs pos_embedding='rope'"),
    (dict(_ROPE, rope_scaling="yarn", rope_factor=4.0), "needs rope_original_max_len"),
    (dict(_ROPE, rope_scaling="linear", rope_factor=0.5), "rope_factor must be >= 1"),
    (dict(mlp="moe"), "needs n_experts >= 1"),
    (dict(mlp="moe", n_experts=4, n_experts_per_tok=5), "n_experts_per_tok=5 must be between 1 and n_experts=4"),
    (dict(n_layer=3, layer_types=["full", "full"]), "layer_types has 2 entries for n_layer=3"),
    (dict(n_layer=2, layer_types=["full", "sliding"]), "sliding_window is not set"),
    (dict(n_layer=2, sliding_window=8, layer_types=["full", "local"]), "'full' or 'sliding'"),
    (dict(norm="batchnorm"), "norm='batchnorm', expected one of"),
    (dict(attn_gate="channel"), "attn_gate='channel'"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
    (dict(n_layer=0), "n_layer must be positive"),
]


@pytest.mark.parametrize("flags, message", INCONSISTENT, ids=[m for _, m in INCONSISTENT])
def test_inconsistent_flags_are_rejected_at_build_time(flags, message):
    with pytest.raises(TegakiError) as err:
        ModelConfig(**flags)
    assert message in str(err.value)


def test_replace_validates_too():
    with pytest.raises(TegakiError, match="does not divide"):
        ModelConfig().replace(n_head=7)


def test_head_dim_may_differ_from_n_embd_over_n_head():
    config = ModelConfig(n_embd=32, n_head=6, head_dim=16, **_ROPE)  # 6 does not divide 32: fine with head_dim
    assert config.head_dim == 16
    attn = GPT(config.replace(vocab_size=10, n_layer=1)).blocks[0].attn
    assert attn.qkv.weight.shape == ((6 + 2 * 6) * 16, 32) and attn.o_proj.weight.shape == (32, 6 * 16)
    assert config.qkv_sizes == (6 * 16, 6 * 16, 6 * 16)


# -------------------------------------------------------------------------------------------------
# Presets
# -------------------------------------------------------------------------------------------------


def block_parameters(preset: str) -> int:
    """The architecture's budget: everything in the blocks (embeddings and LM head left out)."""
    with torch.device("meta"):
        model = GPT(ModelConfig.preset(preset))
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("blocks."))


@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("tiny-")])
def test_tiny_presets_share_tinys_budget(preset):
    ratio = block_parameters(preset) / block_parameters("tiny")
    assert 0.85 <= ratio <= 1.15, f"{preset}: {ratio:.2f} x tiny's block parameters"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_builds(preset):
    config = ModelConfig.preset(preset)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_parameters() > 0


def test_presets_have_their_families_features():
    c = ModelConfig.preset
    llama = c("tiny-llama")
    assert (llama.pos_embedding, llama.norm, llama.mlp, llama.n_kv_head < llama.n_head) == (
        "rope",
        "rmsnorm",
        "swiglu",
        True,
    )
    qwen3 = c("tiny-qwen3")
    assert qwen3.qk_norm and qwen3.tie_embeddings and qwen3.head_dim * qwen3.n_head != qwen3.n_embd
    oss = c("tiny-gpt-oss")
    assert oss.mlp == "moe" and oss.moe_expert == "gpt-oss" and oss.attn_sinks and oss.moe_router_bias
    assert oss.layer_types == ["sliding", "full"] * 2 and oss.sliding_window < oss.block_size
    yarn = c("tiny-gpt-oss-yarn")
    assert (yarn.rope_scaling, yarn.rope_truncate) == ("yarn", False)
    assert yarn.rope_original_max_len < yarn.block_size  # the scaling matters inside the context
    assert c("tiny-gated").attn_gate == "elementwise"
    real = c("gpt-oss-20b")
    assert (real.n_layer, real.n_experts, real.n_experts_per_tok, real.vocab_size) == (24, 32, 4, 201088)


@pytest.mark.parametrize(
    "preset",
    [
        "gpt2",
        "gpt2-medium",
        "tiny-llama",
        "tiny-qwen3",
        "tiny-gpt-oss",
        "tiny-gpt-oss-yarn",
        "llama-3.2-1b",
        "qwen3-0.6b",
        "gpt-oss-20b",
        "gpt-oss-120b",
    ],
)
def test_preset_survives_config_json_round_trip(preset):
    """config.json written by export and read back by import gives the same architecture: the two
    name tables agree. (Fields transformers has no key for, like dropout, keep their defaults.)"""
    config = ModelConfig.preset(preset)
    back = config_from_hf(config_to_hf(config))
    for name, value in config.to_dict().items():
        if name in ("qkv_bias", "attn_out_bias", "mlp_bias", "n_kv_head", "head_dim", "intermediate_size"):
            continue  # compared through their derived values below
        assert getattr(back, name) == value, name
    for which in ("qkv", "attn_out", "mlp"):
        assert getattr(back, f"{which}_bias") == getattr(config, f"{which}_bias"), which
    assert (back.n_kv_head, back.head_dim, back.intermediate_size) == (
        config.n_kv_head,
        config.head_dim,
        config.intermediate_size,
    )


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(TegakiError, match="Known presets: gpt2, gpt2-medium"):
        ModelConfig.preset("gpt5")


# -------------------------------------------------------------------------------------------------
# Conversions
# -------------------------------------------------------------------------------------------------


def test_overrides_parse_each_fields_type():
    config = ModelConfig.preset("tiny").with_overrides(
        [
            "n-layer=2",
            "qk_norm=true",
            "norm_eps=1e-6",
            "head_dim=none",
            "norm=rmsnorm",
            "sliding_window=16",
            "layer_types=full,sliding",
        ]
    )
    assert (config.n_layer, config.qk_norm, config.norm_eps, config.head_dim, config.norm) == (
        2,
        True,
        1e-6,
        48,
        "rmsnorm",
    )
    assert config.to_dict()["head_dim"] is None  # "none" means derived: n_embd // n_head
    assert config.layer_types == ["full", "sliding"]


def test_derived_fields_are_filled_once_and_follow_replace():
    """None fields become numbers in __post_init__; replace() derives them again from new sizes,
    while a value given explicitly is kept."""
    config = ModelConfig.preset("tiny")
    assert (config.n_kv_head, config.head_dim, config.intermediate_size, config.qkv_bias) == (4, 48, 768, True)
    wider = config.replace(n_embd=256)
    assert (wider.head_dim, wider.intermediate_size) == (64, 1024)
    fixed = config.replace(head_dim=32).replace(n_embd=256)
    assert fixed.head_dim == 32 and fixed.to_dict()["head_dim"] == 32
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert ModelConfig.from_dict(wider.to_dict()).head_dim == 64


GQA = dict(_ROPE, n_layer=2, n_head=8, n_kv_head=2, n_embd=128)  # key/value heads set, head_dim derived


@pytest.mark.parametrize("base", [{}, GQA], ids=["gpt2", "gqa"])
@pytest.mark.parametrize("change", [dict(n_head=4), dict(n_embd=384), dict(bias=False)], ids=str)
def test_dataclasses_replace_gives_the_config_built_fresh(base, change):
    """The standard idiom: fields derived from the sizes are derived again, those set stay set."""
    import dataclasses

    replaced = dataclasses.replace(ModelConfig(**base), **change)
    fresh = ModelConfig(**base | change)
    assert replaced == fresh and replaced.to_dict() == fresh.to_dict()
    assert replaced.n_kv_head == base.get("n_kv_head", replaced.n_head)  # GQA's 2 kept, GPT-2's follows n_head
    assert replaced.head_dim == replaced.n_embd // replaced.n_head


def test_dataclasses_replace_keeps_a_value_given_unless_it_is_the_derived_one_passed_back():
    import dataclasses

    config = ModelConfig(n_embd=256, n_head=4)  # head_dim derived: 64
    assert dataclasses.replace(config, n_embd=512, head_dim=32).head_dim == 32
    assert dataclasses.replace(config, n_embd=512).head_dim == 128
    assert config.replace(n_embd=512, head_dim=64).to_dict()["head_dim"] == 64  # config.replace: named, kept
    assert "_derived" not in config.to_dict() and "_derived" not in repr(config)
    with pytest.raises(TegakiError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({"_derived": {}})


def test_window_of_each_layer():
    oss = ModelConfig.preset("tiny-gpt-oss")
    assert [oss.window(i) for i in range(oss.n_layer)] == [64, None, 64, None]
    assert ModelConfig.preset("tiny").window(0) is None
    assert ModelConfig.preset("tiny").replace(sliding_window=16).window(3) == 16


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("n_layers=2", "ModelConfig field"),
        ("n_layer=two", "expected a value of type int"),
        ("qk_norm=maybe", "expected a value of type bool"),
        ("n_layer", "field=value"),
    ],
)
def test_bad_overrides_are_clear(assignment, message):
    with pytest.raises(TegakiError, match=message):
        ModelConfig().with_overrides([assignment])


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(TegakiError, match="unknown ModelConfig field.*n_heads"):
        ModelConfig.from_dict({"n_heads": 4})


def test_changing_depth_repeats_the_per_layer_pattern():
    cfg = ModelConfig.preset("tiny-gpt-oss").with_overrides(["n_layer=3"])
    assert cfg.layer_types == ["sliding", "full", "sliding"]
    deeper = ModelConfig.preset("tiny-gpt-oss").with_overrides(["n_layer=6"])
    assert deeper.layer_types == ["sliding", "full"] * 3


def test_an_absurd_depth_for_a_per_layer_pattern_is_refused_before_it_is_built():
    """GPT-OSS's sliding/full pattern repeats to the new depth: a billion layers would be a
    billion-entry list. It is refused at once, with the figure."""
    with pytest.raises(TegakiError, match=r"n_layer=1,000,000,000.*at most 100,000"):
        ModelConfig.preset("tiny-gpt-oss").with_overrides(["n_layer=1000000000"])
    assert ModelConfig.preset("tiny-gpt-oss").with_overrides(["n_layer=6"]).layer_types[-2:] == ["sliding", "full"]
