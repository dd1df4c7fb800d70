"""`tegaki finetune` end to end on a tiny run folder: the result loads everywhere, resumes, exports merged."""

import json
import re

import pytest
import torch
from finetune_models import make_run, write_records

from tegaki.checkpoint import read_metrics
from tegaki.cli import main
from tegaki.errors import TegakiError
from tegaki.finetune.loop import FineTuneConfig, finetune, train_settings
from tegaki.finetune.peft import load_lora_run
from tegaki.load import export_hf, from_pretrained, tokenizer_for

pytestmark = pytest.mark.usefixtures("one_thread")


def finetune_args(base, data, out, *extra):
    return [
        "finetune",
        "--model",
        str(base),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-seq-len",
        "48",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--no-progress",
        "--val-fraction",
        "0.25",
        *extra,
    ]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    base, data = make_run(root / "base"), write_records(root / "r.jsonl")
    assert main(finetune_args(base, data, root / "ft", "--max-steps", "2", "--lr", "0.05")) == 0
    return root


def test_a_lora_run_loads_merged_everywhere(lora_run, capsys):
    unmerged, settings, base_name = load_lora_run(lora_run / "ft")
    assert base_name == str(lora_run / "base") and settings.targets == ("q", "v")
    merged = from_pretrained(lora_run / "ft")
    x = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged(x), from_pretrained(lora_run / "base")(x))  # it learned something
    assert main(["generate", "USER:\n", "--model", str(lora_run / "ft"), "--max-new-tokens", "4"]) == 0
    assert main(["trace", "USER:", "--model", str(lora_run / "ft"), "--json"]) == 0
    assert main(["export", str(lora_run / "ft"), str(lora_run / "hf")]) == 0
    again = from_pretrained(lora_run / "hf")
    torch.testing.assert_close(again(x), merged(x), atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in again.state_dict())


def test_the_validation_loss_counts_only_responses(lora_run):
    val = [r for r in read_metrics(lora_run / "ft" / "metrics.jsonl") if r.get("kind") == "val"]
    assert len(val) == 1 and val[0]["step"] == 2
    # A random model over a 320-token vocabulary: about ln(320) nats on each response token. Were the
    # masked prompt positions counted as zeros, the mean would be far lower.
    assert 4.5 < val[0]["val_loss"] < 7.0
    info = json.loads((lora_run / "ft" / "run.json").read_text())
    assert info["lora"]["r"] == 8 and info["finetune"]["method"] == "lora"


def test_a_run_resumes_and_refuses_another_base(lora_run, tmp_path):
    out = tmp_path / "ft"
    data = lora_run / "r.jsonl"
    assert main(finetune_args(lora_run / "base", data, out, "--max-steps", "2")) == 0
    assert main(finetune_args(lora_run / "base", data, out, "--max-steps", "4")) == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    other = make_run(tmp_path / "other", n_embd=64)
    ft = FineTuneConfig(model=str(other), data=str(data), max_seq_len=48)
    with pytest.raises(TegakiError, match="another model"):
        finetune(ft, train_settings(ft, {"out": str(out), "max_steps": 6, "progress": False}))


def test_full_fine_tuning_trains_every_weight(lora_run, tmp_path):
    args = finetune_args(
        lora_run / "base",
        lora_run / "r.jsonl",
        tmp_path / "full",
        "--method",
        "full",
        "--max-steps",
        "2",
        "--lr",
        "0.01",
    )
    assert main(args) == 0
    before, after = from_pretrained(lora_run / "base"), from_pretrained(tmp_path / "full")
    changed = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n])]
    assert "wte.weight" in changed and "blocks.0.mlp.fc.weight" in changed


def test_bad_settings_are_refused(lora_run, tmp_path, capsys):
    args = finetune_args(lora_run / "base", lora_run / "r.jsonl", tmp_path / "x", "--lora-targets", "q,zz")
    assert main(args) == 2 and "unknown LoRA target 'zz'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    assert main(finetune_args(lora_run / "base", bad, tmp_path / "y")) == 2
    assert f"{bad}:2: missing 'output'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # refused before any step: nothing left behind


def test_export_hf_of_the_base_is_untouched_by_the_tokenizer(lora_run, tmp_path):
    # tokenizer_for finds the fine-tune's own tokenizer (copied from its base)
    tok = tokenizer_for(lora_run / "ft")
    assert tok.encode("cat") == tokenizer_for(lora_run / "base").encode("cat")
    export_hf(from_pretrained(lora_run / "ft"), tmp_path / "hf", tokenizer=tok)
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_fresh_starts_over_but_deletes_only_what_a_fine_tune_wrote(lora_run, tmp_path, capsys):
    """--fresh on a fine-tune folder goes through the run folder's one --fresh: it starts over, it
    refuses a folder holding a file tegaki did not write, and the data given is never deleted."""
    out, data = tmp_path / "ft", lora_run / "r.jsonl"
    assert main(finetune_args(lora_run / "base", data, out, "--max-steps", "2")) == 0
    assert main(finetune_args(lora_run / "base", data, out, "--max-steps", "2", "--fresh")) == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2]  # started over, not resumed past step 2
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(finetune_args(lora_run / "base", data, out, "--max-steps", "2", "--fresh")) == 2
    assert "did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine" and (out / "run.json").exists() and data.exists()


def test_a_fine_tune_says_its_method_and_how_many_parameters_train(tmp_path, capsys):
    """A LoRA fine-tune says so at its start, with its rank, its targets and the share of the
    parameters that train (the adapters); a full fine-tune says that every parameter trains."""
    base, data = make_run(tmp_path / "base"), write_records(tmp_path / "r.jsonl")
    said = {}
    for method in ("lora", "full"):
        capsys.readouterr()
        assert main(finetune_args(base, data, tmp_path / method, "--max-steps", "1", "--method", method)) == 0
        out = capsys.readouterr()
        said[method] = out.out + out.err
    pattern = r"LoRA r=8 on q,v: ([\d,]+) of ([\d,]+) parameters train \((\d+\.\d\d)%\)"
    trained, total, share = re.search(pattern, said["lora"]).groups()
    trained, total = int(trained.replace(",", "")), int(total.replace(",", ""))
    assert 0 < trained < total / 10 and float(share) == pytest.approx(100 * trained / total, abs=0.01)
    full = re.search(r"full fine-tune: ([\d,]+) of ([\d,]+) parameters train \(100\.00%\)", said["full"])
    assert full and full[1] == full[2] and int(full[1].replace(",", "")) == total - trained
