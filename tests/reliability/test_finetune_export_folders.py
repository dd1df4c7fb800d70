"""Whose folder is it (issue 26, cases 7-9, 11, 12): `tegaki train`, `finetune` and `export` write
only into a new or empty folder or one they made themselves. A person's files (metrics.jsonl,
loss.png, tokenizer/, config.json, tokenizer.json, adapter_config.json, an old sharded index) end
the command with one message and stay as they were; a run made by one command is not continued
by another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from finetune_models import make_run, tiny_tokenizer, write_records
from reliability_helpers import cli, snapshot, train_args

from tegaki.load import export_hf, from_pretrained

FINETUNE = ["--max-steps", "2", "--max-seq-len", "48", "--batch-size", "2", "--save-every", "2"]
FINETUNE += ["--eval-every", "2", "--device", "cpu", "--dtype", "fp32", "--no-progress"]


def assert_refused(rc: int, err: str, command: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and "Traceback" not in err, err
    assert lines[-1].startswith(f"tegaki {command}: error: ") and message in lines[-1], err


def finetune_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(base), "--data", str(data), "--out", str(out), *FINETUNE, *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("base") / "llama", preset="tiny-llama")


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return write_records(tmp_path_factory.mktemp("records") / "r.jsonl")


@pytest.fixture(scope="module")
def lora_run(base, records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "ft"
    rc, err = cli(finetune_args(base, records, out, "--lora-targets", "all", "--chat-template", "plain"))
    assert rc == 0, err
    return out


def users_folder(folder: Path, files: dict[str, bytes]) -> dict[str, str]:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return snapshot(folder)


# --- 7, 8. a folder of a person's files is not a run folder ------------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        {"metrics.jsonl": b'{"step": 1, "loss": 0.5}\n', "loss.png": b"\x89PNG my plot"},
        {"tokenizer/tegaki_tokenizer.json": b"{}", "tokenizer/encoder.json": b"{}"},
    ],
    ids=["metrics-and-plot", "someone-elses-tokenizer"],
)
def test_finetune_leaves_a_persons_folder_alone(base, records, tmp_path, files):
    out = tmp_path / "mine"
    before = users_folder(out, files)
    rc, err = cli(finetune_args(base, records, out))
    assert_refused(rc, err, "finetune", "holds files tegaki did not write")
    assert snapshot(out) == before and not (out / ".lock").exists()


def test_train_leaves_a_persons_metrics_and_plot_alone(corpus, tmp_path):
    out = tmp_path / "mine"
    before = users_folder(out, {"metrics.jsonl": b'{"step": 1, "loss": 0.5}\n', "loss.png": b"\x89PNG my plot"})
    rc, err = cli(train_args(out, corpus, 2))
    assert_refused(rc, err, "train", "holds files tegaki did not write (loss.png, metrics.jsonl)")
    assert snapshot(out) == before


def test_a_tokenizer_folder_of_a_real_tegaki_tokenizer_is_not_taken_for_the_runs(base, records, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    tiny_tokenizer().save(out / "tokenizer")  # a tokenizer tegaki saved, but not for this fine-tune
    before = snapshot(out)
    rc, err = cli(finetune_args(base, records, out))
    assert_refused(rc, err, "finetune", "holds files tegaki did not write (tokenizer)")
    assert snapshot(out) == before


def test_train_leaves_a_tegaki_tokenizer_and_shards_it_did_not_make_alone(shards, corpus, tmp_path):
    """A tokenizer/ and data/ that `tegaki tokenizer train` and `tegaki prepare` made (tegaki's own
    files, by name and content) are what a train stopped in its set-up leaves too: without that
    train's made_by.json they are a person's, neither taken over nor deleted (by --fresh either)."""
    out = tmp_path / "mine"
    shutil.copytree(shards.parent / "tok", out / "tokenizer")
    shutil.copytree(shards, out / "data")
    before = snapshot(out)
    for fresh in ([], ["--fresh"]):
        rc, err = cli(train_args(out, corpus, 2, *fresh))
        assert_refused(rc, err, "train", "did not write (data, tokenizer) and has no run.json or made_by.json")
        assert snapshot(out) == before and not (out / ".lock").exists()


def test_train_takes_up_its_own_set_up_again(trained, records, corpus, tmp_path):
    """What a train stopped after its set-up leaves (made_by.json, tokenizer/, data/; no run.json
    yet) is that train's: run again, it goes on from there, and finetune and export keep out."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("made_by.json", "tokenizer", "data"):
        copy = shutil.copytree if (trained / name).is_dir() else shutil.copy
        copy(trained / name, out / name)
    assert json.loads((out / "made_by.json").read_text()) == {"command": "train"}
    rc, err = cli(finetune_args(trained, records, out))
    assert_refused(rc, err, "finetune", "holds a run of `tegaki train`")
    rc, err = cli(["export", str(trained), str(out)])
    assert_refused(rc, err, "export", "holds files tegaki export did not write")
    rc, err = cli(train_args(out, corpus, 2))
    assert rc == 0, err
    assert (out / "run.json").is_file() and (out / "checkpoints" / "step_000002").is_dir()


