"""Checkpoints in transformers' format, both ways, proven against transformers itself.

Each family is a tiny random transformers model, every parameter moved off its initial value,
written by `save_pretrained` and read back by `tegaki.from_pretrained`: the logits must agree (fp32,
eager attention) through both of tegaki's attention paths. Export goes the other way and is read by
`AutoModelForCausalLM`. Bad input must give one clear TegakiError, never a traceback.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import tegaki  # noqa: E402
import tegaki.cli  # noqa: E402
from tegaki import GPT, ModelConfig, export_hf, from_pretrained  # noqa: E402
from tegaki.errors import TegakiError  # noqa: E402
from tegaki.load import tokenizer_for  # noqa: E402
from tegaki.mxfp4 import dequantize_mxfp4, quantize_mxfp4  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
T = 24  # longer than every sliding window and every rope "original" context below


def token_ids(t: int = T) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, t))


@torch.no_grad()
def assert_same_logits(model: GPT, want: torch.Tensor, ids: torch.Tensor, tol: float) -> None:
    """tegaki's logits equal `want` through every attention path (and both MoE paths)."""
    assert want.std() > 0.05, "reference logits are nearly constant: the test would prove little"
    moe_impls = ("loop", "dense") if model.config.mlp == "moe" else ("loop",)
    for attn_impl in ("sdpa", "manual"):
        for moe_impl in moe_impls:
            model.config.attn_impl, model.config.moe_impl = attn_impl, moe_impl
            err = (model(ids) - want).abs().max().item()
            assert err <= tol, f"attn_impl={attn_impl} moe_impl={moe_impl}: max abs diff {err:.2e} > {tol}"
    model.config.attn_impl, model.config.moe_impl = "sdpa", "loop"


@torch.no_grad()
def hf_logits(hf_model, ids: torch.Tensor) -> torch.Tensor:
    return hf_model(ids).logits


def load_with_transformers(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


# -------------------------------------------------------------------------------------------------
# GPT-2
# -------------------------------------------------------------------------------------------------


def gpt2_model(**overrides):
    cfg = dict(vocab_size=VOCAB, n_positions=40, n_layer=2, n_head=4, n_embd=32) | overrides
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg, attn_implementation="eager")).eval()


GPT2_CONFIGS = {
    "small": dict(),
    "untied-odd-sizes": dict(
        n_layer=3, n_head=3, n_embd=24, n_inner=40, layer_norm_epsilon=1e-3, tie_word_embeddings=False
    ),
}


@pytest.mark.parametrize("name", GPT2_CONFIGS)
def test_gpt2_safetensors_logits_match(name, perturb, tmp_path):
    hf = perturb(gpt2_model(**GPT2_CONFIGS[name]))
    hf.save_pretrained(tmp_path)
    ids = token_ids()
    model = from_pretrained(tmp_path)
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    assert_same_logits(model, hf_logits(hf, ids), ids, tol=1e-5)


def test_gpt2_pytorch_bin(perturb, tmp_path):
    # transformers 5 always writes safetensors (safe_serialization is gone), so write the old
    # pickle format the way older versions did: torch.save of the state dict.
    hf = perturb(gpt2_model())
    hf.save_pretrained(tmp_path)
    torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    ids = token_ids()
    assert_same_logits(from_pretrained(tmp_path), hf_logits(hf, ids), ids, tol=1e-5)


def test_gpt2_sharded_safetensors(perturb, tmp_path):
    hf = perturb(gpt2_model())
    hf.save_pretrained(tmp_path, max_shard_size="30KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint should really be sharded"
    ids = token_ids()
    assert_same_logits(from_pretrained(tmp_path), hf_logits(hf, ids), ids, tol=1e-5)


def test_gpt2_hub_keys_and_old_attention_buffers(perturb, tmp_path):
    """The hub's gpt2 checkpoint: no "transformer." prefix, no lm_head (tied), and the causal-mask
    buffers `.attn.bias` / `.attn.masked_bias` that old transformers versions saved."""
    hf = perturb(gpt2_model())
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hub_state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    assert not any(k.startswith("transformer.") for k in hub_state)
    for i in range(hf.config.n_layer):
        hub_state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(40, 40)).view(1, 1, 40, 40)
        hub_state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub_state, tmp_path / "model.safetensors")
    ids = token_ids()
    assert_same_logits(from_pretrained(tmp_path), hf_logits(hf, ids), ids, tol=1e-5)


