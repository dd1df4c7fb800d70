"""One forward pass, step by step, for one prompt: what `tegaki trace "Hello, I am"` shows.

The five steps of `tegaki/model.py`, watched from the outside with forward hooks (the model is not
changed to be watched):

  1. text -> token ids                           the tokenizer
  2. ids -> vectors                              `GPT.wte` (+ `GPT.wpe` for learned positions)
  3. per block: attention, then MLP              `Block.attn`, `Block.mlp`, each added to the stream
  4. the final norm                              `GPT.ln_f`
  5. vectors -> logits -> next-token probabilities   `GPT.lm_head`, softmax

The attention pattern of one layer is read from inside that layer's written-out path
(`Attention._attend_written_out`): for the traced pass the model runs with `attn_impl="manual"`,
and a hook on the layer's `attn_dropout` (an identity at inference) receives the softmax weights
exactly as the model used them -- masks, sliding window and sinks included. The fused path computes
the same numbers (tests/test_model.py proves it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.load import from_pretrained, tokenizer_for
from tegaki.model import GPT
from tegaki.tokenizer import load as load_tokenizer

# -------------------------------------------------------------------------------------------------
# Loading what to trace
# -------------------------------------------------------------------------------------------------

PRESET_TOKENIZER = "gpt2"  # the tokenizer a preset's random weights read, unless another is named


def load_model_and_tokenizer(
    model: str | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    seed: int = 0,
):
    """(model in eval mode, tokenizer, description). Exactly one of model/preset.

    A preset gets random weights (seeded): the shapes and the mechanics are real, the words are not.
    Its vocabulary is resized to the tokenizer's when they differ, so every id has a row.
    """
    if (model is None) == (preset is None):
        raise TegakiError("give either --model PATH (a run or transformers folder) or --preset NAME (random weights)")
    if preset is not None:
        tok = load_tokenizer(tokenizer or PRESET_TOKENIZER)
        config = ModelConfig.preset(preset)
        if overrides:
            config = config.with_overrides(overrides)
        note = ""
        if config.vocab_size != tok.vocab_size:
            note = f" (vocab_size {config.vocab_size:,} -> {tok.vocab_size:,} to fit the tokenizer)"
            config = config.replace(vocab_size=tok.vocab_size)
        torch.manual_seed(seed)
        net = GPT(config).eval()
        return net, tok, f"preset {preset} with random weights (seed {seed}){note}"
    net = from_pretrained(model).eval()
    if overrides:
        raise TegakiError("--set changes a preset's config; a trained model's shapes are fixed by its weights")
    tok = load_tokenizer(tokenizer) if tokenizer else tokenizer_for(model)
    return net, tok, f"model {model}"


# -------------------------------------------------------------------------------------------------
# Watching a forward pass
# -------------------------------------------------------------------------------------------------


@dataclass
class Capture:
    """What the hooks saw during one forward pass (batch of one)."""

    token_embedding: torch.Tensor | None = None  # (1, T, C)
    position_embedding: torch.Tensor | None = None  # (1, T, C)
    block_inputs: list[torch.Tensor] = field(default_factory=list)  # each (1, T, C)
    attn_outputs: list[torch.Tensor] = field(default_factory=list)  # each (1, T, C)
    mlp_outputs: list[torch.Tensor] = field(default_factory=list)  # each (1, T, C)
    block_outputs: list[torch.Tensor] = field(default_factory=list)  # each (1, T, C)
    final_norm: torch.Tensor | None = None  # (1, T, C)
    attention: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (1, H, T, T)
    logits: torch.Tensor | None = None  # (1, T, V)


@torch.no_grad()
def capture(model, ids: list[int] | torch.Tensor, attention_layers: list[int] = ()) -> Capture:
    """Run `model` on one sequence and record every intermediate the trace reports."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device).reshape(1, -1)  # (1, T)
    if ids.shape[1] == 0:
        raise TegakiError("the prompt is empty: there is nothing to trace")
    if ids.shape[1] > model.config.block_size:
        raise TegakiError(f"the prompt has {ids.shape[1]} tokens; the model's context is {model.config.block_size}")
    for layer in attention_layers:
        if not 0 <= layer < model.config.n_layer:
            raise TegakiError(f"--layer {layer}: the model has layers 0..{model.config.n_layer - 1}")
    cap = Capture()
    handles = []

    def keep(store, index=None):
        def hook(module, inputs, output):
            value = output.detach().float().clone()
            if index is None:
                store.append(value)
            else:
                store[index] = value

        return hook

    def keep_input(store):
        def hook(module, args):
            store.append(args[0].detach().float().clone())

        return hook

    def setter(name):
        def hook(module, inputs, output):
            setattr(cap, name, output.detach().float().clone())

        return hook

    handles.append(model.wte.register_forward_hook(setter("token_embedding")))
    if hasattr(model, "wpe"):
        handles.append(model.wpe.register_forward_hook(setter("position_embedding")))
    for block in model.blocks:
        handles.append(block.register_forward_pre_hook(keep_input(cap.block_inputs)))
        handles.append(block.attn.register_forward_hook(keep(cap.attn_outputs)))
        handles.append(block.mlp.register_forward_hook(keep(cap.mlp_outputs)))
        handles.append(block.register_forward_hook(keep(cap.block_outputs)))
    for layer in attention_layers:
        # Called as attn_dropout(att) with the softmax weights (B, H, T, S) in the written-out path.
        handles.append(model.blocks[layer].attn.attn_dropout.register_forward_hook(keep(cap.attention, layer)))
    handles.append(model.ln_f.register_forward_hook(setter("final_norm")))
    try:
        with model.attention_as("manual"):
            cap.logits = model(ids).detach().float()  # (1, T, V)
    finally:
        for h in handles:
            h.remove()
    missing = [layer for layer in attention_layers if layer not in cap.attention]
    if missing:  # the hooks sit on attn_dropout: a written-out path that skips it shows nothing
        raise RuntimeError(f"could not capture the attention weights of layer(s) {missing}")
    return cap


