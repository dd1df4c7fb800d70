"""`tegaki trace` / `tegaki attention`: what they report is what the model computes."""

import json

import pytest
import torch

from tegaki.analysis.trace import capture, trace
from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.model import GPT
from tegaki.tokenizer import load

PROMPT = "Hello, I am"


@pytest.fixture(scope="module")
def tok():
    return load("gpt2")


def tiny_model(**changes) -> GPT:
    base = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=50257, block_size=64)
    config = ModelConfig.preset(changes.pop("preset", "tiny"))
    if config.layer_types is not None:
        base["layer_types"] = ["sliding", "full"]
    torch.manual_seed(0)
    return GPT(config.replace(**(base | changes))).eval()


def test_shapes_match_the_model(tok):
    model = tiny_model()
    r = trace(model, tok, PROMPT, layer=1, head=3)
    T, C, V, H = 4, 32, 50257, 4
    assert [t["id"] for t in r["tokens"]] == [15496, 11, 314, 716]
    assert r["embedding"]["token_embedding"]["shape"] == [1, T, C]
    assert r["embedding"]["position_embedding"]["shape"] == [1, T, C]
    assert len(r["blocks"]) == 2
    for b in r["blocks"]:
        assert b["attention"]["shape"] == b["mlp"]["shape"] == [1, T, C]
    assert r["attention_pattern"]["shape"] == [1, H, T, T]
    assert r["logits"]["shape"] == [1, T, V]
    assert model.config.attn_impl == "sdpa"  # the traced pass put the model back as it was


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt-oss"])
def test_top_tokens_are_the_models_next_token_distribution(tok, preset):
    model = tiny_model(preset=preset, **({"head_dim": 8} if preset == "tiny-gpt-oss" else {}))
    r = trace(model, tok, PROMPT, top_k=10)
    with torch.no_grad():  # the model's own (fused) path, not the trace's hooks
        probs = torch.softmax(model(torch.tensor([tok.encode(PROMPT)]))[0, -1], dim=-1)
    top = probs.topk(10)
    assert [t["id"] for t in r["next_tokens"]] == top.indices.tolist()
    assert torch.allclose(torch.tensor([t["prob"] for t in r["next_tokens"]]), top.values, atol=1e-6)
    assert r["next_tokens"][0]["text"] == tok.decode([int(top.indices[0])])


def test_captured_pieces_add_up_to_the_residual_stream(tok):
    model = tiny_model()
    ids = tok.encode("The quick brown fox")
    cap = capture(model, ids)
    for i in range(model.config.n_layer):
        rebuilt = cap.block_inputs[i] + cap.attn_outputs[i] + cap.mlp_outputs[i]
        assert torch.allclose(rebuilt, cap.block_outputs[i], atol=1e-5)
    emb = model.wte.weight[ids] + model.wpe.weight[: len(ids)]
    assert torch.allclose(cap.block_inputs[0][0], emb, atol=1e-6)


def test_attention_weights_are_the_ones_the_layer_used(tok):
    """Recompute layer 1's attention output from the captured weights: att @ v, then o_proj."""
    model = tiny_model()
    ids = tok.encode("one two three four five")
    cap = capture(model, ids, attention_layers=[1])
    att = cap.attention[1]  # (1, H, T, T)
    T = len(ids)
    assert torch.allclose(att.sum(-1), torch.ones(1, 4, T), atol=1e-6)  # each row is a distribution
    assert float(att.triu(diagonal=1).abs().max()) == 0.0  # causal: nothing from the future
    block = model.blocks[1]
    with torch.no_grad():
        x = block.ln_1(cap.block_inputs[1])
        v = block.attn.qkv(x).split(block.attn.qkv_sizes, dim=-1)[2]  # (1, T, K*D): the value rows
        v = v.view(1, T, 4, 8).transpose(1, 2)  # (1, H, T, D)
        y = (att @ v).transpose(1, 2).reshape(1, T, 32)
        assert torch.allclose(block.attn.o_proj(y), cap.attn_outputs[1], atol=1e-5)


