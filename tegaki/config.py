"""ModelConfig: every architecture tegaki knows is one of these.

GPT-2 is the default of every field. Each modern change (rotary positions, RMSNorm, SwiGLU, GQA,
QK-norm, mixture of experts, attention sinks, sliding windows, gated attention) is one flag here,
read in one visible place in `model.py`. The field names follow nanoGPT (`n_layer`, `n_head`,
`n_embd`, `block_size`) so its readers feel at home.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from tegaki.errors import TegakiError

MAX_PATTERN_LAYERS = 100_000  # --set n_layer beyond this is refused for presets with a per-layer pattern


@dataclass
class ModelConfig:
    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the longest context the model is built for
    n_kv_head: int | None = None  # None: = n_head (MHA); fewer: GQA; 1: MQA
    head_dim: int | None = None  # None: n_embd // n_head (Qwen3 and GPT-OSS set it on its own)
    intermediate_size: int | None = None  # MLP hidden width; None: 4 * n_embd (the "4x MLP")

    # --- biases, dropout, head ----------------------------------------------------------------
    bias: bool = True  # default for every Linear and LayerNorm bias below that is left at None
    qkv_bias: bool | None = None
    attn_out_bias: bool | None = None
    mlp_bias: bool | None = None
    dropout: float = 0.0
    tie_embeddings: bool = True  # LM head shares the token-embedding matrix (GPT-2 does)
    final_norm: bool = True

    # --- positions ----------------------------------------------------------------------------
    pos_embedding: str = "learned"  # "learned" (GPT-2) | "rope" | "none"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # "none" | "linear" | "ntk" | "yarn" | "llama3"
    rope_factor: float = 1.0
    rope_original_max_len: int | None = None  # the context the model was pre-trained with
    rope_beta_fast: float = 32.0  # YaRN
    rope_beta_slow: float = 1.0  # YaRN
    rope_truncate: bool = True  # YaRN: round the correction range (GPT-OSS: False)
    rope_attention_factor: float | None = None  # YaRN: None -> 0.1 * ln(factor) + 1
    rope_low_freq_factor: float = 1.0  # Llama 3
    rope_high_freq_factor: float = 4.0  # Llama 3

    # --- normalisation ------------------------------------------------------------------------
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on each query and key head

    # --- MLP ----------------------------------------------------------------------------------
    mlp: str = "gelu"  # "gelu" (GPT-2) | "swiglu" (Llama) | "moe"
    n_experts: int = 0
    n_experts_per_tok: int = 2
    moe_expert: str = "swiglu"  # "swiglu" (Mixtral/Qwen3-MoE) | "gpt-oss" (clamped SwiGLU)
    moe_router_bias: bool = False
    moe_softmax_after_topk: bool = True  # GPT-OSS: softmax over the top-k logits only
    moe_norm_topk_prob: bool = True  # softmax-before-top-k only: renormalise the chosen k
    moe_swiglu_limit: float = 7.0  # gpt-oss expert clamp
    moe_swiglu_alpha: float = 1.702  # gpt-oss expert sigmoid slope
    moe_aux_loss_coef: float = 0.0  # weight of the load-balancing loss added in training
    moe_impl: str = "loop"  # "loop" (readable, per expert) | "dense" (every expert, batched)

    # --- attention ----------------------------------------------------------------------------
    causal: bool = True  # False is the classic bug: the model sees the future while training
    attn_impl: str = "sdpa"  # "manual" (written out) | "sdpa" (PyTorch's fused kernel)
    attn_sinks: bool = False  # GPT-OSS: one learned logit per head that absorbs attention mass
    sliding_window: int | None = None  # keys further back than this are invisible
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None: all full,
    #                                       or all sliding when sliding_window is set
    attn_gate: str = "none"  # "none" | "elementwise" | "headwise" (Qiu et al. 2025)
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attn_scale_learnable: bool = False

    init_std: float = 0.02

    # Which fields were derived, and the values they took: {name: value}. Hidden from the caller
    # (not in to_dict, repr or ==); it travels through dataclasses.replace with the other fields,
    # so that a derived value passed back unchanged is derived again from the new sizes.
    _derived: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A field left at None is derived from the others, here: code reads config.head_dim and
        # gets a number. A field that holds the value it was derived as before (what
        # dataclasses.replace copies over from the old config) is derived again, so that
        # replace(config, n_head=6) is the config built with n_head=6. to_dict() writes derived
        # fields as None: a config file keeps meaning "derive".
        before = self._derived or {}
        derivations = self._derivations()
        derived = {
            name: value
            for name, value in derivations.items()
            if getattr(self, name) is None or (name in before and getattr(self, name) == before[name])
        }
        for name, value in derived.items():
            setattr(self, name, value)
        self._derived = derived
        self.validate()

    def _derivations(self) -> dict[str, Any]:
        """What each None field stands for."""
        return {
            "n_kv_head": self.n_head,  # as many key/value heads as query heads: plain multi-head
            "head_dim": self.n_embd // self.n_head if self.n_head else 0,  # the heads split n_embd
            "intermediate_size": 4 * self.n_embd,  # GPT-2's "4x MLP"
            "qkv_bias": self.bias,
            "attn_out_bias": self.bias,
            "mlp_bias": self.bias,
        }

    def window(self, layer: int) -> int | None:
        """How far back layer `layer` may look: sliding_window for a sliding layer, None (the whole
        context) for a full one. The one place that answers it: attention and the KV cache ask."""
        if self.layer_types is not None:
            kind = self.layer_types[layer]
        else:
            kind = "sliding" if self.sliding_window else "full"
        return self.sliding_window if kind == "sliding" else None

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        """Output widths of the joint q/k/v projection: H*D query, K*D key and K*D value channels
        (K < H with grouped-query attention)."""
        return (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)

    @property
    def max_positions(self) -> int | None:
        """The number of positions the model can take: block_size for a learned position table
        (GPT-2 has no vector for position 1024), None (no hard limit) for rotary or no positions."""
        return self.block_size if self.pos_embedding == "learned" else None

    def check_positions(self, count: int, what: str = "the input") -> None:
        """Refuse `count` positions when a learned position table has fewer rows."""
        limit = self.max_positions
        if limit is not None and count > limit:
            raise TegakiError(
                f"{what} needs {count} positions, beyond this model's learned position table "
                f"(block_size={limit}); shorten it"
            )

    def validate(self) -> None:
        """Reject inconsistent flags when the config is built, not deep inside a forward pass."""
        for check in (
            self._check_types,
            self._check_sizes,
            self._check_choices,
            self._check_positions,
            self._check_experts,
            self._check_windows,
        ):
            problem = check()
            if problem is not None:
                raise TegakiError(f"invalid ModelConfig: {problem}")

    def _check_types(self) -> str | None:
        """A config.json or run.json may hold anything: "n_layer": 1e9, "causal": "no"."""
        for f in public_fields():
            problem = type_problem(str(f.type), getattr(self, f.name))
            if problem is not None:
                return f"{f.name} {problem}"
        return None

    def _check_sizes(self) -> str | None:
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) <= 0:
                return f"{name} must be positive, got {getattr(self, name)}"
        if "head_dim" in self._derived and self.n_embd % self.n_head != 0:
            return f"n_head={self.n_head} does not divide n_embd={self.n_embd} (or set head_dim)"
        if not (self.n_kv_head >= 1 and self.n_head % self.n_kv_head == 0):
            return f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
        if not 0.0 <= self.dropout < 1.0:
            return f"dropout must be in [0, 1), got {self.dropout}"
        if self.init_std < 0:
            return f"init_std must be >= 0, got {self.init_std}"
        return None

    def _check_choices(self) -> str | None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                return f"{name}={getattr(self, name)!r}, expected one of {allowed}"
        return None

    def _check_positions(self) -> str | None:
        """Rotary embeddings and their scalings."""
        if self.pos_embedding == "rope" and self.head_dim % 2 != 0:
            return f"rotary embeddings need an even head_dim, got {self.head_dim}"
        if self.rope_scaling != "none" and self.pos_embedding != "rope":
            return "rope_scaling needs pos_embedding='rope'"
        if self.rope_scaling != "none" and self.rope_factor < 1.0:
            return f"rope_factor must be >= 1, got {self.rope_factor}"
        if self.rope_scaling in ("yarn", "llama3") and self.rope_original_max_len is None:
            return f"rope_scaling={self.rope_scaling!r} needs rope_original_max_len"
        return None

    def _check_experts(self) -> str | None:
        if self.mlp != "moe":
            return None
        if self.n_experts < 1:
            return "mlp='moe' needs n_experts >= 1"
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            return f"n_experts_per_tok={self.n_experts_per_tok} must be between 1 and n_experts={self.n_experts}"
        return None

    def _check_windows(self) -> str | None:
        """The sliding window and the per-layer pattern of full and sliding layers."""
        window, types = self.sliding_window, self.layer_types
        if window is not None and window < 1:
            return f"sliding_window must be >= 1, got {window}"
        if window is not None and window > self.block_size:
            return f"sliding_window={window} is larger than the context block_size={self.block_size}"
        if types is None:
            return None
        if len(types) != self.n_layer:
            return f"layer_types has {len(types)} entries for n_layer={self.n_layer}"
        if not all(t in ("full", "sliding") for t in types):
            return "layer_types entries must be 'full' or 'sliding'"
        if "sliding" in types and window is None:
            return "layer_types has 'sliding' layers but sliding_window is not set"
        return None

    # --- conversions ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field (copies: a list in it is not the config's); derived ones as None, as they were given."""
        d = dataclasses.asdict(self)
        del d["_derived"]
        return d | dict.fromkeys(self._derived)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in public_fields()}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TegakiError(f"unknown ModelConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; derived fields are derived again from the new values,
        and a field named in `changes` keeps the value given, even one equal to its derived value."""
        unchanged = {name: value for name, value in self._derived.items() if name not in changes}
        return dataclasses.replace(self, **changes, _derived=unchanged)

    def with_overrides(self, assignments: list[str]) -> ModelConfig:
        """Apply `field=value` strings (the CLI's --set), each value parsed by the field's type."""
        changes = {}
        types = {f.name: f.type for f in public_fields()}
        for item in assignments:
            name, sep, raw = item.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in types:
                known = ", ".join(sorted(types))
                raise TegakiError(f"--set expects field=value with a ModelConfig field, got {item!r}. Fields: {known}")
            changes[name] = _parse_value(name, types[name], raw.strip())
        if "n_layer" in changes and "layer_types" not in changes and self.layer_types:
            # A per-layer pattern (GPT-OSS: sliding, full, sliding, ...) repeats to the new depth --
            # a list as long as the model is deep, so an absurd depth is refused before it is built.
            if changes["n_layer"] > MAX_PATTERN_LAYERS:
                raise TegakiError(
                    f"--set n_layer={changes['n_layer']:,}: a per-layer pattern that deep would not fit in "
                    f"memory (the deepest real models have a few hundred layers); ask for at most "
                    f"{MAX_PATTERN_LAYERS:,}"
                )
            pattern = self.layer_types
            changes["layer_types"] = [pattern[i % len(pattern)] for i in range(changes["n_layer"])]
        return self.replace(**changes)

    @staticmethod
    def preset(name: str) -> ModelConfig:
        if name not in PRESETS:
            raise TegakiError(f"unknown preset {name!r}. Known presets: {', '.join(PRESETS)}")
        return ModelConfig(**PRESETS[name])


# The fields that take one of a few words, and those words.
CHOICES = {
    "pos_embedding": ("learned", "rope", "none"),
    "rope_scaling": ("none", "linear", "ntk", "yarn", "llama3"),
    "norm": ("layernorm", "rmsnorm"),
    "mlp": ("gelu", "swiglu", "moe"),
    "moe_expert": ("swiglu", "gpt-oss"),
    "moe_impl": ("loop", "dense"),
    "attn_impl": ("manual", "sdpa"),
    "attn_gate": ("none", "elementwise", "headwise"),
}


def public_fields() -> list[dataclasses.Field]:
    """ModelConfig's fields a caller sets (every one but the hidden record of derived values)."""
    return [f for f in fields(ModelConfig) if not f.name.startswith("_")]


# A value of each annotated kind; an int is a float too, a bool is never an int (nor a number of layers).
KIND_CHECKS = {
    "bool": lambda v: type(v) is bool,
    "int": lambda v: type(v) is int,
    "float": lambda v: type(v) in (int, float) and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "list[str]": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
}
KIND_WORDS = {
    "bool": "true or false",
    "int": "a whole number",
    "float": "a finite number",
    "str": "text",
    "list[str]": "a list of texts",
}


def type_problem(annotation: str, value: Any) -> str | None:
    """What is wrong with `value` for a field annotated `annotation` ("int | None"), in words; None:
    nothing. The one type check of settings, wherever they come from (flags, TOML, JSON, --set)."""
    kind, _, optional = annotation.partition(" | ")
    if value is None and optional == "None":
        return None
    check = KIND_CHECKS.get(kind)
    if check is None or check(value):
        return None
    return f"must be {KIND_WORDS[kind]}{' (or left out)' if optional else ''}, got {value!r}"


def _parse_value(name: str, type_name: Any, raw: str) -> Any:
    t = str(type_name)
    try:
        if raw.lower() in ("none", "null") and "None" in t:
            return None
        if t.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if t.startswith("int"):
            return int(raw)
        if t.startswith("float"):
            return float(raw)
        if t.startswith("list"):
            return json.loads(raw) if raw.startswith("[") else [s.strip() for s in raw.split(",")]
        return raw
    except ValueError:
        raise TegakiError(f"--set {name}={raw!r}: expected a value of type {t}") from None


def _alternating(n_layer: int) -> list[str]:
    """GPT-OSS: even layers use the sliding window, odd layers see the whole context."""
    return ["sliding" if i % 2 == 0 else "full" for i in range(n_layer)]


_LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)

# The tiny presets share one budget -- about 1.8M parameters in the blocks (embeddings and LM head
# left out), each within 10% of `tiny` -- so that `tegaki compare` pits architectures, not budgets,
# against each other. Where a family adds weights, its MLP is narrowed to pay for them: SwiGLU's three
# matrices get a 512-wide hidden layer instead of GELU's 768; GPT-OSS's 4 experts (2 active) get 144
# each. tests/test_config.py holds them to it.
_TINY = dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=192, block_size=256)

