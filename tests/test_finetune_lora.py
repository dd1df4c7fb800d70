"""LoRA (tegaki/lora.py): a fresh adapter changes nothing, merging changes nothing, only adapters learn."""

import pytest
import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.lora import (
    LoRALinear,
    LoRASettings,
    add_lora,
    has_lora,
    lora_layers,
    merge_lora,
    parse_targets,
)
from tegaki.model import GPT

PRESETS = ["tiny", "tiny-llama"]


def small(preset: str) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.preset(preset).replace(n_layer=2, n_embd=32, n_head=2, vocab_size=64)).eval()


def randomise_adapters(model: GPT) -> None:
    for _, layer in lora_layers(model):
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b, std=0.5)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("targets", ["q,v", "k", "all"])
def test_a_fresh_adapter_changes_nothing(preset, targets):
    model = small(preset)
    x = torch.randint(0, 64, (2, 10))
    before = model(x)
    add_lora(model, LoRASettings(r=4, alpha=8, targets=parse_targets(targets)))
    assert has_lora(model)
    assert torch.equal(model(x), before)  # B = 0: exactly the base model


@pytest.mark.parametrize("preset", PRESETS)
def test_merged_equals_unmerged(preset):
    model = small(preset)
    x = torch.randint(0, 64, (2, 10))
    base = model(x)
    add_lora(model, LoRASettings(r=4, alpha=8, targets=parse_targets("all")))
    randomise_adapters(model)
    unmerged = model(x)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do something
    merge_lora(model)
    assert not has_lora(model) and not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_an_adapter_on_q_touches_only_q_rows():
    model = small("tiny-llama")
    add_lora(model, LoRASettings(r=2, alpha=2, targets=("q",)))
    randomise_adapters(model)
    layer = model.blocks[0].attn.qkv
    q_rows = model.config.qkv_sizes[0]
    delta = layer.delta(torch.randn(3, layer.in_features))
    assert delta[:, :q_rows].abs().sum() > 0 and torch.equal(delta[:, q_rows:], torch.zeros_like(delta[:, q_rows:]))
    merged = layer.merged_weight()
    assert torch.equal(merged[q_rows:], layer.weight[q_rows:])


def test_the_formula_is_w_x_plus_scaled_b_a_x():
    layer = torch.nn.Linear(6, 5)
    lora = LoRALinear(layer, {"all": (0, 5)}, LoRASettings(r=3, alpha=6))
    torch.nn.init.normal_(lora.lora_B["all"])
    x = torch.randn(4, 6)
    a, b = lora.lora_A["all"], lora.lora_B["all"]
    torch.testing.assert_close(lora(x), x @ layer.weight.T + layer.bias + (6 / 3) * x @ a.T @ b.T)


def test_only_the_adapters_learn():
    model = small("tiny-llama")
    add_lora(model, LoRASettings(r=4, alpha=8, targets=("q", "v")))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    x = torch.randint(0, 64, (2, 10))
    _, loss = model(x, x)
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_A." in n)


def test_targets_are_checked():
    with pytest.raises(TegakiError, match="unknown LoRA target 'x'"):
        parse_targets("q,x")
    assert parse_targets("all") == ("q", "k", "v", "o", "mlp")
    with pytest.raises(TegakiError, match="no gate"):
        add_lora(small("tiny"), LoRASettings(targets=("gate",)))  # GPT-2's MLP has fc and proj
    assert add_lora(small("tiny"), LoRASettings(targets=("mlp",))) == 4  # fc and proj in 2 layers


def test_adding_onto_the_parts_rows_gives_the_formulas_gradients():
    """forward adds (alpha/r) B A x onto each adapter's rows in place; its gradients must be those of
    the formula written out with a full-width correction (zeros on k's rows)."""
    base = torch.nn.Linear(8, 12)
    lora = LoRALinear(base, {"q": (0, 4), "v": (8, 4)}, LoRASettings(r=2, alpha=6))
    for b in lora.lora_B.values():
        torch.nn.init.normal_(b)
    x = torch.randn(3, 5, 8)
    weights = torch.randn(3, 5, 12)
    (lora(x) * weights).sum().backward()
    got = {n: p.grad.clone() for n, p in lora.named_parameters() if p.requires_grad and "lora" in n}

    a, b = lora.lora_A, lora.lora_B
    zeros = torch.zeros(3, 5, 4)
    correction = torch.cat([3 * x @ a["q"].T @ b["q"].T, zeros, 3 * x @ a["v"].T @ b["v"].T], dim=-1)  # (3, 5, 12)
    want = torch.autograd.grad(
        ((x @ base.weight.T + base.bias + correction) * weights).sum(), [a["q"], b["q"], a["v"], b["v"]]
    )
    for name, w in zip(["lora_A.q", "lora_B.q", "lora_A.v", "lora_B.v"], want):
        torch.testing.assert_close(got[name], w)


def test_no_dropout_draws_no_random_numbers():
    """At --lora-dropout 0 (the default) a training step is as deterministic as evaluation: the layer
    draws no mask (which would also cost a copy of its input)."""
    lora = LoRALinear(torch.nn.Linear(8, 8), {"all": (0, 8)}, LoRASettings(r=2, dropout=0.0)).train()
    state = torch.get_rng_state()
    lora(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(torch.get_rng_state(), state)
    dropping = LoRALinear(torch.nn.Linear(8, 8), {"all": (0, 8)}, LoRASettings(r=2, dropout=0.5)).train()
    dropping(torch.randn(4, 8))
    assert not torch.equal(torch.get_rng_state(), state)


def test_a_rank_above_the_projections_side_is_refused_before_it_is_allocated():
    """B A of rank r above a side of W adds nothing; --lora-r 1000000000 would allocate terabytes first."""
    model = small("tiny")
    with pytest.raises(TegakiError, match="--lora-r 1000000000 is more than the rank an adapter"):
        add_lora(model, LoRASettings(r=1_000_000_000, targets=("q", "v")))
    assert not has_lora(model) and all(p.requires_grad for p in model.parameters())
    add_lora(model, LoRASettings(r=32, targets=("q", "v")))  # the side itself: allowed