def test_bfloat16_checkpoint_keeps_or_changes_its_dtype(perturb, tmp_path):
    """Hub checkpoints are mostly bfloat16: loaded as they are, or converted with dtype=."""
    hf = perturb(gpt2_model()).to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["transformer.wte.weight"].dtype == torch.bfloat16
    as_stored = from_pretrained(tmp_path)
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}
    ids = token_ids()
    with torch.no_grad():
        as_stored(ids)  # runs in bfloat16 end to end
    as_float = from_pretrained(tmp_path, dtype=torch.float32)
    assert_same_logits(as_float, hf_logits(hf.float(), ids), ids, tol=1e-5)


def test_wrong_weights_listed_in_one_error(tmp_path):
    gpt2_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["transformer.h.1.mlp.c_fc.bias"]  # missing
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)  # unexpected
    state["transformer.ln_f.weight"] = torch.ones(31)  # mis-shaped
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(TegakiError) as err:
        from_pretrained(tmp_path)
    message = str(err.value)
    for expected in (
        "missing",
        "h.1.mlp.c_fc.bias",
        "unexpected",
        "attn.rotary.weight",
        "wrong shape",
        "ln_f.weight: got (31,), expected (32,)",
    ):
        assert expected in message


def test_gpt2_options_tegaki_cannot_compute_are_refused(tmp_path):
    gpt2_model(scale_attn_by_inverse_layer_idx=True).save_pretrained(tmp_path)
    with pytest.raises(TegakiError, match="scale_attn_by_inverse_layer_idx"):
        from_pretrained(tmp_path)


# -------------------------------------------------------------------------------------------------
# Llama, Qwen3, GPT-OSS: import, then export of the same model back to transformers
# -------------------------------------------------------------------------------------------------

_SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)
_ORIG = dict(original_max_position_embeddings=16)  # < T: the scaled frequencies really matter

FAMILY_CASES = {
    "llama-gqa-untied": (transformers.LlamaConfig, dict(), 1e-5),
    "llama-mqa-tied-biases": (
        transformers.LlamaConfig,
        dict(num_key_value_heads=1, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
        1e-5,
    ),
    "llama-rope-linear": (transformers.LlamaConfig, dict(rope_parameters=dict(rope_type="linear", factor=2.0)), 1e-5),
    # transformers' dynamic NTK is plain RoPE until a sequence outgrows max_position_embeddings.
    "llama-rope-dynamic": (transformers.LlamaConfig, dict(rope_parameters=dict(rope_type="dynamic", factor=4.0)), 1e-5),
    "llama-rope-yarn": (
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="yarn", factor=4.0, **_ORIG)),
        1e-5,
    ),
    "llama-rope-llama3": (
        transformers.LlamaConfig,
        dict(rope_parameters=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, **_ORIG)),
        1e-5,
    ),
    "qwen3-tied": (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=True), 1e-5),
    "qwen3-untied-sliding": (
        transformers.Qwen3Config,
        dict(
            head_dim=16,
            tie_word_embeddings=False,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
            rms_norm_eps=1e-5,
        ),
        1e-5,
    ),
    "gpt-oss-yarn-window-sinks-moe": (
        transformers.GptOssConfig,
        dict(
            head_dim=16,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            rope_parameters=dict(
                rope_type="yarn",
                factor=4.0,
                beta_fast=32.0,
                beta_slow=1.0,
                truncate=False,
                rope_theta=150000.0,
                **_ORIG,
            ),
        ),
        1e-4,
    ),
    "gpt-oss-top1-untruncated-off": (
        transformers.GptOssConfig,
        dict(
            num_hidden_layers=3,
            head_dim=8,
            intermediate_size=24,
            num_local_experts=3,
            num_experts_per_tok=1,
            sliding_window=4,
            swiglu_limit=0.5,
        ),
        1e-4,
    ),
}


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_family_import_and_export_match_transformers(name, perturb, tmp_path):
    config_class, overrides, tol = FAMILY_CASES[name]
    hf_config = config_class(**(_SMALL | overrides), attn_implementation="eager")
    hf = perturb(transformers.AutoModelForCausalLM.from_config(hf_config))
    hf.save_pretrained(tmp_path / "hf")
    ids = token_ids()
    want = hf_logits(hf, ids)

    model = from_pretrained(tmp_path / "hf")
    assert_same_logits(model, want, ids, tol)

    export_hf(model, tmp_path / "exported")
    again = load_with_transformers(tmp_path / "exported")
    assert type(again) is type(hf)
    err = (hf_logits(again, ids) - want).abs().max().item()
    assert err <= tol, f"export -> transformers: max abs diff {err:.2e}"


