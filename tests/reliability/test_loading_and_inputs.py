"""Loading and inputs (issue 26, cases 13-16 and deep JSON): a damaged weights file, a file that is
not UTF-8, a vocabulary no trainer should allocate, and evaluation settings that meant something
else than they said each end in one message naming the file or flag -- never a traceback."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from finetune_models import make_run, write_records
from reliability_helpers import cli, snapshot, train_args

from tegaki.errors import TegakiError

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON reader follows


def assert_one_message(rc: int, err: str, command: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith(f"tegaki {command}: error: "), err
    assert message in lines[-1], err


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def forged(data: bytes) -> bytes:
    """A header that promises a tensor its bytes do not hold."""
    header = json.dumps({"wte.weight": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 16]}})
    return struct.pack("<Q", len(header)) + header.encode() + data[-16:]


def rewrite_with_hashes(checkpoint: Path, data: bytes) -> None:
    """Replace model.safetensors and update state.json to match, as a careful forger would: the
    sizes and hashes agree, so only reading the file itself finds it out."""
    (checkpoint / "model.safetensors").write_bytes(data)
    state = json.loads((checkpoint / "state.json").read_text())
    state["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "state.json").write_text(json.dumps(state))


def spoil_newest(run: Path, how) -> None:
    for checkpoint in sorted((run / "checkpoints").glob("step_*")):
        rewrite_with_hashes(checkpoint, how((checkpoint / "model.safetensors").read_bytes()))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("base") / "run")


@pytest.mark.parametrize("how", [truncated, forged], ids=["truncated", "forged"])
def test_a_damaged_weights_file_with_matching_hashes_is_one_message(base_run, tmp_path, how):
    import shutil

    from tegaki.load import from_pretrained

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    spoil_newest(run, how)
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    before = snapshot(run)
    for command, args in [
        ("generate", ["generate", "--model", str(run), "hi", "--max-new-tokens", "2", "--device", "cpu"]),
        ("eval", ["eval", "--model", str(run), "--text", str(tmp_path / "t.txt")]),
        ("export", ["export", str(run), str(tmp_path / "hf")]),
    ]:
        rc, err = cli(args)
        assert_one_message(rc, err, command, "model.safetensors: could not read weights")
    with pytest.raises(TegakiError, match="truncated or damaged"):  # what serve and chat load with
        from_pretrained(run)
    assert snapshot(run) == before
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("how", [truncated, forged], ids=["truncated", "forged"])
def test_resuming_a_run_whose_weights_are_damaged_is_one_message(run_copy, corpus, how):
    spoil_newest(run_copy, how)
    rc, err = cli(train_args(run_copy, corpus, 6))
    assert_one_message(rc, err, "train", "could not read weights")


@pytest.mark.parametrize("how", [truncated, forged], ids=["truncated", "forged"])
def test_a_damaged_adapter_is_one_message(base_run, tmp_path, how):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    weights = (sorted((base_run / "checkpoints").glob("step_*"))[-1] / "model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(how(weights))
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    rc, err = cli(["eval", "--model", str(base_run), "--adapter", str(adapter), "--text", str(tmp_path / "t.txt")])
    assert_one_message(rc, err, "eval", "adapter_model.safetensors: could not read")


def test_a_chat_template_that_is_not_utf8_is_one_message(base_run, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_bytes(b"{{ messages }}\xff\xfe")
    data = write_records(tmp_path / "r.jsonl")
    args = ["finetune", "--model", str(base_run), "--data", str(data), "--out", str(tmp_path / "ft")]
    rc, err = cli([*args, "--chat-template", str(template), "--max-steps", "1", "--no-progress"])
    assert_one_message(rc, err, "finetune", "t.jinja is not UTF-8 text")
    rc, err = cli(["eval", "--model", str(base_run), "--records", str(data), "--chat-template", str(template)])
    assert_one_message(rc, err, "eval", "t.jinja is not UTF-8 text")


def test_a_config_file_that_is_not_utf8_is_one_message(corpus, tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b"max_steps = 2\n# \xff\xfe\n")
    rc, err = cli(train_args(tmp_path / "run", corpus, 2, "--config", str(config)))
    assert_one_message(rc, err, "train", "c.toml is not UTF-8 text")
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_no_trainer_should_allocate_is_refused_first(corpus, tmp_path):
    for backend in ("tokenizers", "readable"):
        args = ["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "tok")]
        rc, err = cli([*args, "--backend", backend, "--vocab-size", "1000000000"])
        assert_one_message(rc, err, "tokenizer", "vocab size 1,000,000,000 is more than tegaki trains")
    assert not (tmp_path / "tok").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--window", "0"], "--window must be between 1 and the model's context (64), got 0"),
        (["--window", "-3"], "--window must be between 1"),
        (["--window", "65"], "--window must be between 1 and the model's context (64), got 65"),
        (["--stride", "0"], "--stride must be between 1 and the window (64), got 0"),
        (["--stride", "-5"], "--stride must be between 1"),
        (["--window", "8", "--stride", "9"], "--stride must be between 1 and the window (8), got 9"),
    ],
)
def test_eval_window_and_stride_zero_are_refused_not_the_default(base_run, tmp_path, flags, message):
    (tmp_path / "t.txt").write_text("To be, or not to be: that is the question. " * 4)
    rc, err = cli(["eval", "--model", str(base_run), "--text", str(tmp_path / "t.txt"), *flags])
    assert_one_message(rc, err, "eval", message)


@pytest.mark.parametrize("label", ["true", "false", "1.0", '"0"'])
def test_a_task_label_that_is_not_an_index_is_refused(base_run, tmp_path, label):
    line = f'{{"context": "To be", "endings": [" or not", " a cat"], "label": {label}}}\n'
    (tmp_path / "tasks.jsonl").write_text(line)
    rc, err = cli(["eval", "--model", str(base_run), "--tasks", str(tmp_path / "tasks.jsonl")])
    assert_one_message(rc, err, "eval", f"label must be an index into endings (0..1), got {json.loads(label)!r}")


def test_json_nested_too_deep_is_one_message(base_run, tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + DEEP + "\n")
    args = ["finetune", "--model", str(base_run), "--data", str(data), "--out", str(tmp_path / "ft")]
    rc, err = cli([*args, "--max-steps", "1", "--max-seq-len", "48", "--no-progress"])
    assert_one_message(rc, err, "finetune", "a line after line 1 is JSON nested too deep")
    rc, err = cli(["eval", "--model", str(base_run), "--records", str(data)])
    assert_one_message(rc, err, "eval", "a line after line 1 is JSON nested too deep")
    (tmp_path / "tasks.jsonl").write_text(DEEP + "\n")
    rc, err = cli(["eval", "--model", str(base_run), "--tasks", str(tmp_path / "tasks.jsonl")])
    assert_one_message(rc, err, "eval", "from the first line on is JSON nested too deep")


@pytest.fixture(scope="module")
def hf_folder(base_run, tmp_path_factory) -> Path:
    from tegaki.load import export_hf, from_pretrained, tokenizer_for

    return export_hf(from_pretrained(base_run), tmp_path_factory.mktemp("hf") / "hf", tokenizer_for(base_run))


@pytest.mark.parametrize(
    "folder, file, message",
    [
        ("hf", "config.json", "config.json is not valid JSON"),
        ("hf", "tokenizer.json", "the tokenizer files are damaged (RecursionError"),
        ("hf", "model.safetensors.index.json", "model.safetensors.index.json is damaged (RecursionError"),
        ("run", "checkpoints/step_000001/state.json", "no intact checkpoint"),
        ("run", "tokenizer/tegaki_tokenizer.json", "the tokenizer files are damaged (RecursionError"),
        ("run", "tokenizer/encoder.json", "the tokenizer files are damaged (RecursionError"),
        ("adapter", "adapter_config.json", "adapter_config.json is not valid JSON"),
    ],
)
def test_a_model_file_nested_too_deep_is_one_message(base_run, hf_folder, tmp_path, folder, file, message):
    import shutil

    (tmp_path / "t.txt").write_text("To be, or not to be.")
    model, adapter = tmp_path / "model", []
    if folder == "adapter":
        model, adapter = base_run, ["--adapter", str(tmp_path / "adapter")]
        (tmp_path / "adapter").mkdir()
    else:
        shutil.copytree(hf_folder if folder == "hf" else base_run, model)
    if file == "model.safetensors.index.json":
        (model / "model.safetensors").unlink()
    target = tmp_path / "adapter" / file if folder == "adapter" else model / file
    target.write_text(DEEP)
    rc, err = cli(["eval", "--model", str(model), *adapter, "--text", str(tmp_path / "t.txt")])
    assert_one_message(rc, err, "eval", message)


def test_a_run_json_nested_too_deep_is_rebuilt_from_the_checkpoint(base_run, tmp_path):
    import shutil

    shutil.copytree(base_run, tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text(DEEP)
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    rc, err = cli(["eval", "--model", str(tmp_path / "run"), "--text", str(tmp_path / "t.txt")])
    assert rc == 0 and "run.json is damaged" in err and "rebuilt it from checkpoint step_000001" in err, err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["tokenizer"] == "tokenizer"


def test_finetune_rows_beyond_the_models_context_are_refused_before_they_are_allocated(tmp_path):
    """A rotary model has no learned position table to stop it: 100,000,000 positions would be rows
    of GBs of padding, then activations no machine holds."""
    base = make_run(tmp_path / "llama", preset="tiny-llama")
    data = write_records(tmp_path / "r.jsonl")
    args = ["finetune", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "ft")]
    rc, err = cli([*args, "--max-seq-len", "100000000", "--max-steps", "1", "--no-progress"])
    assert_one_message(rc, err, "finetune", "--max-seq-len 100000000 is beyond the context of")
    assert "(block_size=64); choose at most 64" in err


def test_eval_records_rows_are_at_most_the_models_context(base_run, tmp_path):
    data = write_records(tmp_path / "r.jsonl")
    rc, err = cli(["eval", "--model", str(base_run), "--records", str(data), "--max-seq-len", "100000000"])
    assert rc == 0 and "Traceback" not in err, err  # rows of 64 tokens, not 100,000,001
    for bad in ("1", "0", "-3"):
        rc, err = cli(["eval", "--model", str(base_run), "--records", str(data), "--max-seq-len", bad])
        assert_one_message(rc, err, "eval", f"--max-seq-len must be at least 2, got {bad}")


@pytest.mark.parametrize("alpha", ["nan", "inf", "0", "-1"])
def test_a_lora_alpha_that_is_not_a_finite_positive_number_is_refused_before_training(base_run, tmp_path, alpha):
    data = write_records(tmp_path / "r.jsonl")
    args = ["finetune", "--model", str(base_run), "--data", str(data), "--out", str(tmp_path / "ft")]
    rc, err = cli([*args, "--lora-alpha", alpha, "--max-seq-len", "48", "--max-steps", "1", "--no-progress"])
    assert_one_message(rc, err, "finetune", "--lora-alpha a finite number > 0")
    assert not (tmp_path / "ft").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"peft_type": "LORA"}, "r must be a whole number >= 1, got None"),
        ({"peft_type": "LORA", "r": "abc", "lora_alpha": 1}, "r must be a whole number >= 1, got 'abc'"),
        ({"peft_type": "LORA", "r": 1e300, "lora_alpha": 16}, "r must be a whole number >= 1, got 1e+300"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": "nan"}, "lora_alpha must be a finite number > 0"),
        ({"peft_type": "LORA", "r": 4, "lora_alpha": 16, "target_modules": "q_proj"}, "target_modules must be a list"),
        ([1, 2], "adapter_config.json is not a JSON object"),
    ],
)
def test_an_adapter_config_of_the_wrong_shape_is_one_message(base_run, tmp_path, config, message):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    args = ["eval", "--model", str(base_run), "--adapter", str(tmp_path / "adapter"), "--text", str(tmp_path / "t.txt")]
    rc, err = cli(args)
    assert_one_message(rc, err, "eval", message)


@pytest.mark.parametrize("lora", ["abc", [1], {"r": "x"}, {"r": 4, "alpha": 8, "targets": 5}])
def test_damaged_lora_settings_in_run_json_are_one_message(base_run, tmp_path, lora):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "lora": lora}))
    (tmp_path / "t.txt").write_text("To be, or not to be.")
    rc, err = cli(["eval", "--model", str(run), "--text", str(tmp_path / "t.txt")])
    assert_one_message(rc, err, "eval", "the LoRA settings recorded")


def zeroed(data: bytes) -> bytes:
    return data[:64] + bytes(len(data) - 64)


@pytest.mark.parametrize("how", [truncated, zeroed], ids=["truncated", "zeroed"])
def test_resuming_from_a_damaged_optimizer_state_is_one_message(run_copy, corpus, how):
    for checkpoint in sorted((run_copy / "checkpoints").glob("step_*")):
        data = how((checkpoint / "optimizer.pt").read_bytes())
        (checkpoint / "optimizer.pt").write_bytes(data)
        state = json.loads((checkpoint / "state.json").read_text())
        state["files"]["optimizer.pt"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (checkpoint / "state.json").write_text(json.dumps(state))
    before = snapshot(run_copy)
    rc, err = cli(train_args(run_copy, corpus, 6))
    assert_one_message(rc, err, "train", "optimizer.pt: could not read the optimizer state")
    assert {k: v for k, v in snapshot(run_copy).items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }


@pytest.mark.parametrize("patch", [{"loader": "x"}, {"loader": {}}, {"step": "x"}, {"step": 2.5}])
def test_resuming_from_a_hand_edited_state_json_is_one_message(run_copy, corpus, patch):
    for checkpoint in sorted((run_copy / "checkpoints").glob("step_*")):
        state = json.loads((checkpoint / "state.json").read_text())
        (checkpoint / "state.json").write_text(json.dumps({**state, **patch}))
    rc, err = cli(train_args(run_copy, corpus, 6))
    assert_one_message(rc, err, "train", "state.json is damaged (its step or the data loader's place")


def test_a_training_corpus_nested_too_deep_is_one_message(tmp_path):
    """`tegaki train --data` and `tegaki tokenizer train --input` read .jsonl corpora through the same
    reader: a line nested deeper than Python's JSON reader follows is one message naming the line."""
    data = tmp_path / "corpus.jsonl"
    data.write_text(json.dumps({"text": "To be or not to be"}) + "\n" + DEEP + "\n")
    rc, err = cli(["train", "--data", str(data), "--preset", "tiny", "--max-steps", "1", "--out", str(tmp_path / "r")])
    assert_one_message(rc, err, "train", f"{data}:2: JSON nested too deep to read")