@pytest.mark.parametrize("made_by", ["export", "export --peft", "finetune stopped in its set-up"])
def test_train_does_not_adopt_what_another_command_made(lora_run, corpus, tmp_path, made_by):
    out = tmp_path / "other"
    if made_by.startswith("export"):
        assert cli(["export", *made_by.split()[1:], str(lora_run), str(out)])[0] == 0
        message = "holds files tegaki did not write"
    else:  # a fine-tune writes its run.json before anything else
        out.mkdir()
        shutil.copy(lora_run / "run.json", out / "run.json")
        message = "holds a run of `tegaki finetune`"
    before = snapshot(out)
    for fresh in ([], ["--fresh"]):
        rc, err = cli(train_args(out, corpus, 2, *fresh))
        assert_refused(rc, err, "train", message)
        assert snapshot(out) == before


def test_a_train_refused_in_its_set_up_leaves_an_empty_folder_empty(corpus, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    rc, err = cli(train_args(out, corpus, 2, "--set", "n_head=3"))  # 32 channels do not split in 3 heads
    assert rc == 2 and "Traceback" not in err, err
    assert list(out.iterdir()) == []  # no made_by.json to keep finetune or export out


def test_a_mark_of_another_command_is_refused(corpus, tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "made_by.json").write_text('{"command": "finetune"}')
    rc, err = cli(train_args(out, corpus, 2))
    assert_refused(rc, err, "train", "holds a run of `tegaki finetune`")
    assert sorted(p.name for p in out.iterdir()) == ["made_by.json"]


# --- 9. a run made by one command is not continued by another -----------------------------------------


def test_finetune_does_not_adopt_a_pretraining_run(run_copy, records, corpus):
    before = snapshot(run_copy)
    rc, err = cli(finetune_args(run_copy, records, run_copy))
    assert_refused(rc, err, "finetune", "holds a run of `tegaki train`")
    assert "give it as --model" in err
    assert snapshot(run_copy) == before
    rc, err = cli(train_args(run_copy, corpus, 6))  # the original still resumes
    assert rc == 0 and "(step 4)" in err, err


def test_train_does_not_adopt_a_fine_tune(lora_run, corpus, tmp_path):
    run = tmp_path / "ft"
    shutil.copytree(lora_run, run)
    before = snapshot(run)
    for fresh in ([], ["--fresh"]):
        rc, err = cli(train_args(run, corpus, 2, *fresh))
        assert_refused(rc, err, "train", "holds a run of `tegaki finetune`")
        assert snapshot(run) == before


def test_a_fine_tune_resumes_in_its_own_folder(lora_run, base, records, tmp_path):
    run = tmp_path / "ft"
    shutil.copytree(lora_run, run)
    args = finetune_args(base, records, run, "--lora-targets", "all", "--chat-template", "plain")
    rc, err = cli([*args, "--max-steps", "4"])
    assert rc == 0 and "(step 2)" in err, err


# --- 11, 12. export writes into a new folder or an earlier export --------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": b'{"mine": true}', "tokenizer.json": b'{"mine": true}'},
        {"model.safetensors.index.json": b'{"weight_map": {"wte.weight": "model-00001-of-00002.safetensors"}}'},
        {"notes.txt": b"mine"},
    ],
    ids=["config-and-tokenizer", "old-sharded-index", "notes"],
)
def test_export_leaves_a_persons_folder_alone(lora_run, tmp_path, files):
    out = tmp_path / "hf"
    before = users_folder(out, files)
    rc, err = cli(["export", str(lora_run), str(out)])
    assert_refused(rc, err, "export", "holds files tegaki export did not write")
    assert snapshot(out) == before