def imported_config(name: str, tmp_path) -> ModelConfig:
    config_class, overrides, _ = FAMILY_CASES[name]
    config_class(**(_SMALL | overrides)).save_pretrained(tmp_path / name)
    return from_pretrained(tmp_path / name, device="meta").config  # config.json only


def test_import_reads_the_flags_of_each_family(tmp_path):
    """The parity tests above would pass vacuously if a flag were read but ignored by both sides;
    check the config tegaki builds really uses the family's features."""
    c = imported_config("gpt-oss-yarn-window-sinks-moe", tmp_path)
    assert (c.mlp, c.moe_expert, c.n_experts, c.n_experts_per_tok) == ("moe", "gpt-oss", 4, 2)
    assert c.attn_sinks and c.moe_router_bias and c.qkv_bias and not c.tie_embeddings
    assert (c.rope_scaling, c.rope_truncate, c.rope_original_max_len) == ("yarn", False, 16)
    assert c.sliding_window == 8 and c.layer_types == ["sliding", "full"]
    c = imported_config("qwen3-untied-sliding", tmp_path)
    assert c.qk_norm and c.head_dim == 16 and c.n_kv_head == 2 and c.norm_eps == 1e-5
    assert c.sliding_window == 8 and c.layer_types == ["full", "sliding"] and c.qkv_bias
    c = imported_config("llama-mqa-tied-biases", tmp_path)
    assert c.n_kv_head == 1 and c.tie_embeddings and c.qkv_bias and c.mlp_bias
    c = imported_config("llama-rope-llama3", tmp_path)
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len, c.rope_high_freq_factor) == ("llama3", 8.0, 16, 4.0)


# The config.json files of the real checkpoints on the hub (abridged to the keys that matter).
HUB_CONFIGS = {
    "gpt-oss-20b": {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "attention_bias": True,
        "experts_per_token": 4,
        "num_experts_per_tok": 4,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2880,
        "initial_context_length": 4096,
        "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072,
        "num_attention_heads": 64,
        "num_hidden_layers": 24,
        "num_key_value_heads": 8,
        "num_local_experts": 32,
        "quantization_config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rope_theta": 150000,
        "router_aux_loss_coef": 0.9,
        "sliding_window": 128,
        "swiglu_limit": 7.0,
        "tie_word_embeddings": False,
        "vocab_size": 201088,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "head_dim": 64,
        "hidden_act": "silu",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "num_attention_heads": 32,
        "num_hidden_layers": 16,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": True,
        "vocab_size": 128256,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "max_position_embeddings": 40960,
        "max_window_layers": 28,
        "num_attention_heads": 16,
        "num_hidden_layers": 28,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    },
}


@pytest.mark.parametrize("preset", HUB_CONFIGS)
def test_hub_config_json_reads_as_the_preset(preset, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HUB_CONFIGS[preset]))
    model = from_pretrained(tmp_path, device="meta")  # shapes only: no weights needed
    assert architecture(model.config) == architecture(ModelConfig.preset(preset))


def architecture(config: ModelConfig) -> dict:
    """The config with every None-means-default field resolved, so equal models compare equal."""
    d = config.to_dict()
    d.update(
        n_kv_head=config.n_kv_head,
        head_dim=config.head_dim,
        intermediate_size=config.intermediate_size,
        **{f"{w}_bias": getattr(config, f"{w}_bias") for w in ("qkv", "attn_out", "mlp")},
    )
    return d


# -------------------------------------------------------------------------------------------------
# Export of models born in tegaki
# -------------------------------------------------------------------------------------------------