def test_non_causal_model_attends_to_the_future(tok):
    model = tiny_model(causal=False)
    cap = capture(model, tok.encode(PROMPT), attention_layers=[0])
    assert float(cap.attention[0].triu(diagonal=1).sum()) > 0.1


def test_sinks_and_sliding_window_show_in_the_pattern(tok):
    model = tiny_model(preset="tiny-gpt-oss", head_dim=8, sliding_window=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.sinks.fill_(1.0)
    r = trace(model, tok, "a b c d e f", layer=0, head=1)  # layer 0 is a sliding layer
    w = torch.tensor(r["attention_pattern"]["weights"])  # (T, T)
    T = w.shape[0]
    for q in range(T):
        for k in range(T):
            if not (q - 2 < k <= q):
                assert w[q, k] == 0.0
    sink = torch.tensor(r["attention_pattern"]["sink_mass"])
    assert torch.all(sink > 0) and torch.allclose(w.sum(-1) + sink, torch.ones(T), atol=1e-5)


def test_cli_json(capsys):
    code = main(["trace", "--preset", "tiny", "--set", "n_layer=1", "--set", "n_embd=32", PROMPT, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    r = json.loads(out)
    assert [t["id"] for t in r["tokens"]] == [15496, 11, 314, 716]
    assert len(r["next_tokens"]) == 10
    assert abs(sum(r["attention_pattern"]["weights"][-1]) - 1.0) < 1e-5


def test_cli_text_names_the_five_steps(capsys):
    code = main(["trace", "--preset", "tiny-llama", "--set", "n_layer=1", PROMPT])
    out, _ = capsys.readouterr()
    assert code == 0
    for step in ("step 1", "step 2", "step 3", "step 4", "step 5"):
        assert step in out
    assert "rotary" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["trace", PROMPT], "either --model"),
        (["trace", "--preset", "tiny", "--model", "x", PROMPT], "either --model"),
        (["trace", "--preset", "tiny", "--set", "n_layer=1", "--layer", "3", PROMPT], "layers 0..0"),
        (["trace", "--preset", "tiny", "--set", "n_layer=1", "--head", "9", PROMPT], "heads 0..3"),
        (["trace", "--preset", "tiny", "--set", "n_layer=1", ""], "prompt is empty"),
        (["trace", "--model", "/no/such/run", PROMPT], "no such folder"),
        (["trace", "--preset", "nope", PROMPT], "unknown preset"),
        (["attention", "--preset", "tiny", PROMPT, "--out", "x.jpg"], "PNG"),
    ],
)
def test_cli_errors_are_clear(capsys, argv, expected):
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert expected in err and "Traceback" not in err


def test_the_example_head_is_chosen_by_its_previous_token_score(tok, capsys):
    from tegaki.analysis.trace import previous_token_scores

    att = torch.tensor(
        [
            [[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]],  # head 0: (0.5 + 0.3) / 2 = 0.4
            [[1.0, 0, 0], [0.9, 0.1, 0], [0.0, 0.9, 0.1]],
        ]
    )  # head 1: 0.9, a previous-token head
    assert previous_token_scores(att).tolist() == pytest.approx([0.4, 0.9])
    model = tiny_model()
    r = trace(model, tok, PROMPT, layer=1)  # no head given: the rule picks it
    ap = r["attention_pattern"]
    scores = ap["previous_token_scores"]
    assert len(scores) == 4 and ap["head"] == scores.index(max(scores))
    assert ap["head_chosen_by"] == "the highest previous-token score"
    weights = torch.tensor(ap["weights"])  # the shown head's own pattern gives its score back
    assert float(weights.diagonal(offset=-1).mean()) == pytest.approx(scores[ap["head"]], abs=1e-3)
    assert trace(model, tok, PROMPT, layer=1, head=2)["attention_pattern"]["head_chosen_by"] == "given"
    assert main(["trace", "--preset", "tiny", "--set", "n_layer=2", PROMPT, "--layer", "1"]) == 0
    assert "previous-token score of each head of layer 1" in capsys.readouterr().out
