"""config.json <-> ModelConfig, through the family's CONFIG table; the values that need thought
(rotary scaling, sliding windows, options tegaki refuses) are written out here."""

from __future__ import annotations

import math
from typing import Any

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.hf.tables import FAMILIES, Family, family_of

_HF_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def config_from_hf(hf: dict) -> ModelConfig:
    fam = family_of(hf)
    hf = {**fam.hf_defaults, **{k: v for k, v in hf.items() if v is not None}}
    fields: dict[str, Any] = dict(fam.fixed)
    for hf_key, field in fam.config_table:
        if hf_key in hf:
            fields[field] = hf[hf_key]
    _refuse_unsupported_options(fam, hf)
    if fam.name != "gpt2":
        fields.update(_rope_from_hf(hf))
        layer_types = hf.get("layer_types")
        uses_window = fam.name == "gpt_oss" or hf.get("use_sliding_window", False)
        if layer_types and uses_window and "sliding_attention" in layer_types and hf.get("sliding_window"):
            fields["layer_types"] = [_HF_LAYER_TYPES[t] for t in layer_types]
            fields["sliding_window"] = hf["sliding_window"]
        else:
            fields["sliding_window"] = None
        if fields.get("sliding_window") and fields["sliding_window"] > fields.get("block_size", 0):
            fields["sliding_window"] = None  # a window wider than the context never binds
            fields.pop("layer_types", None)
    return ModelConfig(**fields)


def _refuse_unsupported_options(fam: Family, hf: dict) -> None:
    """config.json options that change the forward pass in a way tegaki does not: refuse, never
    load a model that would silently compute something else."""
    problems = []
    if fam.name == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            problems.append(f"activation_function={hf['activation_function']!r} (tegaki uses the tanh GELU)")
        if hf.get("scale_attn_by_inverse_layer_idx"):
            problems.append("scale_attn_by_inverse_layer_idx=true")
        if hf.get("scale_attn_weights") is False:
            problems.append("scale_attn_weights=false")
    elif fam.name in ("llama", "qwen3") and hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} (tegaki's SwiGLU uses silu)")
    if fam.name != "gpt2":
        rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            problems.append(f"partial_rotary_factor={partial} (tegaki rotates the whole head)")
    quant = hf.get("quantization_config")
    if quant and quant.get("quant_method") != "mxfp4":
        problems.append(f"quantization_config.quant_method={quant.get('quant_method')!r} (only mxfp4 is read)")
    if problems:
        raise TegakiError(f"{fam.architecture} with " + "; ".join(problems) + " is not supported")


def _rope_from_hf(hf: dict) -> dict[str, Any]:
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})  # the key most published config.json files use
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type", params.get("type", "default"))
    # transformers' "dynamic" NTK leaves the frequencies alone until a sequence outgrows
    # max_position_embeddings -- which is tegaki's block_size, the longest input it takes -- so
    # within the model's context it *is* plain RoPE. (tegaki's "ntk" is the static variant.)
    mapping = {"default": "none", "dynamic": "none", "linear": "linear", "yarn": "yarn", "llama3": "llama3"}
    if kind not in mapping:
        raise TegakiError(f"rope type {kind!r} is not supported; tegaki reads {', '.join(mapping)}")
    out["rope_scaling"] = mapping[kind]
    if out["rope_scaling"] == "none":
        return out
    original = params.get("original_max_position_embeddings")
    if kind == "yarn" and original is None:
        original = hf["max_position_embeddings"]
    if original is not None:
        out["rope_original_max_len"] = int(original)
    factor = params.get("factor")
    if factor is None and kind == "yarn":  # as transformers does: the context's growth
        factor = hf["max_position_embeddings"] / int(original)
    out["rope_factor"] = float(factor if factor is not None else 1.0)
    if kind == "yarn":
        out["rope_beta_fast"] = float(params.get("beta_fast") or 32.0)
        out["rope_beta_slow"] = float(params.get("beta_slow") or 1.0)
        out["rope_truncate"] = bool(params.get("truncate", True))
        attention_factor = params.get("attention_factor")
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if attention_factor is None and mscale and mscale_all_dim:  # DeepSeek's variant of the factor

            def m(scale: float, k: float) -> float:
                return 1.0 if scale <= 1 else 0.1 * k * math.log(scale) + 1.0

            attention_factor = m(out["rope_factor"], mscale) / m(out["rope_factor"], mscale_all_dim)
        out["rope_attention_factor"] = attention_factor
    if kind == "llama3":
        out["rope_low_freq_factor"] = float(params["low_freq_factor"])
        out["rope_high_freq_factor"] = float(params["high_freq_factor"])
    return out