_SHRINK = dict(vocab_size=VOCAB, n_layer=2, n_embd=32, block_size=64)
EXPORT_CASES = {
    "gpt2-tied": ModelConfig(**_SHRINK, n_head=4),
    "gpt2-untied": ModelConfig(**_SHRINK, n_head=2, tie_embeddings=False, intermediate_size=48),
    "tiny-llama": ModelConfig.preset("tiny-llama").replace(**_SHRINK, head_dim=8),
    "tiny-llama-llama3": ModelConfig.preset("tiny-llama").replace(
        **_SHRINK, rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=16
    ),
    "tiny-llama-linear": ModelConfig.preset("tiny-llama").replace(**_SHRINK, rope_scaling="linear", rope_factor=3.0),
    "tiny-qwen3": ModelConfig.preset("tiny-qwen3").replace(**_SHRINK, head_dim=16),
    "tiny-gpt-oss": ModelConfig.preset("tiny-gpt-oss").replace(
        **_SHRINK, head_dim=16, intermediate_size=32, sliding_window=8, layer_types=["sliding", "full"]
    ),
    "tiny-gpt-oss-yarn": ModelConfig.preset("tiny-gpt-oss-yarn").replace(
        **_SHRINK,
        head_dim=16,
        intermediate_size=32,
        sliding_window=8,
        layer_types=["sliding", "full"],
        rope_original_max_len=16,
    ),
}


@pytest.mark.parametrize("name", EXPORT_CASES)
def test_export_loads_in_transformers_with_same_logits(name, perturb, tmp_path):
    model = perturb(GPT(EXPORT_CASES[name]))
    ids = token_ids()
    with torch.no_grad():
        want = model(ids)
    export_hf(model, tmp_path)
    hf = load_with_transformers(tmp_path)
    tol = 1e-4 if model.config.mlp == "moe" else 1e-5
    err = (hf_logits(hf, ids) - want).abs().max().item()
    assert err <= tol, f"max abs diff {err:.2e}"


_LLAMA_SMALL = ModelConfig.preset("tiny-llama").replace(**_SHRINK)
REFUSED_EXPORTS = {
    "attn_gate": _LLAMA_SMALL.replace(attn_gate="headwise"),
    "attn_scale": _LLAMA_SMALL.replace(attn_scale=0.3),
    "attn_scale_learnable": _LLAMA_SMALL.replace(attn_scale_learnable=True),
    "causal=False": _LLAMA_SMALL.replace(causal=False),
    "final_norm=False": _LLAMA_SMALL.replace(final_norm=False),
    "rope_scaling='ntk'": _LLAMA_SMALL.replace(rope_scaling="ntk", rope_factor=2.0),
    "pos_embedding='none'": _LLAMA_SMALL.replace(pos_embedding="none"),
    "norm='layernorm'": _LLAMA_SMALL.replace(norm="layernorm"),
    "attn_sinks": _LLAMA_SMALL.replace(attn_sinks=True),
    "sliding_window": _LLAMA_SMALL.replace(sliding_window=8),
    "qkv_bias": _LLAMA_SMALL.replace(qkv_bias=True),
    "mlp='gelu'": _LLAMA_SMALL.replace(mlp="gelu"),
    "mlp='moe'": _LLAMA_SMALL.replace(mlp="moe", n_experts=4),
    "qk_norm=True with pos_embedding='learned'": ModelConfig(**_SHRINK, n_head=4, qk_norm=True),
    "attn_sinks=True with pos_embedding='learned'": ModelConfig(**_SHRINK, n_head=4, attn_sinks=True),
    "head_dim=16 with pos_embedding='learned'": ModelConfig(**_SHRINK, n_head=4, head_dim=16),
    "bias=False": ModelConfig(**_SHRINK, n_head=4, bias=False),
}


@pytest.mark.parametrize("flag", REFUSED_EXPORTS)
def test_export_refuses_what_transformers_cannot_express(flag, tmp_path):
    with pytest.raises(TegakiError, match="cannot export") as err:
        export_hf(GPT(REFUSED_EXPORTS[flag]), tmp_path)
    assert flag in str(err.value)
    assert not (tmp_path / "model.safetensors").exists()


# -------------------------------------------------------------------------------------------------
# MXFP4 (GPT-OSS hub checkpoints)
# -------------------------------------------------------------------------------------------------


def test_mxfp4_dequantize_matches_transformers_layout():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks = torch.randint(0, 256, (3, 40, 2, 16), dtype=torch.uint8)  # E=3, 40 rows, 2 groups of 32
    scales = torch.randint(118, 136, (3, 40, 2), dtype=torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.bfloat16)
    assert ours.shape == (3, 64, 40)  # (E, in, out): tegaki's layout
    assert torch.equal(ours, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))


