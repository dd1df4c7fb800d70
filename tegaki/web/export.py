"""`tegaki export RUN OUT --web`: a static folder that runs the model in a browser, offline.

The folder holds the page (static/: index.html, its scripts, the kernels as WebAssembly), the
weights and the tokenizer. The weights are one safetensors file: an 8-byte length, a small JSON
header (each tensor's name, dtype, shape and place; under "__metadata__" the model's shape as the
page needs it), then the raw tensors, named as tegaki/model.py names its parameters. float16 by
default (half the bytes; the page widens them to float32 once, on load, and computes in float32).

The page runs what its kernels cover: GPT-2 (LayerNorm, GELU, learned positions) and the
Llama-style flags (RMSNorm, SwiGLU, RoPE with any of tegaki's scalings, GQA, QK-norm). A model
with anything else is refused here, before a file is written, rather than run wrongly there.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import save_file

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.files import atomic_write, atomic_write_bytes, atomic_write_text
from tegaki.load import EXPORT_FILES, EXPORT_MARK, ModelSource, claim_export_folder
from tegaki.model import parameter_count
from tegaki.rope import rope_frequencies
from tegaki.tokenizer import BytePairTokenizer
from tegaki.tokenizer.bpe import PATTERNS, token_to_str

# The folder's files, listed once in tegaki.load (which claims export folders): the weights first
# (written first, they carry the export's mark), the tokenizer, then the page's own files.
WEB_FILES = EXPORT_FILES["web"]
WEIGHTS_FILE, TOKENIZER_FILE, *PAGE_FILES = WEB_FILES

MAX_CONTEXT = 2048  # the page's cache holds min(block_size, this) tokens (model.js, MAX_CONTEXT)
MEMORY_LIMIT = int(3.5 * 2**30)  # below wasm32's 4 GiB: room for the module, the scratch, the views
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The pre-tokenization patterns in JavaScript's regex dialect. GPT-2's is the same text; GPT-4's
# possessive quantifiers (`++`, `?+`) become plain ones, which match the same chunks here (what
# follows each one can never match what it gave back), and `(?i:...)` is spelt out by case.
JS_PATTERNS = {
    "gpt2": PATTERNS["gpt2"],
    "gpt4": r"""'(?:[sS]|[dD]|[mM]|[tT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s+$|\s*[\r\n]|\s+(?!\S)|\s""",  # noqa: E501
}


def page_memory(config: ModelConfig) -> int:
    """Bytes the page holds in WebAssembly's memory: the weights in float32 and the KV cache."""
    context = min(config.block_size, MAX_CONTEXT)
    return 4 * parameter_count(config) + 2 * 4 * config.n_layer * context * config.n_kv_head * config.head_dim


def web_refusals(config: ModelConfig) -> list[str]:
    """What in `config` the page cannot run (a flag its kernels do not compute, or more bytes than
    its memory holds); empty when the page runs it."""
    problems = []
    if page_memory(config) > MEMORY_LIMIT:
        problems.append(
            f"{page_memory(config) / 2**30:.1f} GiB of float32 weights and cache (the page's memory, "
            f"WebAssembly's, holds {MEMORY_LIMIT / 2**30:.1f} GiB at most)"
        )
    if config.mlp == "moe":
        problems.append("a mixture of experts (mlp='moe')")
    if config.attn_sinks:
        problems.append("attention sinks (attn_sinks)")
    if any(config.window(i) is not None for i in range(config.n_layer)):
        problems.append("sliding-window attention (sliding_window / layer_types)")
    if config.attn_gate != "none":
        problems.append(f"gated attention (attn_gate={config.attn_gate!r})")
    if config.attn_scale_learnable:
        problems.append("a learned attention scale (attn_scale_learnable)")
    if not config.causal:
        problems.append("non-causal attention (causal=False)")
    return problems


def export_web(model_ref: str | os.PathLike, out: str | os.PathLike, dtype: str = "float16") -> Path:
    """Write the static folder for the model at `model_ref` (a run folder, a transformers folder or
    a hub id) into `out`; returns `out`. dtype: the weights' type in the file."""
    name = Path(str(model_ref)).name
    source = ModelSource(model_ref)
    refuse(source.config, name)  # before any weight is read: a 20B model is refused at once
    return write_web_folder(source.load(), source.tokenizer, out, dtype, name=name)


