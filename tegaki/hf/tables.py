"""The name tables: which transformers class each family is, and how its names map onto tegaki's.

A family (GPT-2, Llama, Qwen3, GPT-OSS) is two tables and a few fixed choices:
  * CONFIG: transformers' config.json key  <->  ModelConfig field
  * WEIGHTS: transformers' tensor name  <->  tegaki's parameter name(s), and how the tensor changes
  * fixed: what the family always is, whatever config.json says (norm, MLP, positions)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