def token_text(tokenizer, token_id: int) -> str:
    """One token as text; a token that is only part of a character (byte-level BPE splits UTF-8)
    shows its bytes, e.g. <e3 81>, instead of a replacement character."""
    text = tokenizer.decode([token_id])
    if "\ufffd" in text and hasattr(tokenizer, "token_bytes"):
        raw = tokenizer.token_bytes(token_id)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "<" + " ".join(f"{b:02x}" for b in raw) + ">"
    return text


def _norm(t: torch.Tensor) -> float:
    """Mean length of the per-token vectors in t (1, T, C)."""
    return float(t.norm(dim=-1).mean())


def previous_token_scores(att: torch.Tensor) -> torch.Tensor:
    """(H,): per head, the mean weight a query puts on the token just before it. A head near 1 is a
    *previous-token head*; every query but the first has a previous token (zeros for one token)."""
    H, T, _ = att.shape  # (H, T, T): row = query, column = key
    if T < 2:
        return torch.zeros(H)
    return att.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=-1)  # the sub-diagonal (H, T-1) -> (H,)


def _vector(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "mean_norm": _norm(t)}


def _embedding(cap: Capture, cfg, T: int) -> dict[str, Any]:
    """Step 2: the token embedding, the learned positions if any, and their sum (block 0's input)."""
    emb: dict[str, Any] = {"token_embedding": _vector(cap.token_embedding), "positions": cfg.pos_embedding}
    if cap.position_embedding is not None:
        emb["position_embedding"] = _vector(cap.position_embedding.reshape(1, T, -1))
    emb["sum"] = _vector(cap.block_inputs[0])
    return emb


