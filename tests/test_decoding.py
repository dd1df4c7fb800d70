"""The decoding layout of the LM head changes speed and nothing else: the same logits and tokens,
tied or untied, and a prepared model refuses to train instead of training a stale copy."""

import pytest
import torch

from tegaki.config import ModelConfig
from tegaki.decoding import DecodingHead, prepare_for_decoding
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import Int8Linear, quantize_model


def random_model(name: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset(name).with_overrides(["n_layer=2"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-gpt-oss"])  # tied, untied, untied with MoE
def test_a_prepared_model_gives_the_same_logits_and_tokens(name):
    model = random_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
    tokens = generate(model, ids[:1], 12, temperature=0)
    assert torch.equal(generate(model, ids[:1], 12, temperature=0, prepare=True), tokens)
    assert isinstance(model.lm_head, DecodingHead) and isinstance(model.blocks[0].attn.qkv, DecodingHead)
    for module in model.modules():  # the rule: out >= in transposed, narrower outputs left alone
        if isinstance(module, (DecodingHead, torch.nn.Linear)):
            assert isinstance(module, DecodingHead) == (module.out_features >= module.in_features)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight_t.is_contiguous() and model.lm_head.weight_t.shape == (192, 4096)


def test_the_embedding_is_untouched_and_training_is_refused():
    model = random_model("tiny")
    wte = model.wte.weight.detach().clone()
    prepare_for_decoding(model)
    assert torch.equal(model.wte.weight, wte) and model.wte.weight.is_contiguous()
    assert "lm_head.weight_t" in model.state_dict() and not any("lm_head" in n for n, _ in model.named_parameters())
    assert isinstance(model.blocks[0].mlp.fc, DecodingHead) and isinstance(model.blocks[0].mlp.proj, torch.nn.Linear)
    with pytest.raises(TegakiError, match="prepared for decoding.*load it again to train"):
        model.train()
    model.eval()  # switching to evaluation stays allowed


def test_quantized_heads_are_left_alone():
    model = quantize_model(random_model("tiny"), "int8")
    prepare_for_decoding(model)
    assert isinstance(model.lm_head, Int8Linear)