def test_export_peft_leaves_a_persons_adapter_alone(lora_run, tmp_path):
    out = tmp_path / "adapter"
    before = users_folder(out, {"adapter_config.json": b'{"peft_type": "LORA", "mine": true}'})
    rc, err = cli(["export", "--peft", str(lora_run), str(out)])
    assert_refused(rc, err, "export", "holds files tegaki export did not write (adapter_config.json)")
    assert snapshot(out) == before


def test_export_again_replaces_its_own_export(lora_run, base, tmp_path):
    out = tmp_path / "hf"
    assert cli(["export", str(lora_run), str(out)])[0] == 0
    assert cli(["export", str(lora_run), str(out)])[0] == 0  # an earlier export: replaced
    assert cli(["export", str(base), str(out)])[0] == 0  # another model into it: its files, all of them
    expected = from_pretrained(base).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_pretrained(out).state_dict().items())
    peft_out = tmp_path / "adapter"
    assert cli(["export", "--peft", str(lora_run), str(peft_out)])[0] == 0
    assert cli(["export", "--peft", str(lora_run), str(peft_out)])[0] == 0
    rc, err = cli(["export", str(lora_run), str(peft_out)])  # an adapter's folder is not a model's
    assert_refused(rc, err, "export", "holds files tegaki export did not write")


def test_export_without_a_tokenizer_leaves_no_earlier_tokenizer_behind(base, tmp_path):
    out = tmp_path / "hf"
    model = from_pretrained(base)
    export_hf(model, out, tokenizer=tiny_tokenizer())
    export_hf(model, out)
    assert not (out / "tokenizer.json").exists()


def test_a_single_weights_file_is_read_before_a_stray_index_as_transformers_does(base, tmp_path):
    """A folder holding model.safetensors and an index of shards that are gone: transformers loads
    the single file, and so does tegaki."""
    out = export_hf(from_pretrained(base), tmp_path / "hf")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    expected = from_pretrained(base).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in from_pretrained(out).state_dict().items())


def test_export_peft_with_its_base_replaces_its_own_and_names_a_stranger_in_base(base, records, tmp_path):
    """A run that added ChatML's tokens: the adapter's base is written beside it, in OUT/base."""
    run, out = tmp_path / "ft", tmp_path / "adapter"
    assert cli(finetune_args(base, records, run, "--lora-targets", "all"))[0] == 0
    assert cli(["export", "--peft", str(run), str(out)])[0] == 0
    assert (out / "base" / "model.safetensors").is_file()
    assert cli(["export", "--peft", str(run), str(out)])[0] == 0  # its own: replaced
    (out / "base" / "notes.txt").write_text("mine")
    before = snapshot(out)
    rc, err = cli(["export", "--peft", str(run), str(out)])
    assert_refused(rc, err, "export", "holds files tegaki export did not write (base/notes.txt)")
    assert snapshot(out) == before