def _block(cap: Capture, cfg, i: int) -> dict[str, Any]:
    """Steps 3-4 for block i: what attention and the MLP each add to the residual stream."""
    a, m, x_in, x_out = cap.attn_outputs[i], cap.mlp_outputs[i], cap.block_inputs[i], cap.block_outputs[i]
    a_norm, m_norm = _norm(a), _norm(m)
    return {
        "layer": i,
        "kind": "sliding" if cfg.window(i) else "full",
        "attention": _vector(a),
        "mlp": _vector(m),
        # How much of the block's update came from attention vs the MLP (by vector length)...
        "attention_share": a_norm / (a_norm + m_norm) if a_norm + m_norm > 0 else 0.0,
        # ...and how large the update is next to the residual stream it is added to.
        "update_over_residual": _norm(x_out - x_in) / max(_norm(x_in), 1e-12),
        "residual_after": _vector(x_out),
    }


def _attention_pattern(cap: Capture, cfg, layer: int, head: int | None) -> dict[str, Any]:
    """One head's weights in `layer`; head None picks the best previous-token head."""
    att = cap.attention[layer][0]  # (H, T, T)
    scores = previous_token_scores(att)  # (H,)
    chosen = "given" if head is not None else "the highest previous-token score"
    head = int(scores.argmax()) if head is None else head
    return {
        "layer": layer,
        "head": head,
        "head_chosen_by": chosen,
        "previous_token_scores": [round(float(x), 4) for x in scores],
        "shape": list(cap.attention[layer].shape),
        "weights": [[round(float(w), 6) for w in row] for row in att[head]],  # (T, T): row = query
        "sink_mass": [round(1.0 - float(s), 6) for s in att[head].sum(dim=-1)] if cfg.attn_sinks else None,
    }


def _next_tokens(cap: Capture, tokenizer, top_k: int) -> list[dict[str, Any]]:
    """Step 5: the most likely tokens after the prompt."""
    probs = torch.softmax(cap.logits[0, -1], dim=-1)  # (V,): the guess for the token after the prompt
    top = probs.topk(min(top_k, probs.numel()))
    return [
        {"id": int(i), "text": token_text(tokenizer, int(i)), "prob": float(p)} for p, i in zip(top.values, top.indices)
    ]


def trace(model, tokenizer, prompt: str, layer: int = 0, head: int | None = None, top_k: int = 10) -> dict[str, Any]:
    """Everything `tegaki trace` prints, as a dict (what --json prints).

    head None: the head of `layer` with the highest previous-token score -- a rule, not a lucky
    index, so the same story can be told of a model trained on another machine."""
    cfg = model.config
    if head is not None and not 0 <= head < cfg.n_head:
        raise TegakiError(f"--head {head}: the model has heads 0..{cfg.n_head - 1}")
    ids = tokenizer.encode(prompt)
    if ids and max(ids) >= cfg.vocab_size:
        raise TegakiError(f"token id {max(ids)} is outside the model's vocabulary ({cfg.vocab_size}); wrong tokenizer?")
    cap = capture(model, ids, attention_layers=[layer])
    config_keys = ("n_layer", "n_head", "n_embd", "vocab_size", "pos_embedding", "norm", "mlp", "attn_impl")
    return {
        "prompt": prompt,
        "config": {k: getattr(cfg, k) for k in config_keys},
        "tokens": [{"id": i, "text": token_text(tokenizer, i)} for i in ids],  # step 1
        "embedding": _embedding(cap, cfg, len(ids)),
        "blocks": [_block(cap, cfg, i) for i in range(cfg.n_layer)],
        "attention_pattern": _attention_pattern(cap, cfg, layer, head),
        "final_norm": _vector(cap.final_norm) if cfg.final_norm else None,
        "logits": {"shape": list(cap.logits.shape)},
        "next_tokens": _next_tokens(cap, tokenizer, top_k),
    }


# -------------------------------------------------------------------------------------------------
# Printing
# -------------------------------------------------------------------------------------------------


INDENT = " " * 10  # the report's lines under each "step N" heading


