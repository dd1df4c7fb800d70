"""ChatML's markers added to a model without a chat format: one id each, grown rows that change no
old logit, rows that learn under LoRA, and a run folder that loads, generates and exports with them."""

import json

import pytest
import torch
from finetune_models import make_run, tiny_tokenizer, write_records

from tegaki.chat_template import DEFAULT_SPECIAL_TOKENS, find_chat_template
from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.finetune.data import Record, encode_record
from tegaki.finetune.peft import load_lora_run
from tegaki.finetune.tokens import add_chat_tokens
from tegaki.load import from_pretrained, tokenizer_for
from tegaki.lora import LoRASettings, add_lora, merge_lora
from tegaki.model import GPT
from tegaki.tokenizer import load as load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
START, END = DEFAULT_SPECIAL_TOKENS


def small(tie: bool = True, vocab_size: int = 300) -> GPT:
    """A model with a row for each of tiny_tokenizer's 300 ids (vocab_size 320: and 20 padding rows)."""
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, tie_embeddings=tie)
    config = ModelConfig.preset("tiny").replace(**shape)
    return GPT(config).eval()


def test_a_marker_is_one_id_that_ordinary_text_never_makes(tmp_path):
    tok = tiny_tokenizer()
    plain_before = tok.encode("a<|im_end|>b")  # not yet a token: many pieces
    added = add_chat_tokens(small(), tok)
    assert added == {START: 300, END: 301}  # the next ids after the tokenizer's
    assert tok.encode(END) == [added[END]] and tok.decode([added[START]]) == START
    assert tok.encode("a<|im_end|>b") == [*tok.encode("a"), added[END], *tok.encode("b")]
    assert tok.encode_ordinary("a<|im_end|>b") == plain_before  # its characters alone never become it
    assert all(i < 300 for i in tok.encode("<|im_start <|im_end| |im_end|>"))  # nor do near misses
    tok.save(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert again.special_tokens == tok.special_tokens and again.encode("x<|im_start|>y") == tok.encode("x<|im_start|>y")


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("vocab_size, grown", [(300, 302), (320, 320)])  # no padding rows: grow; else use them
def test_the_markers_rows_leave_every_old_logit_as_it_was(tie, vocab_size, grown):
    model = small(tie, vocab_size)
    x = torch.randint(0, 300, (2, 10))
    before = model(x)  # (B, T, vocab_size)
    add_chat_tokens(model, tiny_tokenizer())
    after = model(x)  # (B, T, grown)
    assert model.config.vocab_size == grown == after.shape[-1] == model.wte.weight.shape[0]
    assert torch.equal(after[..., :300], before[..., :300])
    assert (model.lm_head.weight is model.wte.weight) == tie
    for weight in (model.wte.weight, model.lm_head.weight):
        mean = weight[:300].mean(0)
        torch.testing.assert_close(weight[300:302], mean.expand(2, -1))  # the documented start


def test_under_lora_the_new_rows_learn_and_merge():
    model = small()
    add_chat_tokens(model, tiny_tokenizer())
    add_lora(model, LoRASettings(r=2, alpha=4, targets=("q", "v"), new_tokens=(300, 301)))
    old_rows = model.wte.weight[:300].clone()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "wte.new_rows" in trainable and "wte.weight" not in trainable
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.tensor([[5, 300, 7, 8, 301, 9]])
    for _ in range(3):
        _, loss = model.train()(x, x.roll(-1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert not torch.equal(model.wte.new_rows[0], model.wte.new_rows[1])  # the two markers parted
    unmerged = model(x)
    merge_lora(model)
    assert type(model.wte) is torch.nn.Embedding and model.lm_head.weight is model.wte.weight
    torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.wte.weight[:300], old_rows)  # the old tokens' rows stayed frozen


@pytest.mark.parametrize("tie", [True, False])
def test_the_new_rows_layers_compute_the_weight_with_those_rows_replaced(tie):
    """NewRowsEmbedding/NewRowsLinear skip building the (V, C) weight: their outputs and the new
    rows' gradients are those of the readable formula, F.embedding / F.linear of current_weight()."""
    model = small(tie=tie)
    add_chat_tokens(model, tiny_tokenizer())
    add_lora(model, LoRASettings(r=2, alpha=4, targets=("q",), new_tokens=(300, 301)))
    with torch.no_grad():
        model.wte.new_rows.add_(torch.randn_like(model.wte.new_rows))
        model.lm_head.new_rows.add_(torch.randn_like(model.lm_head.new_rows))
    ids = torch.tensor([[5, 300, 7, 301, 301, 9]])
    h = torch.randn(1, 6, model.config.n_embd)
    fast = model.wte(ids).sum() + (model.lm_head(h) ** 2).sum()
    fast_grads = torch.autograd.grad(fast, [model.wte.new_rows, model.lm_head.new_rows], allow_unused=True)
    readable = torch.nn.functional.embedding(ids, model.wte.current_weight()).sum()
    readable = readable + (torch.nn.functional.linear(h, model.lm_head.current_weight()) ** 2).sum()
    readable_grads = torch.autograd.grad(readable, [model.wte.new_rows, model.lm_head.new_rows], allow_unused=True)
    torch.testing.assert_close(fast, readable)
    for a, b in zip(fast_grads, readable_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_a_marker_spelled_in_a_record_is_refused_with_its_line():
    tok = tiny_tokenizer()
    add_chat_tokens(small(), tok)
    template = find_chat_template([], tok)
    record = Record(7, [{"role": "user", "content": "What does <|im_end|> do?"}, {"role": "assistant", "content": "x"}])
    with pytest.raises(TegakiError, match=r"line 7: message 0 spells the special token <\|im_end\|>"):
        encode_record(record, template, tok)
    ok = Record(8, [{"role": "user", "content": "What does <| im_end |> do?"}, {"role": "assistant", "content": "x"}])
    ids, labels = encode_record(ok, template, tok)
    assert ids.count(tok.special_tokens[END]) == 2 and labels.count(tok.special_tokens[END]) == 1  # the reply's


@pytest.fixture(scope="module")
def chatml_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatml")
    base, data = make_run(root / "base", vocab_size=300), write_records(root / "r.jsonl")  # no padding rows
    common = ["--data", str(data), "--max-seq-len", "48", "--batch-size", "2", "--max-steps", "2"]
    common += ["--eval-every", "2", "--save-every", "2", "--no-progress", "--val-fraction", "0.25", "--lr", "0.05"]
    for method in ("lora", "full"):
        assert main(["finetune", "--model", str(base), "--out", str(root / method), "--method", method, *common]) == 0
    return root


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_chatml_fine_tune_loads_generates_and_exports(chatml_runs, method, capsys, tmp_path):
    run = chatml_runs / method
    info = json.loads((run / "run.json").read_text())
    assert info["model_config"]["vocab_size"] == 302 and info["finetune"]["chat_template"] == "chatml"
    tok = tokenizer_for(run)
    assert tok.special_tokens[START] == 300 and tok.special_tokens[END] == 301
    model = from_pretrained(run)
    assert model.config.vocab_size == 302
    assert find_chat_template([run, run / "tokenizer"], tok, tegaki_run=True).stop_ids(tok) == {301}
    x = torch.tensor([[300, 5, 6, 301, 7]])
    if method == "lora":
        unmerged, settings, _ = load_lora_run(run)
        assert settings.new_tokens == (300, 301)
        torch.testing.assert_close(model(x), unmerged(x), atol=1e-5, rtol=1e-5)
        base = from_pretrained(chatml_runs / "base")
        assert not torch.allclose(unmerged.wte.new_rows, base.wte.weight.mean(0).expand(2, -1))  # they learned
        assert torch.equal(unmerged.wte.weight[:300], base.wte.weight)
    assert main(["generate", "<|im_start|>user\nHi<|im_end|>\n", "--model", str(run), "--max-new-tokens", "3"]) == 0
    assert main(["trace", "<|im_start|>", "--model", str(run), "--json"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    exported = from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)
    spec = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    assert {(t["content"], t["id"]) for t in spec["added_tokens"]} >= {(START, 300), (END, 301)}
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "<|im_start|>user\nHi<|im_end|>\n"
    assert hf_tok(text)["input_ids"] == tok.encode(text)


def test_eval_scores_a_base_in_the_format_its_fine_tune_learned(chatml_runs, capsys):
    args = ["--records", str(chatml_runs / "r.jsonl"), "--max-seq-len", "48", "--json"]
    losses = {}
    for name in ("base", "full"):
        assert main(["eval", "--model", str(chatml_runs / name), *args]) == 0
        losses[name] = json.loads(capsys.readouterr().out)["records"]
    assert losses["base"]["response_tokens"] == losses["full"]["response_tokens"]  # the same tokens: ChatML both


def test_plain_stays_available_by_name(tmp_path):
    base, data = make_run(tmp_path / "base"), write_records(tmp_path / "r.jsonl")
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "ft"), "--max-steps", "1"]
    args += ["--max-seq-len", "48", "--batch-size", "2", "--no-progress", "--chat-template", "plain"]
    assert main(args) == 0
    info = json.loads((tmp_path / "ft" / "run.json").read_text())
    assert info["model_config"]["vocab_size"] == 320 and info["finetune"]["chat_template"] == "plain"
    assert info["lora"].get("new_tokens") is None
    assert START not in tokenizer_for(tmp_path / "ft").special_tokens


class OnlyOneToken(torch.nn.Module):
    """An LM head that always predicts `token_id`."""

    def __init__(self, vocab_size: int, token_id: int):
        super().__init__()
        self.vocab_size, self.token_id = vocab_size, token_id

    def forward(self, x):
        logits = x.new_zeros(*x.shape[:-1], self.vocab_size)
        logits[..., self.token_id] = 10.0
        return logits


def test_generate_stops_where_a_chat_fine_tune_ends_its_reply(chatml_runs, capsys, monkeypatch):
    """A ChatML fine-tune ends its reply with <|im_end|>: `tegaki generate` stops there, as serve and
    chat do, instead of printing the marker and going on."""
    from tegaki.cli import generate as cli_generate

    real = cli_generate.load_for_generation

    def ending_at_once(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        model.lm_head = OnlyOneToken(model.config.vocab_size, tok.special_tokens[END])
        return model, tok

    monkeypatch.setattr(cli_generate, "load_for_generation", ending_at_once)
    run = chatml_runs / "full"
    assert tokenizer_for(run).decode([301]) == END  # printed, it would show
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert main(["generate", prompt, "--model", str(run), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + "\n"
    assert cli_generate.end_ids(str(run), tokenizer_for(run)) == [tokenizer_for(run).eot_id, 301]
