"""One GGUF file for llama.cpp (and Ollama, LM Studio, ...): the weights, the tokenizer, the chat template.

    tegaki export runs/demo demo.gguf --outtype q8_0

GGUF is llama.cpp's single-file format: a list of metadata keys ("llama.block_count": 4, ...) and a
list of named tensors ("blk.0.attn_q.weight", ...). The file is written with the `gguf` package, the
writer llama.cpp's own converter uses. As in `tegaki.hf`, the conversion is data:

  * ARCHITECTURES: which llama.cpp architecture runs each tegaki family (hf.family_for_config picks it)
  * TENSORS: tegaki's parameter name -> the GGUF tensor name, and how the tensor changes on the way
  * PRE_TOKENIZERS: tegaki's pre-tokenization pattern -> the llama.cpp pre-tokenizer with the same splits

RoPE scalings travel as llama.cpp's keys where it has the same one (linear; static NTK is a larger
base; YaRN with its ramp rounded), and as tegaki's own frequencies in a `rope_freqs` tensor where it
has not (Llama 3, any YaRN: only llama.cpp's Llama reads that tensor).

What llama.cpp cannot compute exactly as tegaki does is refused with a TegakiError that names it,
never written as a file that would quietly compute something else. llama.cpp itself is never
imported here; tests/test_gguf_export.py loads the files with it and compares ids, logits and
greedy tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import regex
import torch

from tegaki.chat_template import find_chat_template, local_template_folders
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.files import atomic_write, explain_write_error
from tegaki.hf import family_for_config
from tegaki.load import ModelSource
from tegaki.rope import rope_frequencies
from tegaki.tokenizer.bpe import PATTERNS, BytePairTokenizer, token_to_str

OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# tegaki family (its name in tegaki.hf) -> llama.cpp architecture.
ARCHITECTURES = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3", "gpt_oss": "gpt-oss"}

# -------------------------------------------------------------------------------------------------
# Tensor tables: (tegaki's parameter, GGUF tensor, kind). "{i}" stands for the layer index. A row
# whose parameter the model lacks (a bias switched off) is skipped. Kinds:
#   same       as it is: PyTorch's (out, in) is what GGUF stores (it lists the dims reversed)
#   q, k, v    the query, key or value rows of tegaki's one qkv projection (split at config.qkv_sizes)
#   q_pairs, k_pairs   the same, rows reordered for llama.cpp's Llama, which rotates adjacent pairs
#              (x0, x1), (x2, x3), ... where tegaki (and transformers) rotate the halves
#              (x0, x_{D/2}), ...: llama.cpp's converter makes the same permutation
#   gate_exps, up_exps   GPT-OSS experts: the even (gate) or odd (up) columns of w_in (E, C, 2I),
#              as (E, I, C); their biases the even or odd entries of b_in (E, 2I)
#   down_exps  w_out (E, I, C) as (E, C, I)
# -------------------------------------------------------------------------------------------------


def _wb(ours: str, theirs: str, kind: str = "same") -> list[tuple[str, str, str]]:
    """The weight and the bias of one layer."""
    return [(f"{ours}.weight", f"{theirs}.weight", kind), (f"{ours}.bias", f"{theirs}.bias", kind)]


def _qkv(q: str, k: str) -> list[tuple[str, str, str]]:
    qkv = "blocks.{i}.attn.qkv"
    return [*_wb(qkv, "blk.{i}.attn_q", q), *_wb(qkv, "blk.{i}.attn_k", k), *_wb(qkv, "blk.{i}.attn_v", "v")]


_EMBEDDING = [("wte.weight", "token_embd.weight", "same")]
_HEAD = [*_wb("ln_f", "output_norm"), ("lm_head.weight", "output.weight", "same")]
_SWIGLU = [
    *_wb("blocks.{i}.mlp.gate", "blk.{i}.ffn_gate"),
    *_wb("blocks.{i}.mlp.up", "blk.{i}.ffn_up"),
    *_wb("blocks.{i}.mlp.down", "blk.{i}.ffn_down"),
]

GPT2_TENSORS = [
    *_EMBEDDING,
    ("wpe.weight", "position_embd.weight", "same"),
    *_wb("blocks.{i}.ln_1", "blk.{i}.attn_norm"),
    *_wb("blocks.{i}.attn.qkv", "blk.{i}.attn_qkv"),  # GPT-2 keeps q, k and v in one matrix, as tegaki
    *_wb("blocks.{i}.attn.o_proj", "blk.{i}.attn_output"),
    *_wb("blocks.{i}.ln_2", "blk.{i}.ffn_norm"),
    *_wb("blocks.{i}.mlp.fc", "blk.{i}.ffn_up"),
    *_wb("blocks.{i}.mlp.proj", "blk.{i}.ffn_down"),
    *_HEAD,
]

LLAMA_TENSORS = [
    *_EMBEDDING,
    ("blocks.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", "same"),
    *_qkv("q_pairs", "k_pairs"),
    *_wb("blocks.{i}.attn.o_proj", "blk.{i}.attn_output"),
    ("blocks.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight", "same"),
    *_SWIGLU,
    *_HEAD,
]

QWEN3_TENSORS = [
    *_EMBEDDING,
    ("blocks.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", "same"),
    *_qkv("q", "k"),  # llama.cpp's Qwen3 rotates the halves, as tegaki
    ("blocks.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", "same"),
    ("blocks.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", "same"),
    *_wb("blocks.{i}.attn.o_proj", "blk.{i}.attn_output"),
    ("blocks.{i}.ln_2.weight", "blk.{i}.ffn_norm.weight", "same"),
    *_SWIGLU,
    *_HEAD,
]

GPT_OSS_TENSORS = [
    *_EMBEDDING,
    ("blocks.{i}.ln_1.weight", "blk.{i}.attn_norm.weight", "same"),
    *_qkv("q", "k"),
    *_wb("blocks.{i}.attn.o_proj", "blk.{i}.attn_output"),
    ("blocks.{i}.attn.sinks", "blk.{i}.attn_sinks.weight", "same"),
    ("blocks.{i}.ln_2.weight", "blk.{i}.post_attention_norm.weight", "same"),
    *_wb("blocks.{i}.mlp.router", "blk.{i}.ffn_gate_inp"),
    ("blocks.{i}.mlp.w_in", "blk.{i}.ffn_gate_exps.weight", "gate_exps"),
    ("blocks.{i}.mlp.w_in", "blk.{i}.ffn_up_exps.weight", "up_exps"),
    ("blocks.{i}.mlp.w_out", "blk.{i}.ffn_down_exps.weight", "down_exps"),
    ("blocks.{i}.mlp.b_in", "blk.{i}.ffn_gate_exps.bias", "gate_exps"),
    ("blocks.{i}.mlp.b_in", "blk.{i}.ffn_up_exps.bias", "up_exps"),
    ("blocks.{i}.mlp.b_out", "blk.{i}.ffn_down_exps.bias", "same"),
    *_HEAD,
]

TENSORS = {"gpt2": GPT2_TENSORS, "llama": LLAMA_TENSORS, "qwen3": QWEN3_TENSORS, "gpt_oss": GPT_OSS_TENSORS}

# Tensors llama.cpp wants in float32 whatever the file's type (as its converter writes them): norms,
# biases and other vectors, the router (its top-k is sensitive) and GPT-2's position table.
_ALWAYS_F32 = ("_norm.weight", ".bias", "ffn_gate_inp.weight", "position_embd.weight", "attn_sinks.weight")

# -------------------------------------------------------------------------------------------------
# Pre-tokenizers: tegaki's pattern name -> llama.cpp's name for the same regex.
#   gpt2  GPT-2's regex itself.
#   gpt4  llama.cpp's "llama-bpe" (Llama 3's regex) is GPT-4's, written without possessive
#         quantifiers -- the same splits -- except one branch: GPT-4's `\s++$` keeps whitespace at
#         the very end of a text in one chunk, where Llama 3's cuts it after its last line break.
#         Llama 3's tokenizer also takes a chunk that is itself a token as that token, without
#         merging ("ignore_merges"). Both differences change ids only for a vocabulary with a token
#         that joins a line break to the blanks after it, or a token that BPE never produces from its
#         own text; `_check_llama_bpe` looks for them and refuses such a vocabulary.
# -------------------------------------------------------------------------------------------------
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "llama-bpe"}

# GGUF token types (gguf.TokenType): a normal token, a special one, a row no token uses.
NORMAL, CONTROL, UNUSED = 1, 3, 5


@dataclass
class Vocabulary:
    """What GGUF's tokenizer keys hold for a byte-level BPE."""

    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]  # by id, in GPT-2's printable-byte spelling ("Ġthe")
    types: list[int]
    merges: list[str]  # "Ġ t", earliest first
    eot_id: int | None  # <|endoftext|>: where a text starts and ends


