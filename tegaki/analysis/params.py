"""Where a model's parameters live, part by part: what `tegaki params NAME` prints.

The model is built on PyTorch's "meta" device: every tensor has a shape and no storage, so even
`tegaki params gpt-oss-120b` allocates nothing. The breakdown walks the real module tree of
`tegaki.model.GPT`, so it cannot drift from the model: every parameter lands in exactly one part and
the parts always sum to `model.num_parameters()`.

    tegaki params gpt2                          124,439,808
    tegaki params gpt2 --set qkv_bias=false     124,412,160
    tegaki params gpt-oss-20b                   20,914,757,184 total, 3,608,307,264 active per token
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tegaki.config import PRESETS, ModelConfig
from tegaki.device import LAYER_OBJECT_BYTES, check_fits
from tegaki.errors import TegakiError
from tegaki.load import ModelSource
from tegaki.model import GPT

# Per-block parameter names (relative to `blocks.{i}.`, without .weight/.bias) -> (label, group).
# Anything model.py grows later and this table does not know still gets counted, under its own name.
BLOCK_PARTS: dict[str, tuple[str, str]] = {
    "ln_1": ("norm before attention (ln_1)", "norm"),
    "attn.qkv": ("attention query, key, value  qkv", "attention"),
    "attn.o_proj": ("attention output o_proj", "attention"),
    "attn.q_norm": ("QK-norm on queries q_norm", "attention"),
    "attn.k_norm": ("QK-norm on keys    k_norm", "attention"),
    "attn.sinks": ("attention sinks (1 logit per head)", "attention"),
    "attn.gate_proj": ("attention output gate gate_proj", "attention"),
    "attn.scale": ("learnable attention scale", "attention"),
    "ln_2": ("norm before MLP (ln_2)", "norm"),
    "mlp.fc": ("MLP up      fc   (GELU)", "mlp"),
    "mlp.proj": ("MLP down    proj", "mlp"),
    "mlp.gate": ("MLP gate    gate (SwiGLU)", "mlp"),
    "mlp.up": ("MLP up      up", "mlp"),
    "mlp.down": ("MLP down    down", "mlp"),
    "mlp.router": ("MoE router", "router"),
    "mlp.w_in": ("MoE experts: gate+up w_in", "experts"),
    "mlp.b_in": ("MoE experts: gate+up bias b_in", "experts"),
    "mlp.w_out": ("MoE experts: down w_out", "experts"),
    "mlp.b_out": ("MoE experts: down bias b_out", "experts"),
}


# -------------------------------------------------------------------------------------------------
# Counting
# -------------------------------------------------------------------------------------------------


def build_meta_model(config: ModelConfig):
    """The model with shapes and no storage, whatever its size. Its modules still take memory as
    Python objects: a billion layers are refused, with the figure."""
    check_fits(
        config.n_layer, LAYER_OBJECT_BYTES, "cpu", f"describing a model of {config.n_layer:,} layers", items="layers"
    )
    with torch.device("meta"):
        return GPT(config)


def _module_key(param_name: str) -> str:
    """'attn.qkv.weight' -> 'attn.qkv'; 'attn.sinks' -> 'attn.sinks'."""
    head, _, last = param_name.rpartition(".")
    return head if last in ("weight", "bias") and head else param_name


def _shape_text(shapes: list[tuple[int, ...]]) -> str:
    return " + ".join("x".join(f"{d:,}" for d in s) for s in shapes)


def _walk(model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every parameter once: the top-level ones as they are, the blocks' summed over all layers
    (one row per part of a block, in BLOCK_PARTS' order)."""
    seen: set[int] = set()  # a tied LM head is the embedding tensor itself: count it once
    top_rows: list[dict[str, Any]] = []
    block_rows: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not name.startswith("blocks."):
            top_rows.append(dict(name=name, count=p.numel(), shapes=[list(p.shape)]))
            continue
        key = _module_key(name.split(".", 2)[2])  # drop "blocks.{i}."
        label, group = BLOCK_PARTS.get(key, (key, "other"))
        row = block_rows.setdefault(key, dict(name=key, label=label, group=group, count=0, shapes=[]))
        row["count"] += p.numel()
        if len(row["shapes"]) < 2 and list(p.shape) not in row["shapes"]:
            row["shapes"].append(list(p.shape))
    order = list(BLOCK_PARTS)
    in_order = sorted(block_rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    return top_rows, in_order


def _parts(config: ModelConfig, top_rows: list[dict], per_block: list[dict], tied: bool) -> list[dict[str, Any]]:
    """Rows covering the whole model, in reading order: embeddings, blocks, final norm, head."""

    def top(name: str) -> int:
        return sum(r["count"] for r in top_rows if r["name"] == name)

    def part(name: str, label: str, group: str, count: int, shapes: list) -> dict[str, Any]:
        return dict(name=name, label=label, group=group, count=count, shapes=shapes)

    table = [config.vocab_size, config.n_embd]
    parts = [part("wte.weight", "token embedding (wte)", "embedding", top("wte.weight"), [table])]
    if config.pos_embedding == "learned":
        positions = [[config.block_size, config.n_embd]]
        parts.append(part("wpe.weight", "position embedding (wpe)", "embedding", top("wpe.weight"), positions))
    for row in per_block:
        label = f"{row['label']}  x {config.n_layer}"
        parts.append(part(f"blocks.*.{row['name']}", label, row["group"], row["all_layers"], row["shapes"]))
    if config.final_norm:
        final_norm = sum(r["count"] for r in top_rows if r["name"].startswith("ln_f."))
        parts.append(part("ln_f", "final norm (ln_f)", "norm", final_norm, [[config.n_embd]]))
    head_label = "LM head" + (" (tied: shares wte)" if tied else "")
    parts.append(part("lm_head.weight", head_label, "head", 0 if tied else top("lm_head.weight"), [table]))
    known = {"wte.weight", "wpe.weight", "lm_head.weight"}
    for r in top_rows:  # anything else at the top level (a module this table does not know) is still counted
        if r["name"] not in known and not r["name"].startswith("ln_f."):
            parts.append(dict(r, label=r["name"], group="other"))
    return parts


def _active(config: ModelConfig, total: int, parts: list[dict], tied: bool) -> int | None:
    """MoE: the parameters one token uses. Every non-expert weight except the input table (a lookup
    reads one row of it), plus k of the E experts. A tied head still does its full matmul, so it
    stays in. Dense: None."""
    if config.mlp != "moe":
        return None
    experts = sum(p["count"] for p in parts if p["group"] == "experts")
    embedding_in = 0 if tied else next(p["count"] for p in parts if p["name"] == "wte.weight")
    return total - embedding_in - experts + experts * config.n_experts_per_tok // config.n_experts


def _memory(n: int | None) -> dict[str, int] | None:
    return None if n is None else {"fp32": n * 4, "bf16": n * 2, "int8": n}


def count_parameters(config: ModelConfig) -> dict[str, Any]:
    """The breakdown of `GPT(config)` as a dict (what `--json` prints).

    Keys: total, active (MoE: parameters used per token; dense: None), embedding, per_block (rows
    for one block), n_layer, parts (rows covering the whole model, which sum to total), and memory
    (weight bytes in fp32/bf16/int8). A row is {name, label, group, count, shapes, share}.
    """
    model = build_meta_model(config)
    total = model.num_parameters()
    tied = model.lm_head.weight is model.wte.weight
    top_rows, block_rows = _walk(model)
    per_block = [dict(row, count=row["count"] // config.n_layer, all_layers=row["count"]) for row in block_rows]
    parts = _parts(config, top_rows, per_block, tied)
    assert sum(p["count"] for p in parts) == total, "the breakdown lost a parameter"
    for row in parts:
        row["share"] = row["count"] / total
    for row in per_block:
        row["share"] = row["all_layers"] / total
    active = _active(config, total, parts, tied)
    return dict(
        total=total,
        active=active,
        tied_embeddings=tied,
        n_layer=config.n_layer,
        per_block_total=sum(r["count"] for r in per_block),
        per_block=per_block,
        parts=parts,
        memory_bytes=_memory(total),
        active_memory_bytes=_memory(active),
    )


# -------------------------------------------------------------------------------------------------
# Which config a NAME means
# -------------------------------------------------------------------------------------------------


def resolve_config(name: str) -> ModelConfig:
    """A preset name, a tegaki run folder (run.json) or a transformers folder (config.json).

    Only the config is read: no weights are loaded, whatever the model's size.
    """
    if name in PRESETS:
        return ModelConfig.preset(name)
    if Path(name).expanduser().is_dir():
        return ModelSource(name).config  # run.json's, or config.json's
    if any(sep in name for sep in ("/", "\\", ".")):
        raise TegakiError(
            f"{name}: no such preset or folder. Pass a preset, a run folder (with run.json) or a "
            "transformers folder (with config.json); a hub model: download it first."
        )
    return ModelConfig.preset(name)  # raises TegakiError listing the known presets


# -------------------------------------------------------------------------------------------------
# Printing
# -------------------------------------------------------------------------------------------------


def _bytes_text(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n} B"


def _shape_column(config: ModelConfig, row: dict) -> str:
    return _shape_text([tuple(s) for s in row["shapes"]])


def format_report(title: str, config: ModelConfig, info: dict) -> str:
    c = config
    lines = [
        f"{title}: {c.n_layer} layers, n_embd {c.n_embd:,}, {c.n_head} heads x head_dim {c.head_dim}"
        + (f", {c.n_kv_head} KV heads" if c.n_kv_head != c.n_head else "")
        + f", MLP {c.mlp} {c.intermediate_size:,}"
        + (f", {c.n_experts} experts (top {c.n_experts_per_tok})" if c.mlp == "moe" else "")
        + f", vocab {c.vocab_size:,}, context {c.block_size:,}",
        "",
    ]
    w_label, w_shape, w_num = 44, 24, 16
    header = f"{'part':<{w_label}}{'shape':>{w_shape}}{'parameters':>{w_num}}{'share':>8}"
    lines += [header, "-" * len(header)]

    def row(label: str, shape: str, count: int | str, share: float | None) -> str:
        num = f"{count:,}" if isinstance(count, int) else count
        pct = f"{100 * share:.1f}%" if share is not None else ""
        return f"{label:<{w_label}}{shape:>{w_shape}}{num:>{w_num}}{pct:>8}"

    parts = {p["name"]: p for p in info["parts"]}
    for key in ("wte.weight", "wpe.weight"):
        if key in parts:
            p = parts[key]
            lines.append(row(p["label"], _shape_column(c, p), p["count"], p["share"]))
    lines.append(f"per block (the same in each of the {c.n_layer}; share = all {c.n_layer} together):")
    for r in info["per_block"]:
        lines.append(row("  " + r["label"], _shape_column(c, r), r["count"], r["share"]))
    lines.append(row("  one block", "", info["per_block_total"], None))
    all_blocks = info["per_block_total"] * c.n_layer
    lines.append(row(f"{c.n_layer} blocks", "", all_blocks, all_blocks / info["total"]))
    for key in ("ln_f", "lm_head.weight"):
        if key in parts:
            p = parts[key]
            lines.append(row(p["label"], _shape_column(c, p), p["count"], p["share"]))
    for p in info["parts"]:
        if p["group"] == "other" and not p["name"].startswith("blocks."):
            lines.append(row(p["label"], _shape_column(c, p), p["count"], p["share"]))
    lines.append("-" * len(header))
    lines.append(row("total", "", info["total"], 1.0))
    if info["active"] is not None:
        lines.append(
            row(
                f"active per token ({c.n_experts_per_tok} of {c.n_experts} experts)",
                "",
                info["active"],
                info["active"] / info["total"],
            )
        )
    lines.append("")
    mem = info["memory_bytes"]
    lines.append("weight memory: " + ", ".join(f"{k} {_bytes_text(v)}" for k, v in mem.items()))
    if info["active_memory_bytes"]:
        amem = info["active_memory_bytes"]
        lines.append("read per token (active): " + ", ".join(f"{k} {_bytes_text(v)}" for k, v in amem.items()))
    return "\n".join(lines)