def family_for_config(config: ModelConfig) -> Family:
    """Which transformers class can express this config, or a clear error naming the flag."""

    def refuse(flag: str, why: str) -> None:
        raise TegakiError(f"cannot export: {flag} ({why}) has no transformers equivalent")

    if config.attn_gate != "none":
        refuse(f"attn_gate={config.attn_gate!r}", "gated attention")
    if config.attn_scale is not None or config.attn_scale_learnable:
        refuse("attn_scale / attn_scale_learnable", "a custom attention scale")
    if not config.causal:
        refuse("causal=False", "bidirectional attention")
    if not config.final_norm:
        refuse("final_norm=False", "no final norm")
    if config.pos_embedding == "learned":
        if config.norm != "layernorm" or config.mlp != "gelu" or config.n_kv_head != config.n_head:
            refuse("pos_embedding='learned'", "learned positions exist only in GPT-2, with LayerNorm, GELU and MHA")
        if not (config.qkv_bias and config.attn_out_bias and config.mlp_bias and config.bias):
            refuse("bias=False", "GPT-2 always has biases")
        for flag in ("qk_norm", "attn_sinks"):
            if getattr(config, flag):
                refuse(f"{flag}=True with pos_embedding='learned'", "GPT-2 has no such layer")
        if config.sliding_window is not None:
            refuse("sliding_window with pos_embedding='learned'", "GPT-2 attends to the whole context")
        if config.head_dim * config.n_head != config.n_embd:
            refuse(f"head_dim={config.head_dim} with pos_embedding='learned'", "GPT-2 heads split n_embd")
        return FAMILIES["gpt2"]
    if config.pos_embedding != "rope":
        refuse(f"pos_embedding={config.pos_embedding!r}", "no positions")
    if config.norm != "rmsnorm":
        refuse("norm='layernorm' with rotary positions", "Llama-family models use RMSNorm")
    if config.qkv_bias != config.attn_out_bias:
        refuse("qkv_bias != attn_out_bias", "transformers has one attention_bias switch")
    if config.mlp == "moe":
        if config.moe_expert != "gpt-oss" or not config.attn_sinks or not config.moe_softmax_after_topk:
            refuse(
                "mlp='moe' without GPT-OSS experts, sinks and softmax after top-k",
                "only GPT-OSS is supported among MoE models",
            )
        if not (config.moe_router_bias and config.mlp_bias):
            refuse("moe_router_bias/mlp_bias False", "GPT-OSS experts and router have biases")
        if config.qk_norm:
            refuse("qk_norm with MoE", "GPT-OSS has no QK-norm")
        return FAMILIES["gpt_oss"]
    if config.attn_sinks:
        refuse("attn_sinks without MoE", "only GPT-OSS has sinks")
    if config.mlp != "swiglu":
        refuse(f"mlp={config.mlp!r} with rotary positions", "Llama and Qwen3 use SwiGLU")
    if config.qk_norm:
        if config.mlp_bias:
            refuse("mlp_bias with qk_norm", "Qwen3 has no MLP bias")
        return FAMILIES["qwen3"]
    if config.sliding_window is not None:
        refuse("sliding_window", "Llama has no sliding window")
    return FAMILIES["llama"]


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    fam = family_for_config(config)
    hf: dict[str, Any] = {"architectures": [fam.architecture], "model_type": fam.model_type}
    for hf_key, field in fam.config_table:
        hf[hf_key] = getattr(config, field)  # derived fields are filled: never null in config.json
    if fam.name == "gpt2":
        hf.update(
            activation_function="gelu_new",
            n_ctx=config.block_size,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            scale_attn_weights=True,
        )
        return hf
    hf["hidden_act"] = "silu"
    hf["rope_parameters"] = _rope_to_hf(config)
    hf["rope_theta"] = config.rope_theta
    if config.rope_scaling != "none":
        hf["rope_scaling"] = dict(hf["rope_parameters"])
    layer_types = ["sliding_attention" if config.window(i) else "full_attention" for i in range(config.n_layer)]
    if fam.name == "gpt_oss":
        hf["layer_types"] = layer_types
        hf["sliding_window"] = config.sliding_window or config.block_size
    if fam.name == "qwen3":
        windowed = "sliding_attention" in layer_types
        hf["use_sliding_window"] = windowed
        hf["sliding_window"] = config.sliding_window if windowed else None
        hf["layer_types"] = layer_types
        hf["max_window_layers"] = config.n_layer  # unused when layer_types is given
    return hf


def _rope_to_hf(config: ModelConfig) -> dict[str, Any]:
    kind = {"none": "default", "linear": "linear", "ntk": "dynamic", "yarn": "yarn", "llama3": "llama3"}[
        config.rope_scaling
    ]
    if kind == "dynamic":
        raise TegakiError("cannot export: rope_scaling='ntk' (static NTK) differs from transformers' dynamic NTK")
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": config.rope_theta}
    if kind == "default":
        return out
    out["factor"] = config.rope_factor
    if config.rope_original_max_len is not None:
        out["original_max_position_embeddings"] = config.rope_original_max_len
    if kind == "yarn":
        out.update(beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow, truncate=config.rope_truncate)
        if config.rope_attention_factor is not None:
            out["attention_factor"] = config.rope_attention_factor
    if kind == "llama3":
        out.update(low_freq_factor=config.rope_low_freq_factor, high_freq_factor=config.rope_high_freq_factor)
    return out
