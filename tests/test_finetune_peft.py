"""LoRA adapters in PEFT's format: transformers + peft compute what tegaki does; the wrong base is refused."""

import pytest
import torch

from tegaki.errors import TegakiError
from tegaki.finetune.peft import export_peft, load_peft, read_adapter_config
from tegaki.load import export_hf, from_pretrained
from tegaki.lora import LoRASettings, add_lora, lora_layers, merge_lora

transformers = pytest.importorskip("transformers")


def tiny_llama(folder, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def lora_finetuned(folder, targets=("q", "k", "v", "o", "mlp")):
    """A tegaki LoRA fine-tune of the model in `folder`: a few AdamW steps on random tokens."""
    model = from_pretrained(folder)
    settings = LoRASettings(r=4, alpha=8, targets=targets)
    add_lora(model, settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.randint(0, 128, (2, 16))
    for _ in range(3):
        _, loss = model.train()(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(b.abs().max() > 0 for _, layer in lora_layers(model) for b in layer.lora_B.values())
    return model.eval(), settings


@pytest.mark.slow  # importing peft (and accelerate) takes ~10 s
def test_peft_on_the_exported_base_gives_the_same_logits(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    source = tiny_llama(tmp_path / "llama")
    model, settings = lora_finetuned(source)
    export_hf(from_pretrained(source), tmp_path / "base")  # the base, as tegaki exports it
    export_peft(model, tmp_path / "adapter", settings, base_name=str(tmp_path / "base"))
    config = read_adapter_config(tmp_path / "adapter")
    assert sorted(config["target_modules"]) == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max() <= 1e-5
    with torch.no_grad():
        merged = merge_lora(model)(x)
    torch.testing.assert_close(merged, theirs, atol=1e-5, rtol=1e-5)


def test_an_adapter_loads_back_and_refuses_another_base(tmp_path):
    source = tiny_llama(tmp_path / "llama")
    model, settings = lora_finetuned(source, targets=("q", "v"))
    export_peft(model, tmp_path / "adapter", settings)
    base = from_pretrained(source)
    load_peft(base, tmp_path / "adapter")
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(base(x), model(x), atol=1e-6, rtol=1e-6)
    other = from_pretrained(tiny_llama(tmp_path / "other", seed=1))  # same shape, other weights
    with pytest.raises(TegakiError, match="made for another base model"):
        load_peft(other, tmp_path / "adapter")


def test_gpt2_qkv_adapters_cannot_be_written_as_peft(tmp_path):
    from tegaki.config import ModelConfig
    from tegaki.model import GPT

    model = GPT(ModelConfig.preset("tiny").replace(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    add_lora(model, LoRASettings(targets=("q",)))
    with pytest.raises(TegakiError, match="one transformers module"):
        export_peft(model, tmp_path / "adapter", LoRASettings(targets=("q",)))
