"""Checkpoints in transformers' format, both ways, as data.

A family (GPT-2, Llama, Qwen3, GPT-OSS) is two tables:
  * CONFIG: transformers' config.json key  <->  ModelConfig field
  * WEIGHTS: transformers' tensor name  <->  tegaki's parameter name(s), and how the tensor changes
The same tables drive `tegaki.load.from_pretrained` (import) and `tegaki.load.export_hf` (export);
there is no per-model loading code. This module only converts names, configs and tensors; reading
and writing folders is `load.py`'s job. transformers itself is never imported here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError

# -------------------------------------------------------------------------------------------------
# Weight tables: transformers' tensor name(s) -> tegaki's. "{i}" stands for the layer index. Kinds:
#   same       the tensor as it is
#   transpose  GPT-2's Conv1D stores (in, out); nn.Linear wants (out, in)
#   join       several tensors stacked along the output axis: Llama's q_proj, k_proj and v_proj
#              become tegaki's one qkv projection (export splits them again, at config.qkv_sizes)
# GPT-2's c_attn already holds q, k and v side by side: it is tegaki's qkv, transposed.
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    hf: tuple[str, ...]
    ours: str
    kind: str = "same"


def _r(hf: str | tuple[str, ...], ours: str, kind: str = "same") -> Rule:
    return Rule(hf if isinstance(hf, tuple) else (hf,), ours, kind)


def _join(hf_pattern: str, ours: str) -> Rule:
    """q, k and v of `hf_pattern` ("...{p}_proj.weight") joined into one of ours."""
    return _r(tuple(hf_pattern.format(i="{i}", p=p) for p in "qkv"), ours, kind="join")


GPT2_WEIGHTS = [
    _r("transformer.wte.weight", "wte.weight"),
    _r("transformer.wpe.weight", "wpe.weight"),
    _r("transformer.h.{i}.ln_1.weight", "blocks.{i}.ln_1.weight"),
    _r("transformer.h.{i}.ln_1.bias", "blocks.{i}.ln_1.bias"),
    _r("transformer.h.{i}.attn.c_attn.weight", "blocks.{i}.attn.qkv.weight", kind="transpose"),
    _r("transformer.h.{i}.attn.c_attn.bias", "blocks.{i}.attn.qkv.bias"),
    _r("transformer.h.{i}.attn.c_proj.weight", "blocks.{i}.attn.o_proj.weight", kind="transpose"),
    _r("transformer.h.{i}.attn.c_proj.bias", "blocks.{i}.attn.o_proj.bias"),
    _r("transformer.h.{i}.ln_2.weight", "blocks.{i}.ln_2.weight"),
    _r("transformer.h.{i}.ln_2.bias", "blocks.{i}.ln_2.bias"),
    _r("transformer.h.{i}.mlp.c_fc.weight", "blocks.{i}.mlp.fc.weight", kind="transpose"),
    _r("transformer.h.{i}.mlp.c_fc.bias", "blocks.{i}.mlp.fc.bias"),
    _r("transformer.h.{i}.mlp.c_proj.weight", "blocks.{i}.mlp.proj.weight", kind="transpose"),
    _r("transformer.h.{i}.mlp.c_proj.bias", "blocks.{i}.mlp.proj.bias"),
    _r("transformer.ln_f.weight", "ln_f.weight"),
    _r("transformer.ln_f.bias", "ln_f.bias"),
    _r("lm_head.weight", "lm_head.weight"),
]

LLAMA_WEIGHTS = [
    _r("model.embed_tokens.weight", "wte.weight"),
    _r("model.layers.{i}.input_layernorm.weight", "blocks.{i}.ln_1.weight"),
    _join("model.layers.{i}.self_attn.{p}_proj.weight", "blocks.{i}.attn.qkv.weight"),
    _join("model.layers.{i}.self_attn.{p}_proj.bias", "blocks.{i}.attn.qkv.bias"),
    _r("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o_proj.weight"),
    _r("model.layers.{i}.self_attn.o_proj.bias", "blocks.{i}.attn.o_proj.bias"),
    _r("model.layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    _r("model.layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
    _r("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.ln_2.weight"),
    *[
        _r(f"model.layers.{{i}}.mlp.{hf}_proj.{w}", f"blocks.{{i}}.mlp.{ours}.{w}")
        for hf, ours in (("gate", "gate"), ("up", "up"), ("down", "down"))
        for w in ("weight", "bias")
    ],
    _r("model.norm.weight", "ln_f.weight"),
    _r("lm_head.weight", "lm_head.weight"),
]

GPT_OSS_WEIGHTS = [r for r in LLAMA_WEIGHTS if ".mlp." not in r.ours] + [
    _r("model.layers.{i}.self_attn.sinks", "blocks.{i}.attn.sinks"),
    _r("model.layers.{i}.mlp.router.weight", "blocks.{i}.mlp.router.weight"),
    _r("model.layers.{i}.mlp.router.bias", "blocks.{i}.mlp.router.bias"),
    _r("model.layers.{i}.mlp.experts.gate_up_proj", "blocks.{i}.mlp.w_in"),
    _r("model.layers.{i}.mlp.experts.gate_up_proj_bias", "blocks.{i}.mlp.b_in"),
    _r("model.layers.{i}.mlp.experts.down_proj", "blocks.{i}.mlp.w_out"),
    _r("model.layers.{i}.mlp.experts.down_proj_bias", "blocks.{i}.mlp.b_out"),
]

# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED = [r"\.attn\.bias$", r"\.attn\.masked_bias$", r"rotary_emb\.inv_freq$"]


# -------------------------------------------------------------------------------------------------
# Config tables: (config.json key, ModelConfig field). Values that need thought go in functions.
# -------------------------------------------------------------------------------------------------

GPT2_CONFIG = [
    ("vocab_size", "vocab_size"),
    ("n_layer", "n_layer"),
    ("n_head", "n_head"),
    ("n_embd", "n_embd"),
    ("n_positions", "block_size"),
    ("layer_norm_epsilon", "norm_eps"),
    ("n_inner", "intermediate_size"),
    ("tie_word_embeddings", "tie_embeddings"),
]

LLAMA_CONFIG = [
    ("vocab_size", "vocab_size"),
    ("num_hidden_layers", "n_layer"),
    ("num_attention_heads", "n_head"),
    ("num_key_value_heads", "n_kv_head"),
    ("hidden_size", "n_embd"),
    ("head_dim", "head_dim"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "block_size"),
    ("rms_norm_eps", "norm_eps"),
    ("tie_word_embeddings", "tie_embeddings"),
    ("attention_bias", "qkv_bias"),
    ("attention_bias", "attn_out_bias"),
    ("mlp_bias", "mlp_bias"),
]

GPT_OSS_CONFIG = [c for c in LLAMA_CONFIG if c[0] != "mlp_bias"] + [
    ("num_local_experts", "n_experts"),
    ("num_experts_per_tok", "n_experts_per_tok"),
    ("router_aux_loss_coef", "moe_aux_loss_coef"),
    ("swiglu_limit", "moe_swiglu_limit"),
    ("swiglu_alpha", "moe_swiglu_alpha"),
    ("sliding_window", "sliding_window"),
]

# What each family fixes regardless of config.json.
_GPT2_FIXED = dict(pos_embedding="learned", norm="layernorm", mlp="gelu", bias=True)
_LLAMA_FIXED = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
_GPT_OSS_FIXED = dict(
    pos_embedding="rope",
    norm="rmsnorm",
    mlp="moe",
    moe_expert="gpt-oss",
    bias=False,
    attn_sinks=True,
    moe_router_bias=True,
    mlp_bias=True,
    moe_softmax_after_topk=True,
)


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # transformers' class name in config.json "architectures"
    model_type: str
    config_table: list[tuple[str, str]]
    weights: list[Rule]
    fixed: dict[str, Any]
    hf_defaults: dict[str, Any]  # config.json values transformers assumes when a key is absent


FAMILIES = {
    "gpt2": Family(
        "gpt2",
        "GPT2LMHeadModel",
        "gpt2",
        GPT2_CONFIG,
        GPT2_WEIGHTS,
        _GPT2_FIXED,
        dict(
            vocab_size=50257,
            n_layer=12,
            n_head=12,
            n_embd=768,
            n_positions=1024,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=True,
        ),
    ),
    "llama": Family(
        "llama",
        "LlamaForCausalLM",
        "llama",
        LLAMA_CONFIG,
        LLAMA_WEIGHTS,
        _LLAMA_FIXED,
        dict(
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            max_position_embeddings=2048,
        ),
    ),
    "qwen3": Family(
        "qwen3",
        "Qwen3ForCausalLM",
        "qwen3",
        [c for c in LLAMA_CONFIG if c[0] != "mlp_bias"],
        LLAMA_WEIGHTS,
        dict(_LLAMA_FIXED, qk_norm=True),
        dict(rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, max_position_embeddings=32768),
    ),
    "gpt_oss": Family(
        "gpt_oss",
        "GptOssForCausalLM",
        "gpt_oss",
        GPT_OSS_CONFIG,
        GPT_OSS_WEIGHTS,
        _GPT_OSS_FIXED,
        dict(
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            attention_bias=True,
            router_aux_loss_coef=0.9,
            swiglu_limit=7.0,
            swiglu_alpha=1.702,
            max_position_embeddings=131072,
            sliding_window=128,
        ),
    ),
}


def supported_architectures() -> str:
    return ", ".join(f"{f.architecture} (model_type {f.model_type!r})" for f in FAMILIES.values())


def family_of(hf_config: dict) -> Family:
    model_type = hf_config.get("model_type")
    archs = hf_config.get("architectures") or []
    for fam in FAMILIES.values():
        if model_type == fam.model_type or fam.architecture in archs:
            if model_type is not None and model_type != fam.model_type:
                raise TegakiError(
                    f"config.json disagrees with itself: model_type {model_type!r} but "
                    f"architectures {archs}; fix one of them"
                )
            return fam
    what = model_type or (archs[0] if archs else "unknown")
    raise TegakiError(f"unsupported architecture {what!r}; tegaki loads {supported_architectures()}")


# -------------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# -------------------------------------------------------------------------------------------------

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
    params.update(hf.get("rope_scaling") or {})  # older config.json files
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


# -------------------------------------------------------------------------------------------------
# Tensors: the rules applied both ways
# -------------------------------------------------------------------------------------------------


def _expand(rules: list[Rule], n_layer: int) -> list[Rule]:
    out = []
    for r in rules:
        if "{i}" in r.ours:
            out += [Rule(tuple(h.format(i=i) for h in r.hf), r.ours.format(i=i), r.kind) for i in range(n_layer)]
        else:
            out.append(r)
    return out


def _to_ours(kind: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if kind == "same":
        return tensors[0]
    if kind == "transpose":
        return tensors[0].t().contiguous()
    if kind == "join":  # q, k, v (out_i, ...) -> (sum of out_i, ...)
        return torch.cat(tensors, dim=0)
    raise ValueError(kind)


def _to_hf(kind: str, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    if kind == "same":
        return [tensor]
    if kind == "transpose":
        return [tensor.t().contiguous()]
    if kind == "join":
        return [t.contiguous() for t in tensor.split(config.qkv_sizes, dim=0)]
    raise ValueError(kind)


def _normalise_gpt2_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub GPT-2 checkpoints have no "transformer." prefix; save_pretrained writes it. Accept both."""
    out = {}
    for key, value in state.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = value
    return out