def _shape(s: list[int]) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _vector_line(label: str, vector: dict[str, Any], width: int = 40) -> str:
    """A named vector's shape and mean length, in the columns of steps 2 and 4."""
    return f"{label:<{width}}{_shape(vector['shape']):<16} mean |v| {vector['mean_norm']:.4f}"


def format_trace(r: dict[str, Any], description: str = "") -> str:
    cfg = r["config"]
    lines = [f"tracing {description}" if description else "tracing", f"prompt: {r['prompt']!r}", ""]
    lines.append(f"step 1  text -> {len(r['tokens'])} tokens")
    for pos, t in enumerate(r["tokens"]):
        lines.append(f"          {pos:>3}  id {t['id']:>6}  {t['text']!r}")
    e = r["embedding"]
    lines.append("")
    lines.append("step 2  token ids -> vectors")
    lines.append(_vector_line(INDENT + "token embedding wte[ids]", e["token_embedding"]))
    if "position_embedding" in e:
        lines.append(_vector_line(INDENT + "position embedding wpe[pos]", e["position_embedding"]))
        lines.append(_vector_line(INDENT + "sum = residual stream x", e["sum"]))
    elif e["positions"] == "rope":
        lines.append("          positions: rotary (RoPE), applied to q and k inside attention; nothing is added here")
    else:
        lines.append("          positions: none (the causal mask alone tells tokens apart by what they can see)")
    lines.append("")
    lines.append(f"step 3  {cfg['n_layer']} blocks, each x = x + attn(norm(x)); x = x + mlp(norm(x))")
    lines.append(
        f"{INDENT}{'layer':>5} {'kind':<8}{'attn out |v|':>14}{'mlp out |v|':>13}{'attn share':>12}"
        f"{'|update|/|x|':>14}{'|x| after':>11}"
    )
    for b in r["blocks"]:
        lines.append(
            f"{INDENT}{b['layer']:>5} {b['kind']:<8}{b['attention']['mean_norm']:>14.4f}{b['mlp']['mean_norm']:>13.4f}"
            f"{100 * b['attention_share']:>11.1f}%{b['update_over_residual']:>14.3f}"
            f"{b['residual_after']['mean_norm']:>11.4f}"
        )
    block_shape = _shape(r["blocks"][0]["attention"]["shape"])
    lines.append(f"{INDENT}every output has shape {block_shape}: (batch, tokens, n_embd)")
    ap = r["attention_pattern"]
    lines.append("")
    scores = " ".join(f"{x:.2f}" for x in ap["previous_token_scores"])
    lines.append(f"{INDENT}previous-token score of each head of layer {ap['layer']} (mean weight on the token before):")
    lines.append(f"{INDENT}{scores}; head {ap['head']} shown ({ap['head_chosen_by']})")
    lines.append(
        f"{INDENT}attention of layer {ap['layer']}, head {ap['head']} "
        f"(weights {_shape(ap['shape'])}; row = query, column = key):"
    )
    labels = [t["text"] for t in r["tokens"]]
    width = min(max(len(repr(s)) for s in labels), 14)
    for q, row in enumerate(ap["weights"]):
        cells = " ".join(f"{w:4.2f}" if w >= 0.005 else "   ." for w in row)
        extra = f"  sink {ap['sink_mass'][q]:.2f}" if ap["sink_mass"] else ""
        lines.append(f"          {repr(labels[q])[:width]:>{width}} {cells}{extra}")
    lines.append("")
    if r["final_norm"]:
        lines.append(_vector_line("step 4  final norm ln_f", r["final_norm"], width=39))
    else:
        lines.append("step 4  final norm ln_f: none")
    lines.append("")
    lines.append(
        f"step 5  lm_head -> logits {_shape(r['logits']['shape'])}: one score per vocabulary entry, per position;"
    )
    lines.append(f"{INDENT}the last position's softmax is the next-token distribution. Top {len(r['next_tokens'])}:")
    for t in r["next_tokens"]:
        lines.append(f"          {100 * t['prob']:6.2f}%  id {t['id']:>6}  {t['text']!r}")
    return "\n".join(lines)
