"""LoRA adapters in PEFT's format: transformers + peft compute what tegaki does; the wrong base is refused."""

import warnings

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
    assert set(config) <= set(peft.LoraConfig().to_dict()) | {"peft_type", "task_type"}  # no key PEFT would warn about
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", torch_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT reads every key without a complaint
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


def lora_run(root, *extra):
    """A LoRA fine-tune, through the CLI, of a random tegaki Llama run folder (tokenizer: 300 ids, model: 320 rows)."""
    from finetune_models import make_run, write_records

    from tegaki.cli import main

    base, data = make_run(root / "base", preset="tiny-llama"), write_records(root / "r.jsonl")
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(root / "ft"), "--max-steps", "2"]
    args += ["--max-seq-len", "48", "--batch-size", "2", "--lr", "0.05", "--no-progress", "--lora-targets", "all"]
    assert main([*args, *extra]) == 0
    return base, root / "ft"


def peft_logits(peft, base_dir, adapter_dir, x):
    hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(hf, adapter_dir).eval()(x).logits


@pytest.mark.slow  # importing peft (and accelerate) takes ~10 s
@pytest.mark.parametrize("chat", ["chatml", "plain"])
def test_tegaki_export_peft_loads_in_peft_with_the_runs_logits(tmp_path, capsys, chat):
    """chatml: the run added <|im_start|>/<|im_end|>, so its base (with their learned rows) is written
    beside the adapter; plain: the adapter goes on the run's own base, exported as it is."""
    from tegaki.cli import main

    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    base, run = lora_run(tmp_path, "--chat-template", chat)
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "adapter"), "--peft"]) == 0
    said = capsys.readouterr().err
    assert "adapter_config.json" in said and "load it with peft onto" in said
    if chat == "chatml":
        base_dir = tmp_path / "adapter" / "base"
        assert str(base_dir) in said and (base_dir / "tokenizer.json").is_file()
    else:
        base_dir = tmp_path / "base-hf"
        assert f"tegaki export {base}" in said and not (tmp_path / "adapter" / "base").exists()
        assert main(["export", str(base), str(base_dir)]) == 0
    config = read_adapter_config(tmp_path / "adapter")
    assert config["r"] == 8 and "q_proj" in config["target_modules"] and "down_proj" in config["target_modules"]
    x = torch.tensor([[1, 300, 5, 6, 301, 7, 8, 2]])  # 300, 301: the markers (chatml) or padding rows (plain)
    with torch.no_grad():
        ours = from_pretrained(run)(x)
    assert (peft_logits(peft, base_dir, tmp_path / "adapter", x) - ours).abs().max() <= 1e-5


def test_tegaki_export_peft_explains_a_run_without_adapters(tmp_path, capsys):
    from finetune_models import make_run

    from tegaki.cli import main

    base = make_run(tmp_path / "base")
    assert main(["export", str(base), str(tmp_path / "out"), "--peft"]) == 2
    said = capsys.readouterr().err
    assert "is not a LoRA fine-tune" in said and "Traceback" not in said
    assert main(["export", "gpt2-nowhere", str(tmp_path / "out"), "--peft"]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
