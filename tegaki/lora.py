"""LoRA, written by hand: a frozen linear layer plus a trainable low-rank correction, and merging it back.

    y = W x + b + (alpha / r) * B A x        A: (r, in), B: (out, r), B starts at zero

Only A and B learn; W stays as it was. With B = 0 the layer computes exactly what it did before, so a
fresh adapter changes nothing, and training starts from the base model's behaviour. Afterwards
`merge_lora` folds the correction into W (W' = W + (alpha/r) B A) and the model is a plain GPT again.

Targets (`--lora-targets`): "q", "k", "v" (rows of the joint qkv projection), "o" (o_proj), and the MLP
projections "fc", "proj" (GPT-2's GELU MLP) and "gate", "up", "down" (SwiGLU); "mlp" is whichever of
those the model has; "all" is q, k, v, o and mlp. (Mixture-of-experts MLPs are not adapted.)

The qkv projection is one Linear whose output rows are q's, k's and v's (config.qkv_sizes). A target
"q" is an adapter of its own on q's rows only -- its own A (r, C) and B (H*D, r) -- just as LoRA on a
model with a separate q_proj would be, so an adapter on "q" and "v" is two adapters, the standard
recipe, and exports to PEFT as q_proj and v_proj adapters of the transformers model (tegaki.finetune.peft).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tegaki.errors import TegakiError
from tegaki.modules import replace_module

QKV_PARTS = ("q", "k", "v")
MLP_TARGETS = ("fc", "proj", "gate", "up", "down")
TARGETS = (*QKV_PARTS, "o", *MLP_TARGETS, "mlp")  # "mlp": whichever of fc/proj/gate/up/down the model has


@dataclass(frozen=True)
class LoRASettings:
    """What `add_lora` adds: rank, scale numerator, dropout on the adapter's input, where."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "v")  # the LoRA paper's choice
    new_tokens: tuple[int, ...] = ()  # ids whose embedding (and LM head) rows learn: added for the chat format

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}
        return d | ({"new_tokens": list(self.new_tokens)} if self.new_tokens else {})

    @classmethod
    def from_dict(cls, d: dict) -> LoRASettings:
        """The settings run.json records (`to_dict`); a record of another shape is refused in words."""
        try:
            targets, new_tokens = d["targets"], d.get("new_tokens", ())
            if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
                raise TypeError("targets is not a list of names")
            if not all(type(i) is int and i >= 0 for i in new_tokens):
                raise TypeError("new_tokens is not a list of token ids")
            return cls(int(d["r"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(targets), tuple(new_tokens))
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise TegakiError(
                f'the LoRA settings recorded ("lora": {d!r:.120}) are damaged ({type(e).__name__}: {e}); '
                "restore run.json from a copy"
            ) from None


def parse_targets(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """ "q,v" or ["q", "v"] -> ("q", "v"); "all" stands for q, k, v, o and mlp."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    out: list[str] = []
    for name in names:
        expanded = {"all": (*QKV_PARTS, "o", "mlp"), "qkv": QKV_PARTS, "o_proj": ("o",)}.get(name, (name,))
        for t in expanded:
            if t not in TARGETS:
                raise TegakiError(f"unknown LoRA target {t!r}; choose among {', '.join(TARGETS)} (or mlp, all)")
            if t not in out:
                out.append(t)
    if not out:
        raise TegakiError("--lora-targets names no target; e.g. q,v or q,k,v,o,mlp")
    return tuple(out)


class LoRALinear(nn.Linear):
    """A linear layer with low-rank adapters on some spans of its output rows.

    `parts`: {name: (first row, row count)}, e.g. {"q": (0, H*D), "v": (H*D + K*D, K*D)} on qkv, or
    {"all": (0, out_features)} on any other projection. The state dict keeps `weight` and `bias` under
    their usual names, beside `lora_A.<part>` and `lora_B.<part>`.
    """

    def __init__(self, base: nn.Linear, parts: dict[str, tuple[int, int]], settings: LoRASettings):
        super().__init__(
            base.in_features, base.out_features, bias=base.bias is not None, device="meta"
        )  # the base's own tensors are taken over below, not copied
        self.weight = base.weight
        self.bias = base.bias
        self.parts = dict(parts)
        self.scale = settings.scale
        # Dropout at 0 would still draw a mask and multiply by it in training: none at all instead.
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        dev, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (_, rows) in self.parts.items():
            a = torch.empty(settings.r, self.in_features, device=dev, dtype=dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear (and PEFT) initialise A
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(rows, settings.r, device=dev, dtype=dtype))

    # Several adapters on one layer (q's rows and v's rows of qkv) are one adapter of rank k*r: their
    # A's stacked (k*r, in), and a B (out, k*r) holding each adapter's B on its own rows and its own r
    # columns, zeros elsewhere. So the correction is two small matmuls whatever the number of parts,
    # and no (..., out) tensor of zeros is built and joined each step.

    def stacked_A(self) -> torch.Tensor:
        """Every adapter's A, one above the other: (k*r, in)."""
        return torch.cat([self.lora_A[name] for name in self.parts])

    def placed_B(self) -> torch.Tensor:
        """Every adapter's B on its rows and columns: (out, k*r)."""
        names = list(self.parts)
        if len(names) == 1 and self.parts[names[0]] == (0, self.out_features):
            return self.lora_B[names[0]]  # one adapter on every row: B itself
        r = self.lora_A[names[0]].shape[0]
        b = self.weight.new_zeros(self.out_features, r * len(names))
        for j, name in enumerate(names):
            first, rows = self.parts[name]
            b[first : first + rows, j * r : (j + 1) * r] = self.lora_B[name]
        return b

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """(alpha/r) B A x for every part, zeros for the rows no adapter covers: (..., out)."""
        ax = F.linear(self.dropout(x), self.stacked_A()) * self.scale  # (..., k*r): scaled while it is narrow
        return F.linear(ax, self.placed_B())  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)  # W x + b + (alpha/r) B A x

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha/r) B A on each part's rows: the plain weight that computes the same."""
        w = self.weight.detach().clone()
        for name, (first, rows) in self.parts.items():
            update = self.lora_B[name].float() @ self.lora_A[name].float()  # (rows, in)
            w[first : first + rows] += (self.scale * update).to(w.dtype)
        return w


class NewRows:
    """Shared by the embedding and LM head of a LoRA model whose added tokens learn (the chat format's
    markers, tegaki.finetune.tokens): the frozen weight, with the rows of `new_ids` taken from the
    trainable `new_rows`. The state dict keeps `weight` beside `new_rows`.

    Readable as "the weight with those rows replaced" (`current_weight`); computed without building
    that (V, C) copy, so that the gradient is only the n new rows' (a copy would carry the full
    weight's gradient back through the LM head: the largest matmul LoRA otherwise skips)."""

    def take_over(self, base: nn.Module, new_ids: tuple[int, ...], new_rows: nn.Parameter) -> None:
        self.weight = base.weight  # frozen; the rows of new_ids are stand-ins until merged
        self.new_rows = new_rows  # (n, C)
        self.register_buffer("new_ids", torch.tensor(new_ids, device=base.weight.device), persistent=False)

    def current_weight(self) -> torch.Tensor:
        return self.weight.index_copy(0, self.new_ids, self.new_rows)  # (V, C); what forward computes with


class NewRowsEmbedding(NewRows, nn.Embedding):
    def __init__(self, base: nn.Embedding, new_ids: tuple[int, ...], new_rows: nn.Parameter):
        nn.Embedding.__init__(self, base.num_embeddings, base.embedding_dim, device="meta")
        self.take_over(base, new_ids, new_rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # F.embedding(ids, current_weight()): frozen rows looked up, new ids' rows from new_rows.
        x = F.embedding(ids, self.weight)  # (B, T, C)
        is_new = ids[..., None] == self.new_ids  # (B, T, n)
        slot = is_new.long().argmax(-1)  # (B, T): which new row, where is_new.any(-1)
        return torch.where(is_new.any(-1)[..., None], F.embedding(slot, self.new_rows), x)


class NewRowsLinear(NewRows, nn.Linear):
    """A tied head shares the embedding's `new_rows`, as it shares its weight."""

    def __init__(self, base: nn.Linear, new_ids: tuple[int, ...], new_rows: nn.Parameter):
        nn.Linear.__init__(self, base.in_features, base.out_features, bias=False, device="meta")
        self.take_over(base, new_ids, new_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear(x, current_weight()): the frozen head's logits, the new ids' columns recomputed.
        logits = F.linear(x, self.weight)  # (B, T, V)
        return logits.index_copy(-1, self.new_ids, F.linear(x, self.new_rows))  # (B, T, n) into V


def lora_sites(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, dict]]:
    """(parent module, attribute name, parts) for every projection the targets reach."""
    sites = []
    for block in model.blocks:
        attn = block.attn
        wanted = [p for p in QKV_PARTS if p in targets]
        if wanted:
            starts = [0, attn.qkv_sizes[0], attn.qkv_sizes[0] + attn.qkv_sizes[1]]
            parts = {p: (starts[QKV_PARTS.index(p)], attn.qkv_sizes[QKV_PARTS.index(p)]) for p in wanted}
            sites.append((attn, "qkv", parts))
        if "o" in targets:
            sites.append((attn, "o_proj", {"all": (0, attn.o_proj.out_features)}))
        for name in MLP_TARGETS:
            layer = getattr(block.mlp, name, None)
            if (name in targets or "mlp" in targets) and isinstance(layer, nn.Linear):
                sites.append((block.mlp, name, {"all": (0, layer.out_features)}))
    return sites


def add_lora(model: nn.Module, settings: LoRASettings) -> int:
    """Freeze every parameter of `model` and put adapters on the target projections, in place.
    Returns the number of adapted layers. A target the model does not have is refused."""
    if settings.r < 1:
        raise TegakiError(f"--lora-r must be at least 1, got {settings.r}")
    sites = lora_sites(model, settings.targets)
    reached = {p for _, _, parts in sites for p in parts} | {name for _, name, _ in sites}
    reached |= {"o"} if "o_proj" in reached else set()
    reached |= {"mlp"} if reached & set(MLP_TARGETS) else set()
    missing = [t for t in settings.targets if t not in reached]
    if missing:
        raise TegakiError(
            f"this model has no {', '.join(missing)} projection for LoRA "
            f"(its MLP is {model.config.mlp!r}); choose other --lora-targets"
        )
    highest_rank = min(
        min(getattr(parent, name).in_features, rows) for parent, name, parts in sites for _, rows in parts.values()
    )
    if settings.r > highest_rank:  # B A of rank above a side of W adds nothing, and a huge r would be allocated first
        raise TegakiError(
            f"--lora-r {settings.r} is more than the rank an adapter of this model can have ({highest_rank}, the "
            "narrowest side of its adapted projections); choose a smaller --lora-r"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for parent, name, parts in sites:
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise TegakiError("this model has LoRA adapters already; merge them first")
        setattr(parent, name, LoRALinear(base, parts, settings))
    if settings.new_tokens:
        _learn_new_rows(model, settings.new_tokens)
    return len(sites)


def _learn_new_rows(model: nn.Module, ids: tuple[int, ...]) -> None:
    """Make the rows of these token ids trainable in the embedding and LM head, the rest frozen."""
    tied = model.lm_head.weight is model.wte.weight
    rows = nn.Parameter(model.wte.weight.detach()[list(ids)].clone())  # (n, C)
    head_rows = rows if tied else nn.Parameter(model.lm_head.weight.detach()[list(ids)].clone())
    model.wte = NewRowsEmbedding(model.wte, ids, rows)
    model.lm_head = NewRowsLinear(model.lm_head, ids, head_rows)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(module name, layer) for every adapted layer, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put a plain nn.Linear back, in place: the model computes
    the same and has no trace of LoRA. Parameters become trainable again, as in any loaded model."""
    if isinstance(model.wte, NewRowsEmbedding):  # the learned rows go back into the weights
        plain_wte = nn.Embedding(model.wte.num_embeddings, model.wte.embedding_dim, device="meta")
        plain_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False, device="meta")
        for plain, layer in ((plain_wte, model.wte), (plain_head, model.lm_head)):
            layer.weight.data[layer.new_ids] = layer.new_rows.detach()  # twice when tied: the same rows
            plain.weight = layer.weight
        model.wte, model.lm_head = plain_wte, plain_head
    for name, layer in lora_layers(model):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = nn.Parameter(layer.merged_weight())
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone())
        replace_module(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