# GPT-OSS in miniature (the YaRN preset adds the scaling only).
_TINY_GPT_OSS = dict(
    **_TINY | _LLAMA | dict(mlp="moe"),
    n_kv_head=2,
    head_dim=48,
    moe_expert="gpt-oss",
    n_experts=4,
    n_experts_per_tok=2,
    intermediate_size=144,
    moe_router_bias=True,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    attn_sinks=True,
    sliding_window=64,
    layer_types=_alternating(4),
    rope_theta=150_000.0,
    moe_aux_loss_coef=0.01,
)

# GPT-OSS as released: the two sizes differ only in depth and the number of experts.
_GPT_OSS = dict(
    **_LLAMA | dict(mlp="moe"),
    vocab_size=201088,
    n_head=64,
    n_kv_head=8,
    head_dim=64,
    n_embd=2880,
    intermediate_size=2880,
    block_size=131072,
    moe_expert="gpt-oss",
    n_experts_per_tok=4,
    moe_router_bias=True,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    attn_sinks=True,
    sliding_window=128,
    rope_theta=150_000.0,
    rope_scaling="yarn",
    rope_factor=32.0,
    rope_original_max_len=4096,
    rope_truncate=False,
    moe_aux_loss_coef=0.9,
)

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 as released by OpenAI (vocab 50257, learned positions, LayerNorm, GELU, tied head).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # Small enough to train visibly on a CPU.
    "tiny": dict(_TINY),
    # `make demo`'s model (the default of `tegaki train`): tiny at 128 wide, 1.35M parameters, the
    # lower loss in the same CPU time (benchmarks/RESULTS.md, "The demo run").
    "demo": dict(_TINY, n_embd=128),
    "tiny-llama": dict(**_TINY | _LLAMA, n_kv_head=2, intermediate_size=512, norm_eps=1e-5),
    "tiny-qwen3": dict(
        _TINY,
        **_LLAMA | dict(tie_embeddings=True),
        n_kv_head=2,
        head_dim=64,
        qk_norm=True,
        intermediate_size=512,
        norm_eps=1e-6,
        rope_theta=1_000_000.0,
    ),
    "tiny-gpt-oss": dict(_TINY_GPT_OSS),
    "tiny-gpt-oss-yarn": dict(
        _TINY_GPT_OSS, rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=64, rope_truncate=False
    ),
    "tiny-gated": dict(**_TINY | _LLAMA, n_kv_head=2, intermediate_size=512, attn_gate="elementwise"),
    # Real shapes (the numbers in their transformers config.json files).
    "llama-3.2-1b": dict(
        **_LLAMA | dict(tie_embeddings=True),
        vocab_size=128256,
        n_layer=16,
        n_head=32,
        n_kv_head=8,
        n_embd=2048,
        intermediate_size=8192,
        block_size=131072,
        rope_theta=500_000.0,
        rope_scaling="llama3",
        rope_factor=32.0,
        rope_original_max_len=8192,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
    ),
    "qwen3-0.6b": dict(
        **_LLAMA | dict(tie_embeddings=True),
        vocab_size=151936,
        n_layer=28,
        n_head=16,
        n_kv_head=8,
        head_dim=128,
        n_embd=1024,
        intermediate_size=3072,
        block_size=40960,
        rope_theta=1_000_000.0,
        qk_norm=True,
        norm_eps=1e-6,
    ),
    "gpt-oss-20b": dict(_GPT_OSS, n_layer=24, layer_types=_alternating(24), n_experts=32),
    "gpt-oss-120b": dict(_GPT_OSS, n_layer=36, layer_types=_alternating(36), n_experts=128),
}


def preset_names() -> list[str]:
    return list(PRESETS)