def test_mxfp4_quantize_inverts_dequantize():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    # Weights already on the MXFP4 grid: each 32-wide group one power of two, values from the grid,
    # the largest magnitude 6 so that scale is the one quantize picks.
    values = grid[torch.randint(0, 8, (2, 6, 3, 32))] * (torch.randint(0, 2, (2, 6, 3, 32)) * 2 - 1)
    values[..., 0] = 6.0
    exponents = torch.randint(-8, 3, (2, 6, 3, 1)).float()
    rows = values * torch.exp2(exponents)  # (E, R=6, G=3, 32)
    weights = rows.flatten(-2).transpose(1, 2)  # (E, in=96, out=6)
    blocks, scales = quantize_mxfp4(weights)
    assert blocks.shape == (2, 6, 3, 16) and scales.shape == (2, 6, 3)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), weights)
    # Off-grid weights come back as the nearest grid point. The widest gap of the grid is 2 (4 to 6)
    # and the scale is below peak/3 (peak/6 rounded up to a power of two): error <= peak/3.
    noisy = torch.randn(2, 64, 5)
    back = dequantize_mxfp4(*quantize_mxfp4(noisy), torch.float32)
    group_peak = noisy.transpose(1, 2).reshape(2, 5, 2, 32).abs().amax(-1)  # (E, out, G)
    bound = (group_peak / 3).repeat_interleave(32, dim=-1).transpose(1, 2)  # (E, in, out)
    assert ((back - noisy).abs() <= bound).all()
    assert ((back - noisy).abs() > 0).any()  # and it really is lossy: the test compares something


def test_gpt_oss_mxfp4_checkpoint_loads(perturb, tmp_path):
    """A hub-style GPT-OSS folder: experts as *_blocks/*_scales + quantization_config."""
    hf_config = transformers.GptOssConfig(
        **(
            _SMALL
            | dict(
                hidden_size=64,
                head_dim=16,
                intermediate_size=32,
                num_local_experts=4,
                num_experts_per_tok=2,
                sliding_window=8,
            )
        ),
        attn_implementation="eager",
    )
    hf = perturb(transformers.AutoModelForCausalLM.from_config(hf_config))
    with torch.no_grad():  # the reference: the same model with its experts rounded to MXFP4
        for layer in hf.model.layers:
            for proj in ("gate_up_proj", "down_proj"):
                w = getattr(layer.mlp.experts, proj)
                w.copy_(dequantize_mxfp4(*quantize_mxfp4(w), torch.float32))
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        state[key + "_blocks"], state[key + "_scales"] = quantize_mxfp4(state.pop(key))
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    ids = token_ids()
    assert_same_logits(from_pretrained(tmp_path), hf_logits(hf, ids), ids, tol=1e-4)


# -------------------------------------------------------------------------------------------------
# Bad input: one clear message
# -------------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(TegakiError, match="no such folder"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TegakiError, match="neither a transformers folder"):
        from_pretrained(tmp_path / "empty")