def refuse(config: ModelConfig, name: str) -> None:
    problems = web_refusals(config)
    if problems:
        raise TegakiError(
            f"{name} has {', '.join(problems)}, which the browser page cannot run (its kernels cover GPT-2 "
            "and the Llama-style flags: RMSNorm, SwiGLU, RoPE, GQA, QK-norm). "
            "Export it for transformers instead: tegaki export MODEL OUT"
        )


def write_web_folder(model, tokenizer, out: str | os.PathLike, dtype: str = "float16", name: str = "model") -> Path:
    """The folder for a loaded model and its tokenizer; anything the page cannot run is refused
    before a file is written."""
    if dtype not in DTYPES:
        raise TegakiError(f"--dtype {dtype}: the page reads weights in {', '.join(DTYPES)}")
    out = Path(out)
    refuse(model.config, name)
    tokenizer_spec = web_tokenizer(tokenizer)
    claim_export_folder(out, "web")
    write_weights(model, out / WEIGHTS_FILE, DTYPES[dtype], name=name)
    atomic_write_text(out / TOKENIZER_FILE, json.dumps(tokenizer_spec, ensure_ascii=False, separators=(",", ":")))
    static = resources.files("tegaki.web") / "static"
    for file in PAGE_FILES:
        atomic_write_bytes(out / file, (static / file).read_bytes())
    return out


def page_config(model) -> dict:
    """The model's shape as model.js reads it: every size and flag of the forward pass, with the
    derived values (head_dim, the rotary frequencies, the attention scale) worked out here once."""
    c = model.config
    spec = {
        key: getattr(c, key)
        for key in (
            "vocab_size",
            "n_layer",
            "n_head",
            "n_kv_head",
            "head_dim",
            "n_embd",
            "intermediate_size",
            "block_size",
            "norm",
            "norm_eps",
            "mlp",
            "pos_embedding",
            "qk_norm",
            "tie_embeddings",
            "final_norm",
        )
    }
    spec["attn_scale"] = c.attn_scale if c.attn_scale is not None else c.head_dim**-0.5
    spec["max_positions"] = c.max_positions
    if c.pos_embedding == "rope":
        inv_freq, attention_factor = rope_frequencies(c)
        spec["rope_inv_freq"] = inv_freq.tolist()
        spec["rope_attention_factor"] = attention_factor
    return spec


def write_weights(model, path: Path, dtype: torch.dtype, name: str) -> None:
    """model.safetensors: the parameters by model.py's names (a tied head stored once, as the
    embedding), and the page's config in the header's metadata."""
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    header = {"name": name, "config": page_config(model), "parameters": model.num_parameters()}
    metadata = {"format": "pt", EXPORT_MARK: "web", "tegaki_web": json.dumps(header)}
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: str) -> None:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)  # as readable as the page's files: a web server must read it

    atomic_write(path, write)


def web_tokenizer(tokenizer) -> dict:
    """The tokenizer as tokenizer.js reads it: each id's bytes in GPT-2's printable form (the
    characters of encoder.json), the merges as flat (left, right, merged) triples in merge order,
    the special tokens, and the pre-tokenization regex in JavaScript's dialect."""
    if not isinstance(tokenizer, BytePairTokenizer):
        raise TegakiError(
            f"the page tokenizes with byte-level BPE; this model's tokenizer is {tokenizer.kind} ({tokenizer.name})"
        )
    pattern = next((name for name, text in PATTERNS.items() if text == tokenizer.pattern), tokenizer.pattern_name)
    if pattern not in JS_PATTERNS:
        raise TegakiError(
            f"the page knows the pre-tokenization patterns {', '.join(JS_PATTERNS)}; this tokenizer "
            f"({tokenizer.name}) uses its own regex, which is not translated to JavaScript"
        )
    specials = set(tokenizer.special_tokens.values())
    vocab = [None] * tokenizer.vocab_size
    for i, token in tokenizer.vocab.items():
        if i not in specials:
            vocab[i] = token_to_str(token)
    merges = []
    for (left, right), merged in sorted(tokenizer.merges.items(), key=lambda item: item[1]):
        merges += [left, right, merged]
    return {
        "name": tokenizer.name,
        "pattern": JS_PATTERNS[pattern],
        "vocab": vocab,
        "merges": merges,
        "special_tokens": tokenizer.special_tokens,
        "eot_id": tokenizer.eot_id,
    }
