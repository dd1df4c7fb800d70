"""The schedule of a run: learning rate (warmup, then cosine or warmup-stable-decay), the AdamW
optimizer, and the FLOPs a token costs (the MFU figure divides them by tegaki.device.peak_flops).
"""

from __future__ import annotations

import math

import torch

from tegaki.config import ModelConfig
from tegaki.train.settings import TrainConfig

DEFAULT_WARMUP = 30


def warmup_steps(cfg: TrainConfig) -> int:
    """--warmup when given; else 30 steps, but at most a tenth of the run: a warmup longer than
    the run would never reach --lr, nor decay."""
    return cfg.warmup if cfg.warmup is not None else min(DEFAULT_WARMUP, cfg.max_steps // 10)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Warmup: linear from lr/warmup up to lr (Adam's early estimates are noisy; big steps then hurt).
    cosine: from lr down to lr*min_lr_ratio along half a cosine over the remaining steps.
    wsd:    stay at lr, then decay linearly to lr*min_lr_ratio over the last decay_fraction of steps
            (a run can be extended from any checkpoint of the stable phase).
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        span = max(cfg.max_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_steps = int(round(cfg.decay_fraction * cfg.max_steps))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return cfg.lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return cfg.lr + (min_lr - cfg.lr) * progress


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (linear layers, embeddings), none on
    vectors (biases, norm gains, sink logits) -- shrinking a gain towards 0 only fights the norm."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a tied matrix once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # The fused kernel updates every parameter in one pass (CUDA, and CPU since PyTorch 2.4).
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


# =================================================================================================
# FLOPs, for tokens/s -> model FLOPs utilisation
# =================================================================================================


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that takes part in a matmul (2 forward, 4 backward),
    plus attention's two (T x T) matmuls, 12 * layers * heads * head_dim * T / 2 for causal
    (the PaLM paper's count, halved because a causal query sees half the keys on average).
    Position embeddings are a lookup, not a matmul; the token embedding counts because the
    LM head multiplies by it. A mixture of experts counts only the experts a token uses."""
    c = config
    attn = c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head)  # qkv and the output projection
    if c.attn_gate == "headwise":
        attn += c.n_embd * c.n_head
    elif c.attn_gate == "elementwise":
        attn += c.n_embd * c.n_head * c.head_dim
    if c.mlp == "gelu":
        mlp = 2 * c.n_embd * c.intermediate_size
    elif c.mlp == "swiglu":
        mlp = 3 * c.n_embd * c.intermediate_size
    else:
        mlp = c.n_experts_per_tok * 3 * c.n_embd * c.intermediate_size + c.n_embd * c.n_experts
    head = c.n_embd * c.vocab_size
    matmul_params = c.n_layer * (attn + mlp) + head
    attention = 12 * c.n_layer * c.n_head * c.head_dim * seq_len / 2
    return 6 * matmul_params + attention