def state_dict_from_hf(model, hf_state: dict[str, torch.Tensor], fam: Family) -> dict[str, torch.Tensor]:
    """Map transformers tensors onto the model's names; one error lists every problem."""
    if fam.name == "gpt2":
        hf_state = _normalise_gpt2_keys(hf_state)
    ours_expected = model.state_dict()
    result: dict[str, torch.Tensor] = {}
    missing, mis_shaped = [], []
    used = set()
    for rule in _expand(fam.weights, model.config.n_layer):
        if rule.ours not in ours_expected:
            continue  # this model has no such parameter (a bias switched off, say)
        if rule.hf == ("lm_head.weight",) and model.config.tie_embeddings:
            used.add("lm_head.weight")  # tied: the head is the embedding; a stored copy is fine and unused
            continue
        absent = [h for h in rule.hf if h not in hf_state]
        if absent:
            missing += absent
            continue
        used.update(rule.hf)
        expected = _to_hf(rule.kind, ours_expected[rule.ours], model.config)  # the file's shapes
        wrong = [
            f"{h}: got {tuple(hf_state[h].shape)}, expected {tuple(e.shape)}"
            for h, e in zip(rule.hf, expected)
            if hf_state[h].shape != e.shape
        ]
        if wrong:
            mis_shaped += wrong
            continue
        result[rule.ours] = _to_ours(rule.kind, [hf_state[h] for h in rule.hf])
    unexpected = [k for k in hf_state if k not in used and not any(re.search(p, k) for p in IGNORED)]
    if missing or unexpected or mis_shaped:
        lines = [f"the checkpoint does not fit a {fam.architecture} built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" …" if len(items) > 20 else ""))
        raise TegakiError("\n".join(lines))
    if model.config.tie_embeddings:
        result["lm_head.weight"] = result["wte.weight"]
    return result


def state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    fam = family_for_config(model.config)
    ours = model.state_dict()
    out = {}
    for rule in _expand(fam.weights, model.config.n_layer):
        if rule.ours not in ours:
            continue
        if rule.hf == ("lm_head.weight",) and model.config.tie_embeddings:
            continue
        for name, tensor in zip(rule.hf, _to_hf(rule.kind, ours[rule.ours].detach().cpu(), model.config)):
            out[name] = tensor.contiguous()
    return out
