"""The whole model in one file: GPT-2, and by config flags Llama, Qwen3, GPT-OSS and gated attention.

Read it top to bottom. A forward pass is five steps:

  1. tokens -> vectors        `GPT.forward`: token embedding (+ learned positions for GPT-2)
  2. attention                `Attention`: each position mixes in information from earlier ones
  3. MLP                      `MLP` / `SwiGLU` / `MoE` (moe.py): each position is transformed on its own
  4. (2 and 3 repeat per `Block`, each added to the residual stream after a norm)
  5. vectors -> next-token logits   final norm, then the LM head

Shapes in comments: B batch, T time (tokens), S keys attended to (= T without a KV cache; the
cached length with one), C channels (n_embd), H query heads, K key/value heads, D head_dim,
V vocabulary, E experts, N = B*T tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tegaki.config import ModelConfig
from tegaki.generate import generate
from tegaki.mask import CAUSAL, SEES_ALL, build_attention_mask, sequence_mask
from tegaki.moe import MoE, load_balancing_loss
from tegaki.rope import apply_rope, rope_cos_sin, rope_frequencies

# -------------------------------------------------------------------------------------------------
# The formulas, written out. The modules below use PyTorch's fused kernels where they are faster;
# tests/test_model.py proves each fused call equals its formula here.
# -------------------------------------------------------------------------------------------------


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
    """LayerNorm: centre each vector, divide by its standard deviation, then scale and shift."""
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)  # biased variance, as LayerNorm defines it
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: divide by the root mean square (no centring), computed in float32, then scale."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (weight.float() * y).to(x.dtype)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: GPT-2 was trained with this one ("gelu_new"), not the exact erf."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax(x)_i = exp(x_i) / sum_j exp(x_j); subtracting the max first keeps exp from overflowing
    and changes nothing (it cancels). A row that is all -inf (nothing visible) gives zeros."""
    x_max = x.amax(dim=dim, keepdim=True).clamp(min=torch.finfo(x.dtype).min)
    e = torch.exp(x - x_max)
    return e / e.sum(dim=dim, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)


# -------------------------------------------------------------------------------------------------
# Norms
# -------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, bias: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fast path; the formula is layer_norm_reference above.
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No fused call here: the formula itself, in float32 as Llama and GPT-OSS compute it.
        return rms_norm_reference(x, self.weight, self.eps)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    """The one place that picks LayerNorm (GPT-2) or RMSNorm (Llama and after)."""
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps)
    return LayerNorm(dim, config.norm_eps, bias=config.bias)