def gguf_module():
    """The `gguf` package (llama.cpp's writer), imported on first use: it is an optional extra."""
    try:
        import gguf
    except ImportError:
        raise TegakiError(
            "writing a .gguf file needs the gguf package (llama.cpp's writer): pip install -e '.[gguf]'"
        ) from None
    return gguf


def export_gguf(model_ref: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16") -> Path:
    """Load a tegaki run (a LoRA fine-tune comes merged), a transformers folder or a hub id, and write
    it with its tokenizer and chat template as one GGUF file."""
    out = _claim_file(out)
    source = ModelSource(model_ref)
    model, tokenizer = source.load(), source.tokenizer
    is_run = Path(model_ref).expanduser().joinpath("run.json").is_file()
    template = find_chat_template(local_template_folders(model_ref), tokenizer, tegaki_run=is_run)
    name = Path(model_ref).expanduser().resolve().name if Path(model_ref).expanduser().is_dir() else str(model_ref)
    return write_gguf(model, tokenizer, out, outtype, template=template, name=name)


def write_gguf(model, tokenizer, out: str | os.PathLike, outtype: str = "f16", template=None, name: str = "") -> Path:
    """Write `model` and `tokenizer` (and the chat template, when given) to `out` in one GGUF file,
    atomically. Refuses, before writing anything, what llama.cpp would compute otherwise."""
    gguf = gguf_module()
    if outtype not in OUTTYPES:
        raise TegakiError(f"--outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    out = _claim_file(out)
    config = model.config
    family = gguf_family(config)
    vocab = bpe_vocabulary(tokenizer, config.vocab_size)
    tensors = list(gguf_tensors(model, family))
    arch = ARCHITECTURES[family]

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(name or arch)
        writer.add_file_type(_file_type(gguf, outtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, config, family)
        _add_tokenizer(writer, vocab, tokenizer, template)
        for tensor_name, tensor in tensors:
            data, qtype = _encoded(gguf, tensor_name, tensor, outtype)
            writer.add_tensor(tensor_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    try:
        atomic_write(out, write)
    except TegakiError:
        raise
    except Exception as e:  # noqa: BLE001 - a full disk inside the writer
        explained = explain_write_error(out, e)
        if explained is None:
            raise
        raise explained from None
    return out


def _claim_file(out: str | os.PathLike) -> Path:
    """The path to write, refused (before the model is loaded) when something is already there."""
    out = Path(out).expanduser()
    if out.suffix != ".gguf":
        raise TegakiError(f"{out}: a GGUF file's name ends in .gguf")
    if out.exists():
        raise TegakiError(f"{out} already exists; nothing was written. Remove it, or choose another name")
    if not out.parent.is_dir():
        raise TegakiError(f"{out.parent}: no such folder; create it first, or choose another path")
    return out


# -------------------------------------------------------------------------------------------------
# The model: which architecture, its keys, its tensors
# -------------------------------------------------------------------------------------------------


def gguf_family(config: ModelConfig) -> str:
    """The family whose llama.cpp architecture computes what `config` does, or a TegakiError that
    names what cannot travel. transformers' limits first (hf.family_for_config), then llama.cpp's."""
    try:
        family = family_for_config(config).name
    except TegakiError as e:
        raise TegakiError(str(e).replace("has no transformers equivalent", "has no llama.cpp equivalent")) from None

    def refuse(what: str, why: str) -> None:
        raise TegakiError(f"cannot export to GGUF: {what} ({why})")

    if family != "llama" and config.rope_scaling == "llama3":
        refuse(f"rope_scaling='llama3' in {family}", "only llama.cpp's Llama reads per-frequency factors")
    if family != "llama" and config.rope_scaling == "yarn":  # llama.cpp's own YaRN, which rounds the ramp
        if not config.rope_truncate:
            refuse(
                f"rope_scaling='yarn' with rope_truncate=False in {family}",
                "llama.cpp's YaRN rounds the ramp's ends (truncate=True); only its Llama reads exact frequencies",
            )
        if config.rope_attention_factor is not None:
            refuse("rope_attention_factor", "llama.cpp's YaRN scales attention by 0.1 ln(factor) + 1 only")
    if family == "qwen3" and config.sliding_window is not None:
        refuse("sliding_window with qk_norm", "llama.cpp's Qwen3 attends to the whole context")
    if family == "qwen3" and (config.qkv_bias or config.attn_out_bias):
        refuse("qkv_bias / attn_out_bias with qk_norm", "llama.cpp's Qwen3 has no attention biases")
    if family == "gpt_oss":
        alternating = ["sliding" if i % 2 == 0 else "full" for i in range(config.n_layer)]
        layers = [("sliding" if config.window(i) else "full") for i in range(config.n_layer)]
        if layers != alternating:
            refuse(
                f"layer_types={layers}",
                "llama.cpp's GPT-OSS slides its window on even layers and sees everything on odd ones",
            )
        if (config.moe_swiglu_limit, config.moe_swiglu_alpha) != (7.0, 1.702):
            refuse(
                f"moe_swiglu_limit={config.moe_swiglu_limit}, moe_swiglu_alpha={config.moe_swiglu_alpha}",
                "llama.cpp's GPT-OSS experts clamp at 7 with slope 1.702, as released",
            )
    return family


def _add_hyperparameters(writer, config: ModelConfig, family: str) -> None:
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head)
    writer.add_vocab_size(config.vocab_size)
    if family == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
        return
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    base = config.rope_theta
    if config.rope_scaling == "ntk":  # static NTK is plain RoPE with a larger base (rope.py's formula)
        base = config.rope_theta * config.rope_factor ** (config.head_dim / (config.head_dim - 2))
    writer.add_rope_freq_base(base)
    if config.rope_scaling == "linear":
        gguf = gguf_module()
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.rope_factor)
    if config.rope_scaling == "yarn" and family != "llama":  # Llama's travels in rope_freqs
        gguf = gguf_module()
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(config.rope_factor)
        writer.add_rope_scaling_orig_ctx_len(config.rope_original_max_len)
        writer.add_rope_scaling_yarn_beta_fast(config.rope_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(config.rope_beta_slow)
    if family == "gpt_oss":
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.n_experts_per_tok)
        writer.add_expert_feed_forward_length(config.intermediate_size)
        writer.add_sliding_window(config.sliding_window)


def gguf_tensors(model, family: str):
    """(GGUF name, float32 tensor) for every tensor of the file, in the table's order."""
    config = model.config
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for layer in _layers(TENSORS[family], config.n_layer):
        source, target, kind = layer
        if source not in ours:
            continue
        if target == "output.weight" and config.tie_embeddings and family != "gpt_oss":
            continue  # llama.cpp reads the embedding as the head when `output` is absent
        tensor = _converted(kind, ours[source], config)
        if kind == "q_pairs" and config.rope_scaling == "yarn":
            # YaRN scales cos and sin by an attention factor f, so every query-key product by f^2:
            # the same as queries f^2 larger, which llama.cpp computes without knowing of f.
            tensor = tensor * rope_frequencies(config)[1] ** 2
        yield target, tensor
    if family == "llama" and config.rope_scaling in ("llama3", "yarn"):
        yield "rope_freqs.weight", _rope_factors(config)


def _layers(table, n_layer: int):
    for source, target, kind in table:
        if "{i}" in source:
            yield from ((source.format(i=i), target.format(i=i), kind) for i in range(n_layer))
        else:
            yield source, target, kind


def _converted(kind: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    if kind == "same":
        return t
    if kind in ("q", "k", "v", "q_pairs", "k_pairs"):
        q, k, v = t.split(config.qkv_sizes, dim=0)  # rows: H*D queries, then K*D keys, K*D values
        part = {"q": q, "k": k, "v": v}[kind[0]]
        if kind.endswith("_pairs"):
            heads = config.n_head if kind[0] == "q" else config.n_kv_head
            part = _halves_to_pairs(part, heads)
        return part.contiguous()
    if kind in ("gate_exps", "up_exps"):
        columns = t[..., 0::2] if kind == "gate_exps" else t[..., 1::2]  # (E, C, I) or, a bias, (E, I)
        return (columns.transpose(1, 2) if columns.dim() == 3 else columns).contiguous()
    if kind == "down_exps":
        return t.transpose(1, 2).contiguous()  # (E, I, C) -> (E, C, I)
    raise ValueError(kind)


def _halves_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from (first half, second half) to interleaved pairs: the rotation
    pairs row j with row j + D/2 in tegaki and rows 2j, 2j+1 in llama.cpp's Llama."""
    D = w.shape[0] // heads
    return w.reshape(heads, 2, D // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rope_factors(config: ModelConfig) -> torch.Tensor:
    """Llama 3's or YaRN's frequencies as llama.cpp's Llama reads them (`rope_freqs`): per frequency,
    the divisor of the plain one. tegaki's own rope.py computes them, so they are its, exactly."""
    plain = rope_frequencies(config.replace(rope_scaling="none"))[0]
    scaled = rope_frequencies(config)[0]
    return (plain / scaled).float()


def _file_type(gguf, outtype: str):
    kinds = gguf.LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "bf16": kinds.MOSTLY_BF16, "q8_0": kinds.MOSTLY_Q8_0}[
        outtype
    ]


def _encoded(gguf, name: str, tensor: torch.Tensor, outtype: str):
    """(the bytes or array the writer takes, their GGML type)."""
    types = gguf.GGMLQuantizationType
    data = tensor.numpy().astype(np.float32)
    if data.ndim <= 1 or name.endswith(_ALWAYS_F32) or name == "rope_freqs.weight":
        return data, types.F32
    qtype = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[outtype]
    if qtype == types.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[types.Q8_0][0] != 0:
        qtype = types.F16  # rows that do not split into blocks of 32 stay in f16, as llama.cpp's converter does
    return gguf.quants.quantize(data, qtype), qtype


# -------------------------------------------------------------------------------------------------
# The tokenizer
# -------------------------------------------------------------------------------------------------


def bpe_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """The tokenizer as GGUF's keys hold it: every id below the model's vocab_size (rows no token
    uses become "[PAD<id>]"), the merges, and the llama.cpp pre-tokenizer that splits text as ours."""
    if not isinstance(tokenizer, BytePairTokenizer):
        raise TegakiError(
            f"cannot export to GGUF: {tokenizer.name} is a {tokenizer.kind} tokenizer. tegaki's SentencePiece "
            "tokenizers keep every text exactly (a literal '▁' goes as its bytes, no space is added, nothing "
            "is normalized), and llama.cpp's SentencePiece tokenizer would split such text differently; "
            "train a byte-level BPE (tegaki tokenizer train --kind bpe) to run the model in llama.cpp"
        )
    pattern_name = next((n for n, p in PATTERNS.items() if p == tokenizer.pattern), None)
    if pattern_name not in PRE_TOKENIZERS:
        raise TegakiError(
            f"cannot export to GGUF: {tokenizer.name} pre-tokenizes with its own regex {tokenizer.pattern!r}; "
            f"llama.cpp knows no pre-tokenizer with exactly that regex (tegaki maps {', '.join(PRE_TOKENIZERS)})"
        )
    if tokenizer.vocab_size > vocab_size:
        raise TegakiError(
            f"cannot export to GGUF: the tokenizer has {tokenizer.vocab_size} ids, the model only {vocab_size} rows"
        )
    if pattern_name == "gpt4":
        _check_llama_bpe(tokenizer)
    specials = set(tokenizer.special_tokens.values())
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(tokenizer.vocab[i].decode("utf-8"))
            types.append(CONTROL)
        elif i in tokenizer.vocab:
            tokens.append(token_to_str(tokenizer.vocab[i]))
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    ranked = sorted(tokenizer.merges.items(), key=lambda item: item[1])  # the id made is the merge's rank
    merges = [f"{tokens[left]} {tokens[right]}" for (left, right), _ in ranked]
    return Vocabulary(PRE_TOKENIZERS[pattern_name], tokens, types, merges, tokenizer.eot_id)


_LINE_BREAK_THEN_BLANK = regex.compile(rb"[\r\n][\t\x0b\x0c \xc2\xe1\xe2\xe3]")  # a blank's first byte


def _check_llama_bpe(tokenizer: BytePairTokenizer) -> None:
    """Refuse a GPT-4-pattern vocabulary on which llama.cpp's "llama-bpe" would give other ids (see
    PRE_TOKENIZERS): a token joining a line break to a following blank, or a token that is a whole
    pre-tokenizer chunk but that BPE does not produce from its own bytes."""
    specials = set(tokenizer.special_tokens.values())
    for i, token in sorted(tokenizer.vocab.items()):
        if i in specials or len(token) < 2:
            continue
        if _LINE_BREAK_THEN_BLANK.search(token):
            raise TegakiError(
                f"cannot export to GGUF: token {i} ({token!r}) joins a line break to the blank after it, "
                "which llama.cpp's llama-bpe pre-tokenizer keeps apart; no llama.cpp pre-tokenizer splits "
                "text exactly as this tokenizer's"
            )
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue  # part of a character: never a whole chunk
        if tokenizer.compiled_pattern.findall(text) == [text] and tokenizer.encode_chunk_fast(token) != [i]:
            raise TegakiError(
                f"cannot export to GGUF: token {i} ({text!r}) is not what BPE makes of its own text, and "
                "llama.cpp's llama-bpe tokenizer takes such a chunk as that token; no llama.cpp "
                "pre-tokenizer gives this tokenizer's ids"
            )


def _add_tokenizer(writer, vocab: Vocabulary, tokenizer, template) -> None:
    writer.add_tokenizer_model("gpt2")  # GGUF's name for a byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.eot_id is not None:
        writer.add_bos_token_id(vocab.eot_id)
        writer.add_eos_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)  # tegaki's tokenizers add nothing to a text
    writer.add_add_eos_token(False)
    if template is not None:
        writer.add_chat_template(template.source)
        ends = sorted(template.stop_ids(tokenizer) - {vocab.eot_id})
        if ends:  # ChatML's <|im_end|>: where a reply ends
            writer.add_eot_token_id(ends[0])