def test_a_relative_path_that_looks_like_a_hub_id_is_not_downloaded(tmp_path, monkeypatch):
    """`runs/demo` has the shape of a hub id; when `runs/` is a local folder the user meant a path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(TegakiError, match="runs/demo: no such folder"):
        from_pretrained("runs/demo")
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(TegakiError, match="is a file"):
        from_pretrained("weights.txt")


def test_a_truncated_safetensors_file_is_reported_by_name(tmp_path):
    gpt2_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(TegakiError, match="model.safetensors: could not read weights"):
        from_pretrained(tmp_path)


def test_a_mis_shaped_fused_tensor_is_reported_once_in_the_file_s_shape(tmp_path):
    gpt2_model().save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 10)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(TegakiError) as err:
        from_pretrained(tmp_path)
    assert "wrong shape (1): transformer.h.0.attn.c_attn.weight: got (32, 10), expected (32, 96)" in str(err.value)


def test_folder_without_weights(tmp_path):
    gpt2_model().config.save_pretrained(tmp_path)
    with pytest.raises(TegakiError, match="no weights found"):
        from_pretrained(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(TegakiError) as err:
        from_pretrained(tmp_path)
    for name in ("'bert'", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen3ForCausalLM", "GptOssForCausalLM"):
        assert name in str(err.value)


def test_inconsistent_config_json_is_rejected(tmp_path):
    config = transformers.LlamaConfig(**_SMALL).to_dict()
    config["num_key_value_heads"] = 3  # does not divide 4 query heads
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TegakiError, match="n_kv_head=3 must divide n_head=4"):
        from_pretrained(tmp_path)


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)


def test_offline_hub_id_gives_a_clear_message(offline):
    with pytest.raises(TegakiError, match="could not download 'someone/some-model'.*offline"):
        from_pretrained("someone/some-model")
    with pytest.raises(TegakiError, match="neither a folder nor a hub id"):
        from_pretrained("not a valid id!")


def test_cli_export_errors_are_messages_not_tracebacks(offline, tmp_path, capsys):
    assert tegaki.cli.main(["export", "someone/some-model", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not download" in err and "Traceback" not in err
    assert tegaki.cli.main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_cli_export_writes_a_transformers_folder(perturb, tmp_path):
    hf = perturb(gpt2_model())
    hf.save_pretrained(tmp_path / "src")
    assert tegaki.cli.main(["export", str(tmp_path / "src"), str(tmp_path / "out")]) == 0
    ids = token_ids()
    err = (hf_logits(load_with_transformers(tmp_path / "out"), ids) - hf_logits(hf, ids)).abs().max()
    assert err <= 1e-5


def test_cli_exports_a_training_run_with_its_tokenizer(perturb, tmp_path):
    """The path a user takes: a tegaki run folder (as `tegaki train` writes it) -> `tegaki export`
    -> transformers, same logits; the run's tokenizer goes along as tokenizer.json."""
    from tegaki.checkpoint import save_checkpoint

    model = perturb(GPT(EXPORT_CASES["tiny-llama"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model_config": model.config.to_dict(), "tokenizer": "gpt2"}))
    save_checkpoint(run, 1, model.state_dict(), {}, {}, model.config, keep=1)
    assert tegaki.cli.main(["export", str(run), str(tmp_path / "out")]) == 0
    ids = token_ids()
    with torch.no_grad():
        want = model(ids)
    err = (hf_logits(load_with_transformers(tmp_path / "out"), ids) - want).abs().max()
    assert err <= 1e-5
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_meta_device_reads_config_only(tmp_path):
    """`tegaki params some/folder` needs shapes, not 40 GB of weights: no weight file required."""
    transformers.LlamaConfig(**_SMALL).save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, device="meta")
    assert model.device.type == "meta"
    assert model.num_parameters() == transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).num_parameters()


# -------------------------------------------------------------------------------------------------
# Run folders and tokenizers
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_train_module(monkeypatch):
    """Stand-ins for the run loaders: from_pretrained/tokenizer_for must hand run folders to them
    (the run folder itself is tested with the training code)."""
    import tegaki.load

    calls = []
    monkeypatch.setattr(
        tegaki.load,
        "load_run_model",
        lambda path, device="cpu", dtype=None, info=None: calls.append(("model", path, device)) or "model",
    )
    monkeypatch.setattr(
        tegaki.load,
        "load_run_tokenizer",
        lambda path, info=None: calls.append(("tokenizer", path)) or "tokenizer",
    )
    return calls


def test_run_folders_go_to_the_run_loaders(fake_train_module, tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"model_config": {}, "tokenizer": "gpt2"}))
    assert from_pretrained(tmp_path, device="meta") == "model"
    assert tokenizer_for(tmp_path) == "tokenizer"
    assert fake_train_module == [("model", tmp_path, "meta"), ("tokenizer", tmp_path)]


@pytest.mark.parametrize("name", ["gpt2", "openai-community/gpt2"])
def test_tokenizer_for_gpt2_ids_needs_no_network(name, offline):
    tok = tokenizer_for(name)
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]


def test_tokenizer_for_a_saved_tegaki_tokenizer(tmp_path):
    tokenizer_for("gpt2").save(tmp_path)
    assert tokenizer_for(tmp_path).encode("Hello, I am") == [15496, 11, 314, 716]