# -------------------------------------------------------------------------------------------------
# Attention
# -------------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head causal self-attention, with the modern variants as flags.

    n_head query heads and n_kv_head key/value heads (fewer = GQA: groups of query heads share one
    key/value head). Each head works in its own head_dim-wide subspace.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.window = config.window(layer_idx)
        C, H, K, D = config.n_embd, self.n_head, self.n_kv_head, self.head_dim

        # One matrix computes queries, keys and values together (they all read the same x): its
        # output rows are H*D query channels, then K*D key channels, then K*D value channels.
        self.qkv_sizes = config.qkv_sizes  # (H*D, K*D, K*D)
        self.qkv = nn.Linear(C, (H + 2 * K) * D, bias=config.qkv_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attn_out_bias)
        if config.qk_norm:  # Qwen3: normalise each query and key head before the rotation
            self.q_norm = RMSNorm(D, config.norm_eps)
            self.k_norm = RMSNorm(D, config.norm_eps)
        if config.attn_sinks:  # GPT-OSS: one extra logit per head that any query may "attend" to
            self.sinks = nn.Parameter(torch.zeros(H))
        if config.attn_gate != "none":  # gated attention: a sigmoid gate on each head's output
            gate_width = H * D if config.attn_gate == "elementwise" else H
            self.gate_proj = nn.Linear(C, gate_width, bias=config.qkv_bias)

        default_scale = config.attn_scale if config.attn_scale is not None else 1.0 / math.sqrt(D)
        if config.attn_scale_learnable:
            self.scale = nn.Parameter(torch.tensor(float(default_scale)))
        else:
            self.scale = default_scale
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C), already normalised
        rope: tuple[torch.Tensor, torch.Tensor] | None,  # cos, sin: (B, 1, T, D) each
        positions: torch.Tensor,  # (B, T) absolute positions of these tokens
        mask: torch.Tensor | str | None,  # (B, 1, T, S) bool, CAUSAL or SEES_ALL; None: the cache's
        kv_cache=None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        H, K, D = self.n_head, self.n_kv_head, self.head_dim

        # Project, split the channels into q, k, v, then into heads, and move heads before time:
        # the [B, H, T, D] layout lets one batched matmul compute every head's attention at once.
        q, k, v = self.qkv(x).split(self.qkv_sizes, dim=-1)  # (B, T, H*D), (B, T, K*D), (B, T, K*D)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if kv_cache is not None:
            # Append this step's keys/values; attend over everything cached so far.
            k, v, mask = kv_cache.update(self.layer_idx, k, v, positions)  # (B, K, S, D), mask (B,1,T,S)

        if self.config.attn_impl == "manual":
            y = self._attend_written_out(q, k, v, mask, positions)
        else:
            y = self._attend_fused(q, k, v, mask, positions)
        # y: (B, H, T, D)

        if self.config.attn_gate != "none":
            gate = torch.sigmoid(self.gate_proj(x))  # (B, T, H*D) or (B, T, H)
            y = y * gate.view(B, T, H, -1).transpose(1, 2)  # (B, H, T, D or 1) broadcasts over D
        y = y.transpose(1, 2).reshape(B, T, H * D)  # heads side by side again: (B, T, H*D)
        return self.resid_dropout(self.o_proj(y))  # (B, T, C)

    def explicit_mask(self, mask: torch.Tensor | str, positions: torch.Tensor, n_keys: int) -> torch.Tensor:
        """The mask as a tensor: SEES_ALL, every key visible to the one query; CAUSAL, the triangle."""
        if not isinstance(mask, str):
            return mask
        if mask == SEES_ALL:
            return torch.ones(positions.shape[0], 1, 1, n_keys, dtype=torch.bool, device=positions.device)
        return build_attention_mask(positions, positions, causal=True, window=self.window)  # CAUSAL

    def _attend_written_out(self, q, k, v, mask, positions) -> torch.Tensor:
        """softmax(q k^T * scale + mask) v, every step visible."""
        H, K = self.n_head, self.n_kv_head
        if K != H:  # GQA: each key/value head serves H // K query heads
            k = k.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1)  # (B, H, S, D)
        att = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, T, S): query-key similarities
        mask = self.explicit_mask(mask, positions, k.shape[2])
        att = att.masked_fill(~mask, float("-inf"))  # invisible keys: exactly zero weight after softmax
        if self.config.attn_sinks:
            # The sink is one more column per head: it takes part in the softmax, then is dropped,
            # so a head can put its attention "nowhere" instead of on some token.
            sink = self.sinks.view(1, -1, 1, 1).expand(att.shape[0], -1, att.shape[2], 1)  # (B, H, T, 1)
            att = softmax_reference(torch.cat([att, sink.to(att.dtype)], dim=-1))[..., :-1]
        else:
            att = softmax_reference(att)  # (B, H, T, S), each row sums to 1
        att = self.attn_dropout(att)
        return att @ v  # (B, H, T, D): a weighted average of the visible values

    def _attend_fused(self, q, k, v, mask, positions) -> torch.Tensor:
        """The same computation through torch's scaled_dot_product_attention (FlashAttention-style
        kernels that never materialise the T x S matrix when they can)."""
        dropout_p = self.config.dropout if self.training else 0.0
        scale = self.scale
        if isinstance(scale, torch.Tensor):  # learnable scale: fold it into q, tell sdpa "1"
            q, scale = q * scale, 1.0
        gqa = self.n_kv_head != self.n_head
        T = q.shape[2]
        # A named mask needs no tensor: CAUSAL is sdpa's is_causal (whose triangle is aligned top-left,
        # right for a block attending to itself), SEES_ALL is no mask at all.
        if isinstance(mask, str) and not self.config.attn_sinks and (self.window is None or T == 1):
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=mask == CAUSAL, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
            )
        mask = self.explicit_mask(mask, positions, k.shape[2])
        if self.config.attn_sinks:
            # sdpa has no sink argument. Append one key of zeros and one value of zeros: its
            # logit q.0 = 0, plus an additive bias equal to the sink, is exactly the sink logit;
            # its value adds nothing to the output.
            B, _, T, S = mask.shape
            zeros_kv = k.new_zeros(k.shape[0], k.shape[1], 1, k.shape[3])
            k, v = torch.cat([k, zeros_kv], dim=2), torch.cat([v, zeros_kv], dim=2)  # (B, K, S+1, D)
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            sink = self.sinks.to(q.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)  # (B, H, T, 1)
            mask = torch.cat([bias.expand(B, self.n_head, T, S), sink], dim=-1)  # (B, H, T, S+1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale, enable_gqa=gqa)


