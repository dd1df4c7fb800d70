"""tegaki eval: perplexity and bits per byte (sliding window), multiple choice, the lm-eval adapter."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from finetune_models import make_run

from tegaki.cli import main
from tegaki.errors import TegakiError
from tegaki.eval.harness import TegakiLM
from tegaki.eval.tasks import (
    TaskScore,
    choose,
    ending_logprobs,
    read_tasks,
    score_tasks,
)
from tegaki.eval.text import score_text, token_logprobs
from tegaki.load import from_pretrained, tokenizer_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = make_run(tmp_path_factory.mktemp("eval") / "base")
    return folder, from_pretrained(folder), tokenizer_for(folder)


@torch.no_grad()
def direct_logprobs(model, ids):
    x = torch.tensor(ids)[None]
    return F.log_softmax(model(x[:, :-1]).float(), -1)[0].gather(-1, x[0, 1:, None])[:, 0]


def test_one_window_is_the_plain_computation(run):
    _, model, _ = run
    ids = torch.randint(0, 300, (40,)).tolist()
    torch.testing.assert_close(token_logprobs(model, ids).float(), direct_logprobs(model, ids), atol=1e-5, rtol=0)


def test_the_sliding_window_scores_each_token_once_with_its_context(run):
    _, model, _ = run
    ids = torch.randint(0, 300, (150,)).tolist()  # longer than block_size 64
    got = token_logprobs(model, ids, window=32, stride=8)
    assert got.shape == (149,)
    # token t (t >= 33) is scored in the window that ends just after it: 32 inputs before it at most
    for t in (1, 20, 40, 77, 149):
        end = 1 + ((t - 1) // 8 + 1) * 8
        end = min(end, 150)
        start = max(0, end - 33)
        expected = direct_logprobs(model, ids[start:end]).detach()[t - start - 1]
        assert abs(float(got[t - 1]) - float(expected)) < 1e-5


def test_bits_per_byte_is_the_loss_over_the_bytes(run):
    _, model, tok = run
    text = "To be, or not to be: 猫が好きです。" * 3
    score = score_text(model, tok, text)
    assert score.tokens == len(tok.encode_ordinary(text))  # every token scored (after <|endoftext|>)
    assert score.bytes == len(text.encode())
    assert math.isclose(score.bits_per_byte, score.nll / math.log(2) / score.bytes)
    assert math.isclose(score.perplexity, math.exp(score.nll / score.tokens))


def write_tasks(path, items):
    path.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    return path


def test_multiple_choice_picks_the_best_mean_log_likelihood(run, tmp_path):
    _, model, tok = run
    items = read_tasks(
        write_tasks(
            tmp_path / "t.jsonl",
            [
                {"context": "What is 2 plus 3?", "endings": [" 5.", " the question", " cat"], "label": 0},
                {"context": "To be, or", "endings": [" not", " 猫が好き"], "label": 1},
            ],
        )
    )
    for item in items:
        means = [float(ending_logprobs(model, tok, item.context, e).mean()) for e in item.endings]
        assert choose(model, tok, item) == means.index(max(means))
    score = score_tasks(model, tok, items)
    assert score.total == 2 and score.correct == sum(choose(model, tok, i) == i.label for i in items)


def test_the_interval_is_wilsons():
    low, high = TaskScore(60, 100).interval()
    assert abs(low - 0.502) < 1e-3 and abs(high - 0.691) < 1e-3
    assert TaskScore(0, 10).interval()[0] == 0.0 and TaskScore(10, 10).interval()[1] == 1.0


def test_a_bad_task_line_is_named(tmp_path):
    path = write_tasks(
        tmp_path / "t.jsonl",
        [{"context": "a", "endings": ["b", "c"], "label": 0}, {"context": "a", "endings": ["b", "c"], "label": 5}],
    )
    with pytest.raises(TegakiError, match=f"{path}:2: label must be an index"):
        read_tasks(path)


def test_the_command_prints_every_figure(run, tmp_path, capsys):
    folder, _, _ = run
    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be. " * 10)
    tasks = write_tasks(tmp_path / "t.jsonl", [{"context": "To be", "endings": [" or", " cat"], "label": 0}])
    assert main(["eval", "--model", str(folder), "--text", str(text), "--tasks", str(tasks), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"]["bytes"] == 210 and out["text"]["bits_per_byte"] > 0
    assert out["tasks"]["total"] == 1 and out["tasks"]["ci95"][0] >= 0
    assert main(["eval", "--model", str(folder)]) == 2


# --- the lm-eval adapter, driven with requests of the harness's documented shapes -------------------


def requests(*args):
    return [SimpleNamespace(args=a) for a in args]


def test_the_adapter_answers_the_three_requests(run):
    _, model, tok = run
    lm = TegakiLM(model, tok)
    ((logp, greedy),) = lm.loglikelihood(requests(("To be, or", " not to be")))
    ids = [tok.eot_id] + tok.encode_ordinary("To be, or")
    cont = tok.encode_ordinary(" not to be")
    assert math.isclose(logp, float(direct_logprobs(model, ids + cont)[-len(cont) :].sum()), abs_tol=1e-4)
    assert isinstance(greedy, bool)
    (rolling,) = lm.loglikelihood_rolling(requests(("To be, or not to be.",)))
    assert math.isclose(rolling, -score_text(model, tok, "To be, or not to be.").nll, rel_tol=1e-6)
    (text,) = lm.generate_until(requests(("To be", {"until": ["\n"], "max_gen_toks": 8})))
    assert isinstance(text, str) and "\n" not in text
    # the greedy continuation, scored, is greedy; a token the model ranks lower is not
    ids = [tok.eot_id] + tok.encode_ordinary("To be")
    ranked = model(torch.tensor(ids)[None])[0, -1].argsort(descending=True).tolist()
    best, worse = (next(i for i in ranked[k:] if i < 300 and i != tok.eot_id) for k in (0, 5))
    round_trips = tok.encode_ordinary(tok.decode([best])) == [best]
    assert lm.loglikelihood(requests(("To be", tok.decode([best]))))[0][1] == round_trips
    assert not lm.loglikelihood(requests(("To be", tok.decode([worse]))))[0][1] or worse == best


@pytest.mark.slow  # lm-eval imports datasets, transformers and more: ~15 s
def test_lm_eval_runs_a_tiny_local_task(run, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.tasks import TaskManager

    _, model, tok = run
    data = write_tasks(
        tmp_path / "mc.jsonl",
        [
            {"context": "To be, or", "endings": [" not", " cat"], "label": 0},
            {"context": "What is 2 plus 3?", "endings": [" 5", " 9"], "label": 0},
        ],
    )
    (tmp_path / "tiny.yaml").write_text(
        "task: tegaki_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: " + str(data) + "\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\n"
        "doc_to_choice: '{{endings}}'\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
    )
    results = lm_eval.simple_evaluate(
        model=TegakiLM(model, tok), tasks=["tegaki_tiny"], task_manager=TaskManager(include_path=str(tmp_path))
    )
    acc = results["results"]["tegaki_tiny"]["acc,none"]
    items = read_tasks(data)
    assert acc == sum(choose_by_sum(model, tok, i) == i.label for i in items) / len(items)


def choose_by_sum(model, tok, item):
    """lm-eval's acc: the ending with the highest total (not mean) log-likelihood."""
    sums = [float(ending_logprobs(model, tok, item.context, e).sum()) for e in item.endings]
    return sums.index(max(sums))


def test_the_help_prints_a_percent_sign_once(capsys):
    """argparse formats help text with %, so a literal percent is written %% in a help= string and
    % in a description; either slip prints "95%%" or fails."""
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "95% interval" in " ".join(out.split()) and "%%" not in out
