"""The page's data: what the model does with a prompt, as JSON-ready dicts.

    next_tokens   the next-token probabilities, raw and as the sampling settings reshape them
    attention     every head of one layer: which earlier tokens each token reads (analysis.attention)
    logit_lens    the top guesses after each layer: the final norm and LM head applied to the residual
                  stream part-way up (nostalgebraist's "logit lens"), from analysis.trace's capture
    parameters    where the parameters live (analysis.params: the numbers `tegaki params` prints)
    trace         `tegaki trace --json`, as it is

Each function takes the model and runs on the engine's thread (`Engine.call`): the analysis code
hooks into the model while it runs, which must not happen beside a decoding step.
"""

from __future__ import annotations

import torch

from tegaki.analysis.attention import attention_maps
from tegaki.analysis.params import count_parameters
from tegaki.analysis.trace import capture, trace
from tegaki.errors import TegakiError
from tegaki.sampling import SamplingSettings, sampling_distribution
from tegaki.serve.engine import token_piece

MAX_BARS = 50
MAX_LENS_TOP = 5


def prompt_ids(model, tokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from end-of-text; a prompt past the context is
    refused with the numbers."""
    ids = tokenizer.encode(prompt)
    if not ids and getattr(tokenizer, "eot_id", None) is not None:
        ids = [tokenizer.eot_id]
    if not ids:
        raise TegakiError("the prompt is empty: give some text")
    if len(ids) > model.config.block_size:
        raise TegakiError(f"the prompt has {len(ids)} tokens; the model's context is {model.config.block_size}")
    return ids


def token_text(tokenizer, token_id: int) -> str:
    """A token for display: its text, or its bytes when it holds part of a character (<e3 81>)."""
    piece = token_piece(tokenizer, token_id)
    if piece.startswith("bytes:"):
        return "<" + " ".join(f"{b:02x}" for b in tokenizer.token_bytes(token_id)) + ">"
    return piece


@torch.inference_mode()
def next_tokens(model, tokenizer, prompt: str, settings: SamplingSettings, count: int = 20) -> dict:
    """The most likely next tokens: prob under the model, sample_prob as the settings reshape it."""
    settings.check()
    ids = prompt_ids(model, tokenizer, prompt)
    logits = model(torch.tensor([ids], device=model.device), last_only=True)[0, -1]  # (V,)
    probs = logits.float().softmax(dim=-1)
    sampled = sampling_distribution(logits, settings)
    top = probs.topk(min(max(count, 1), MAX_BARS, probs.numel()))
    return {
        "prompt_tokens": len(ids),
        "tokens": [
            {"id": int(i), "text": token_text(tokenizer, int(i)), "prob": float(p), "sample_prob": float(sampled[i])}
            for p, i in zip(top.values, top.indices)
        ],
        "candidates": int((sampled > 0).sum()),  # how many tokens these settings can draw at all
    }


def attention(model, tokenizer, prompt: str, layer: int) -> dict:
    """Every head of one layer: weights[h][query][key], each row summing to 1 over earlier keys."""
    cfg = model.config
    if not 0 <= layer < cfg.n_layer:
        raise TegakiError(f"layer {layer}: the model has layers 0..{cfg.n_layer - 1}")
    prompt_ids(model, tokenizer, prompt)  # the same checks as everywhere on the page
    weights, tokens = attention_maps(model, tokenizer, prompt, layer)  # (H, T, T)
    return {
        "layer": layer,
        "n_layer": cfg.n_layer,
        "n_head": int(weights.shape[0]),
        "window": cfg.window(layer),
        "tokens": tokens,
        "weights": [[[round(float(w), 4) for w in row] for row in head] for head in weights],
    }


@torch.inference_mode()
def logit_lens(model, tokenizer, prompt: str, top: int = 3) -> dict:
    """For each layer and position: the tokens the model would predict if it stopped after that
    layer. The last layer's row is the model's real prediction."""
    ids = prompt_ids(model, tokenizer, prompt)
    top = min(max(top, 1), MAX_LENS_TOP)
    cap = capture(model, ids)
    layers = []
    for hidden in cap.block_outputs:  # each (1, T, C), layer after layer
        h = hidden.to(model.wte.weight.dtype)  # capture keeps float32 copies; the head wants the model's dtype
        if model.config.final_norm:
            h = model.ln_f(h)
        probs = model.lm_head(h)[0].float().softmax(dim=-1)  # (T, V)
        best = probs.topk(top, dim=-1)
        layers.append(
            [
                [
                    {"id": int(i), "text": token_text(tokenizer, int(i)), "prob": round(float(p), 5)}
                    for p, i in zip(best.values[t], best.indices[t])
                ]
                for t in range(len(ids))
            ]
        )
    return {"tokens": [token_text(tokenizer, i) for i in ids], "layers": layers}


def parameters(model) -> dict:
    """`tegaki params --json` for the served model."""
    return count_parameters(model.config)


def trace_prompt(model, tokenizer, prompt: str, layer: int, head: int, top_k: int) -> dict:
    prompt_ids(model, tokenizer, prompt)
    return trace(model, tokenizer, prompt, layer=layer, head=head, top_k=top_k)


def model_summary(name: str, model, template_origin: str | None) -> dict:
    """What the page shows at the top, and the sizes its controls need."""
    cfg = model.config
    return {
        "name": name,
        "config": {
            k: getattr(cfg, k)
            for k in (
                "n_layer",
                "n_head",
                "n_kv_head",
                "n_embd",
                "vocab_size",
                "block_size",
                "pos_embedding",
                "norm",
                "mlp",
            )
        },
        "chat_template": template_origin,
        "dtype": str(model.wte.weight.dtype).replace("torch.", ""),
        "device": str(model.device),
    }