# -------------------------------------------------------------------------------------------------
# MLPs: GELU (GPT-2), SwiGLU (Llama, Qwen3); the mixture of experts (GPT-OSS, Mixtral) is in moe.py
# -------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """GPT-2's MLP: widen 4x, GELU, project back. The width gives room for per-token features."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.fc = nn.Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.proj = nn.Linear(config.intermediate_size, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.fc(x), approximate="tanh")  # (B, T, 4C); formula: gelu_tanh_reference
        return self.dropout(self.proj(h))  # (B, T, C)


class SwiGLU(nn.Module):
    """Llama's MLP: a SiLU-activated gate multiplies a second projection ("gated linear unit")."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate = nn.Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.up = nn.Linear(config.n_embd, config.intermediate_size, bias=bias)
        self.down = nn.Linear(config.intermediate_size, config.n_embd, bias=bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


def make_mlp(config: ModelConfig) -> nn.Module:
    """The one place that picks the MLP kind."""
    return {"gelu": MLP, "swiglu": SwiGLU, "moe": MoE}[config.mlp](config)


# -------------------------------------------------------------------------------------------------
# The block and the model
# -------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    The residual stream x carries each token's state from layer to layer; attention and the MLP
    only *add* to it, which keeps gradients flowing through deep stacks.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.n_embd)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = make_norm(config, config.n_embd)
        self.mlp = make_mlp(config)

    def forward(self, x, rope, positions, mask, kv_cache=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, positions, mask, kv_cache)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector
        if config.pos_embedding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)  # position -> vector
        if config.pos_embedding == "rope":
            inv_freq, attention_factor = rope_frequencies(config)
            self.register_buffer("inv_freq", inv_freq, persistent=False)  # (D/2,)
            self.rope_attention_factor = attention_factor
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config, config.n_embd) if config.final_norm else nn.Identity()
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # One matrix both reads tokens in and scores them out: saves V*C parameters and ties
            # "what a token means" to "when to predict it".
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        self._init_residual_projections()

    @contextlib.contextmanager
    def attention_as(self, impl: str) -> Iterator[None]:
        """Every attention layer computes through `impl` ("manual": the written-out softmax, "sdpa":
        the fused kernel) for the length of the block, then as the config said before: the same
        maths either way. The trace reads the written-out weights; a compiled CPU step lets
        inductor fuse the written-out products (decoding.CompiledCpuStep)."""
        before = self.config.attn_impl
        self.config.attn_impl = impl
        try:
            yield
        finally:
            self.config.attn_impl = before

    # --- initialisation (GPT-2's): N(0, 0.02), residual projections scaled down by depth -------
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoE):
            nn.init.normal_(module.w_in, mean=0.0, std=std)
            nn.init.normal_(module.w_out, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def _init_residual_projections(self) -> None:
        # Each block adds two outputs to the residual stream; scaling keeps its variance flat.
        std = self.config.init_std / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=std)
            down = getattr(block.mlp, "proj", None) or getattr(block.mlp, "down", None)
            if down is not None:
                nn.init.normal_(down.weight, mean=0.0, std=std)

    # --- the forward pass ------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        kv_cache=None,
        last_only: bool = False,
    ):
        """input_ids (B, T) -> logits (B, T, V); with targets (B, T) -> (logits, loss).

        targets[b, t] is the token that *follows* input_ids[b, t] (the data loader makes this
        one-token shift: inputs = tokens[:-1], targets = tokens[1:]). Logits at position t are the
        model's guess for position t + 1. Targets equal to -100 are ignored.
        positions (B, T): absolute positions (default 0..T-1, or after the cache's contents).
        padding_mask (B, T): False for padding tokens (left-padded batches).
        last_only: logits of the last position only, (B, 1, V): all that sampling needs, and it
        spares the LM head (a third of GPT-2's weights) the other T - 1 rows of a prompt.
        """
        cfg = self.config
        if positions is None:
            positions = self._default_positions(input_ids, kv_cache)

        # Step 1: tokens -> vectors.
        x = self.wte(input_ids)  # (B, T, C)
        if cfg.pos_embedding == "learned":
            x = x + self.wpe(positions)  # (B, T, C): GPT-2 adds where-am-I vectors
        x = self.drop(x)
        rope = None
        if cfg.pos_embedding == "rope":  # Llama and after rotate q and k inside attention instead
            rope = rope_cos_sin(self.inv_freq, self.rope_attention_factor, positions, x.dtype)

        # Which keys each query sees, once per layer kind (the cache builds its own).
        masks = {} if kv_cache is not None else self._masks(positions, padding_mask)
        if kv_cache is not None and padding_mask is not None:
            kv_cache.mark_padding(padding_mask)  # padded keys stay invisible in later steps too

        # Steps 2-4: the blocks.
        for block in self.blocks:
            mask = masks.get(block.attn.window)
            x = block(x, rope, positions, mask, kv_cache)  # (B, T, C)
        if kv_cache is not None:
            kv_cache.advance(input_ids.shape[1])

        # Step 5: vectors -> logits over the vocabulary.
        if last_only and targets is None:
            x = x[:, -1:]  # (B, 1, C)
        x = self.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        if cfg.mlp == "moe" and cfg.moe_aux_loss_coef > 0 and self.training:
            loss = loss + cfg.moe_aux_loss_coef * self.moe_aux_loss()
        return logits, loss

    def _default_positions(self, input_ids: torch.Tensor, kv_cache) -> torch.Tensor:
        """0..T-1, or the T positions after what the cache holds: (B, T). Checked against block_size
        here, from a plain int; given positions are the caller's to check (generate() does), since
        reading them back from the device would cost a round trip each step."""
        B, T = input_ids.shape
        start = kv_cache.length if kv_cache is not None else 0
        self.config.check_positions(start + T)
        return torch.arange(start, start + T, device=input_ids.device).expand(B, T)

    def _masks(self, positions: torch.Tensor, padding_mask: torch.Tensor | None) -> dict:
        """{window: mask} for each window size in use (None = full attention), built once per
        forward rather than once per layer."""
        windows = {self.config.window(i) for i in range(self.config.n_layer)}
        return {
            w: sequence_mask(positions, causal=self.config.causal, window=w, padding_mask=padding_mask) for w in windows
        }

    def moe_aux_loss(self) -> torch.Tensor:
        """The load-balancing loss of the last forward pass, pooled over the MoE layers."""
        return load_balancing_loss(
            [b.mlp.routing_stats for b in self.blocks if isinstance(b.mlp, MoE) and b.mlp.routing_stats is not None]
        )

    # --- conveniences --------------------------------------------------------------------------
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (a tied head shares the embedding's)."""
        n = sum(p.numel() for p in self.parameters())  # .parameters() yields shared tensors once
        if exclude_embeddings:
            n -= self.wte.weight.numel()
            if hasattr(self, "wpe"):
                n -= self.wpe.weight.numel()
        return n

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
        """Autoregressive sampling with a KV cache; `tegaki.generate.generate` lists the options
        (temperature, top_k, top_p, ..., stop_tokens, attention_mask, seed, compile)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)


def parameter_count(config: ModelConfig) -> int:
    """How many parameters GPT(config) has, without building it: a one-block model is built on the
    meta device (shapes, no storage) and its block counted n_layer times, since every block has the
    same shapes. A billion layers are counted at once, so a size can be refused before allocating."""
    with torch.device("meta"):
        one = GPT(config.replace(n_layer=1, layer_types=None))
    per_block = sum(p.numel() for p in one.blocks[0].parameters())
    return sum(p.numel() for p in one.parameters()) + (config.n_layer - 1) * per_block
