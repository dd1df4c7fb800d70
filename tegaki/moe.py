"""Mixture of experts (GPT-OSS, Mixtral, Qwen3-MoE): the MLP of a block where each token goes through
k of E small MLPs, chosen by a router. `model.make_mlp` picks it when `config.mlp == "moe"`.

Shapes: N tokens (B*T flattened), C channels, E experts, k experts per token, I expert width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki.config import ModelConfig


class MoE(nn.Module):
    """Mixture of experts: a router picks k of E small MLPs for each token and mixes their outputs.

    Expert weights are stored as GPT-OSS stores them: w_in (E, C, 2I) with the gate and up
    projections interleaved in its columns (gate = even, up = odd), w_out (E, I, C).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        E, C, I = config.n_experts, config.n_embd, config.intermediate_size
        self.router = nn.Linear(C, E, bias=config.moe_router_bias)
        self.w_in = nn.Parameter(torch.randn(E, C, 2 * I) * config.init_std)
        self.w_out = nn.Parameter(torch.randn(E, I, C) * config.init_std)
        if config.mlp_bias:
            self.b_in = nn.Parameter(torch.zeros(E, 2 * I))
            self.b_out = nn.Parameter(torch.zeros(E, C))
        else:
            self.b_in = self.b_out = None
        self.routing_stats: tuple | None = None  # what the balance loss needs, from the last forward
        self.aux_loss: torch.Tensor | None = None  # this layer's load-balancing loss, last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, C) -> router logits (N, E), chosen experts (N, k), their weights (N, k)."""
        k = self.config.n_experts_per_tok
        logits = self.router(x)  # (N, E)
        if self.config.moe_softmax_after_topk:  # GPT-OSS: softmax over the k best logits only
            top_logits, chosen = logits.topk(k, dim=-1)  # (N, k)
            weights = F.softmax(top_logits, dim=-1)
        else:  # Mixtral / Qwen3-MoE: softmax over all experts, then keep the k largest
            weights, chosen = F.softmax(logits, dim=-1, dtype=torch.float32).topk(k, dim=-1)
            if self.config.moe_norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            weights = weights.to(x.dtype)
        return logits, chosen, weights

    def activation(self, h: torch.Tensor) -> torch.Tensor:
        """(…, 2I) interleaved gate/up -> (…, I)."""
        gate, up = h[..., 0::2], h[..., 1::2]
        if self.config.moe_expert == "gpt-oss":  # clamped SwiGLU with a sigmoid slope alpha
            limit, alpha = self.config.moe_swiglu_limit, self.config.moe_swiglu_alpha
            gate = gate.clamp(max=limit)
            up = up.clamp(min=-limit, max=limit)
            return (up + 1) * (gate * torch.sigmoid(alpha * gate))
        return F.silu(gate) * up

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Run expert e on tokens x (n, C) -> (n, C)."""
        h = x @ self.w_in[e]  # (n, 2I)
        if self.b_in is not None:
            h = h + self.b_in[e]
        y = self.activation(h) @ self.w_out[e]  # (n, C)
        return y + self.b_out[e] if self.b_out is not None else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, C): routing is per token, the batch shape does not matter
        logits, chosen, weights = self.route(x)
        if self.config.moe_impl == "dense":
            out = self._forward_dense(x, chosen, weights)
        else:
            out = self._forward_loop(x, chosen, weights)
        # The balance loss only matters for learning; inference skips its softmax over all experts.
        self.routing_stats = self._routing_stats(logits, chosen) if self.training else None
        self.aux_loss = load_balancing_loss([self.routing_stats]) if self.training else None
        return out.view(B, T, C)

    def _forward_loop(self, x, chosen, weights) -> torch.Tensor:
        """Readable: for each expert, gather its tokens, run it, add the weighted result back."""
        out = torch.zeros_like(x)  # (N, C)
        for e in range(self.config.n_experts):
            token, slot = torch.where(chosen == e)  # which tokens picked e, and in which of k slots
            if token.numel() == 0:
                continue
            y = self.expert(x[token], e) * weights[token, slot, None]  # (n, C)
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def _forward_dense(self, x, chosen, weights) -> torch.Tensor:
        """Batched: every expert on every token in two einsums, unchosen experts weighted 0.
        E times the arithmetic, but no gathers; wins for few experts and small batches."""
        h = torch.einsum("nc,eci->eni", x, self.w_in)  # (E, N, 2I)
        if self.b_in is not None:
            h = h + self.b_in[:, None, :]
        y = torch.einsum("eni,eic->enc", self.activation(h), self.w_out)  # (E, N, C)
        if self.b_out is not None:
            y = y + self.b_out[:, None, :]
        dense_weights = torch.zeros(x.shape[0], self.config.n_experts, dtype=y.dtype, device=x.device)
        dense_weights.scatter_(1, chosen, weights.to(y.dtype))  # (N, E)
        return torch.einsum("enc,ne->nc", y, dense_weights)  # (N, C)

    def _routing_stats(self, logits: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per expert: how many times it was among a token's k (E,), and the router probability it
        got in total (E,); and the number of tokens."""
        E = self.config.n_experts
        probs = F.softmax(logits.float(), dim=-1)  # (N, E)
        picks = F.one_hot(chosen, E).float().sum(dim=(0, 1))  # (E,)
        return picks, probs.sum(dim=0), logits.shape[0]


def load_balancing_loss(stats: list[tuple[torch.Tensor, torch.Tensor, int]]) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: E * sum_e (picks of e per token) * (mean probability of e).
    It is smallest when tokens spread evenly over the experts. Over several layers the counts are
    pooled first (every token of every layer together), as transformers computes it."""
    picks = sum(s[0] for s in stats)  # (E,)
    probs = sum(s[1] for s in stats)  # (E,)
    tokens = sum(s[2] for s in stats)
    return picks.shape[0] * ((picks / tokens) * (probs / tokens)).sum()