def test_tokenizer_for_a_transformers_gpt2_folder(tmp_path):
    """vocab.json + merges.txt are GPT-2's encoder.json + vocab.bpe under transformers' names."""
    from tegaki.tokenizer import gpt2_files_dir

    shutil.copy(gpt2_files_dir() / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(gpt2_files_dir() / "vocab.bpe", tmp_path / "merges.txt")
    assert tokenizer_for(tmp_path).encode("Hello, I am") == [15496, 11, 314, 716]


def test_tokenizer_for_a_tokenizer_json_folder(tmp_path):
    from tegaki.tokenizer import export_hf_tokenizer, load

    export_hf_tokenizer(load("gpt2"), tmp_path)  # tokenizer.json + tokenizer_config.json only
    assert tokenizer_for(tmp_path).encode("Hello, I am") == [15496, 11, 314, 716]


def test_tokenizer_for_an_unreadable_transformers_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TegakiError, match="tokenizer.json"):
        tokenizer_for(tmp_path)


def test_tokenizer_for_a_gpt2_checkpoint_without_tokenizer_files(tmp_path):
    gpt2_model(vocab_size=50257).config.save_pretrained(tmp_path)  # config.json only
    assert tokenizer_for(tmp_path).encode("Hello, I am") == [15496, 11, 314, 716]


def test_tokenizer_for_a_folder_without_tokenizer(tmp_path):
    with pytest.raises(TegakiError, match="no tokenizer found"):
        tokenizer_for(tmp_path)


def test_subpackages_are_attributes_of_the_package():
    """`import tegaki` then `tegaki.tokenizer.load(...)`, as the README shows, in a fresh process."""
    import subprocess

    code = "import tegaki; print(tegaki.tokenizer.load('gpt2').encode('Hello, I am'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[15496, 11, 314, 716]"


def test_a_config_json_that_disagrees_with_itself_is_refused(tmp_path):
    gpt2_model().save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf_config["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    with pytest.raises(TegakiError, match="disagrees with itself"):
        from_pretrained(tmp_path)


def test_exported_weights_are_readable_like_the_files_beside_them(tmp_path):
    import os
    import stat

    out = export_hf(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, block_size=8)), tmp_path / "x")
    mode = stat.S_IMODE(os.stat(out / "model.safetensors").st_mode)
    assert mode == stat.S_IMODE(os.stat(out / "config.json").st_mode)


def test_llama_q_k_v_are_joined_on_import_and_split_again_on_export(tmp_path):
    """GQA sizes: q_proj has H*D rows, k_proj and v_proj K*D each; tegaki's qkv holds them in
    that order, and export writes the three tensors back bit for bit."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL, attention_bias=True))
    hf.save_pretrained(tmp_path / "in")
    src = load_file(str(tmp_path / "in" / "model.safetensors"))
    model = from_pretrained(tmp_path / "in")
    qkv = model.blocks[1].attn.qkv.weight
    q, k, v = (src[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert k.shape[0] < q.shape[0]  # grouped-query attention: fewer key/value rows
    assert torch.equal(qkv, torch.cat([q, k, v]))
    export_hf(model, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(out) == set(src)
    for name, tensor in src.items():
        assert torch.equal(out[name], tensor), name
    assert torch.equal(
        model.blocks[0].attn.qkv.bias, torch.cat([src[f"model.layers.0.self_attn.{p}_proj.bias"] for p in "qkv"])
    )


def test_export_writes_the_tokenizers_end_of_text_id(tmp_path):
    """A run with its own 4,096-token tokenizer ends texts with id 4095, not GPT-2's 50256:
    transformers must stop generating there, and must not be told of an id outside the vocabulary."""
    from tegaki.tokenizer import train_bpe

    tok = train_bpe("the cat sat on the mat. " * 50, 300, name="small")
    model = GPT(ModelConfig.preset("tiny").replace(vocab_size=320, n_layer=1))
    export_hf(model, tmp_path / "own", tokenizer=tok)
    config = json.loads((tmp_path / "own" / "config.json").read_text())
    generation = json.loads((tmp_path / "own" / "generation_config.json").read_text())
    assert tok.eot_id is not None and config["eos_token_id"] == config["bos_token_id"] == tok.eot_id
    assert generation["eos_token_id"] == tok.eot_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "own")
    assert hf.generation_config.eos_token_id == tok.eot_id
    export_hf(model, tmp_path / "bare")  # no tokenizer, vocabulary too small for GPT-2's id
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["eos_token_id"] is None
    export_hf(GPT(ModelConfig.preset("tiny").replace(vocab_size=50257, n_layer=1)), tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2" / "config.json").read_text())["eos_token_id"] == 50256
