"""The bad-input table: every mistake a person can make ends in exit code 2 and one line that names
the file or flag and what to do -- no traceback, nothing lost, nothing allocated or downloaded first
(issue 12: "Hangs and memory blow-ups", "Tracebacks instead of messages", "Accepted silently",
"Misleading")."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import pytest
import torch
from reliability_helpers import cli, snapshot, train_args

from tegaki.config import ModelConfig
from tegaki.load import export_hf
from tegaki.model import GPT


@pytest.fixture(scope="module")
def rope_folder(shards, tmp_path_factory) -> Path:
    """A transformers folder of a small rotary (Llama) model: positions past its context are possible."""
    from tegaki.tokenizer import load

    config = ModelConfig.preset("tiny-llama").replace(
        vocab_size=512, n_layer=4, n_embd=64, n_head=4, n_kv_head=4, intermediate_size=128, block_size=64
    )
    return export_hf(GPT(config), tmp_path_factory.mktemp("rope") / "llama", tokenizer=load(shards.parent / "tok"))


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)


def damage(path: Path, text: bytes) -> None:
    path.write_bytes(text)


def hf_config_with(folder: Path, tmp: Path, **changes) -> Path:
    """A copy of a transformers folder with config.json changed."""
    import shutil

    copy = tmp / "changed"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


def wrong_shape_checkpoint(run: Path) -> None:
    from safetensors.torch import load_file, save_file

    for ckpt in (run / "checkpoints").iterdir():
        tensors = load_file(ckpt / "model.safetensors")
        tensors["wte.weight"] = torch.zeros(7, 32)
        save_file(tensors, ckpt / "model.safetensors")
        state = json.loads((ckpt / "state.json").read_text())  # recorded as whole: only the shape is wrong
        from tegaki.checkpoint import file_sha256  # the test rewrites a checkpoint as tegaki would

        state["files"]["model.safetensors"] = {
            "bytes": (ckpt / "model.safetensors").stat().st_size,
            "sha256": file_sha256(ckpt / "model.safetensors"),
        }
        (ckpt / "state.json").write_text(json.dumps(state))


def malicious_bin(folder: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


# (case id, how to damage the world: fn(w) -> None, the command: fn(w) -> args, what the message says)
# w: a dict of paths -- run (a trained run folder, a copy), corpus, rope (a transformers folder), tmp.
TRAIN = [
    ("seed-negative", None, lambda w: ["--seed", "-1"], "--seed must be a whole number from 0"),
    ("grad-clip-negative", None, lambda w: ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    ("sample-every-negative", None, lambda w: ["--sample-every", "-1"], "--sample-every must be >= 0"),
    ("warmup-negative", None, lambda w: ["--warmup", "-1"], "--warmup must be >= 0"),
    ("lr-nan", None, lambda w: ["--lr", "nan"], "--lr must be a finite number"),
    ("init-std-negative", None, lambda w: ["--set", "init_std=-1"], "init_std must be >= 0"),
    (
        "meta-json-garbage",
        lambda w: damage(w["run"] / "data" / "meta.json", b"{garbage"),
        lambda w: [],
        "meta.json is damaged",
    ),
    (
        "prepare-json-garbage",
        lambda w: damage(w["run"] / "data" / "prepare.json", b"\xff\xfe"),
        lambda w: [],
        "prepare.json is damaged",
    ),
    (
        "shard-body-garbage",
        lambda w: damage(
            w["run"] / "data" / "train_000000.bin",
            (w["run"] / "data" / "train_000000.bin").read_bytes()[:32]
            + b"\xff" * ((w["run"] / "data" / "train_000000.bin").stat().st_size - 32),
        ),
        lambda w: [],
        "outside the vocabulary",
    ),
    (
        "checkpoint-wrong-shape",
        lambda w: wrong_shape_checkpoint(w["run"]),
        lambda w: [],
        "does not fit the model of run.json: wte.weight is (7, 32)",
    ),
]


@pytest.mark.parametrize("case, spoil, extra, message", TRAIN, ids=[c[0] for c in TRAIN])
def test_train_bad_input(run_copy, corpus, tmp_path, case, spoil, extra, message):
    w = {"run": run_copy, "corpus": corpus, "tmp": tmp_path}
    if spoil:
        spoil(w)
    before = snapshot(run_copy)
    rc, err = cli(train_args(run_copy, corpus, 6, *extra(w)))
    assert_one_message(rc, err, "train", message)
    assert_nothing_lost(before, snapshot(run_copy))


def test_out_pointing_at_a_file(corpus, tmp_path):
    (tmp_path / "file").write_text("mine")
    rc, err = cli(train_args(tmp_path / "file", corpus, 2))
    assert_one_message(rc, err, "train", "it is a file, not a folder")
    rc, err = cli(train_args(tmp_path / "file" / "run", corpus, 2))
    assert_one_message(rc, err, "train", "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


OTHER = [
    (
        "generate-seed-huge",
        None,
        lambda w: ["generate", "hi", "--model", str(w["run"]), "--seed", "99999999999999999999999"],
        "--seed must be a whole number from 0",
    ),
    (
        "generate-temperature-nan",
        None,
        lambda w: ["generate", "hi", "--model", str(w["run"]), "--temperature", "nan"],
        "temperature must be a finite number",
    ),
    (
        "generate-repetition-nan",
        None,
        lambda w: ["generate", "hi", "--model", str(w["run"]), "--repetition-penalty", "nan"],
        "repetition_penalty must be a finite",
    ),
    (
        "generate-presence-inf",
        None,
        lambda w: ["generate", "hi", "--model", str(w["run"]), "--presence-penalty", "inf"],
        "presence_penalty must be a finite number",
    ),
    (
        "generate-huge-kv-cache",
        None,
        lambda w: ["generate", "hi", "--model", str(w["rope"]), "--max-new-tokens", "1000000000"],
        "a KV cache for 1,000,000,00",
    ),
    (
        "generate-config-n-layer-float",
        None,
        lambda w: ["generate", "hi", "--model", str(hf_config_with(w["rope"], w["tmp"], num_hidden_layers=1e9))],
        "n_layer must be a whole number",
    ),
    (
        "generate-config-n-layer-huge",
        None,
        lambda w: [
            "generate",
            "hi",
            "--model",
            str(hf_config_with(w["rope"], w["tmp"], num_hidden_layers=1_000_000_000)),
        ],
        "parameters x 4 bytes",
    ),
    (
        "generate-config-wrong-type",
        None,
        lambda w: ["generate", "hi", "--model", str(hf_config_with(w["rope"], w["tmp"], hidden_size="wide"))],
        "config.json",
    ),
    (
        "generate-refused-pickle",
        lambda w: malicious_bin(w["rope"]),
        lambda w: ["generate", "hi", "--model", str(w["rope"])],
        "refused for safety",
    ),
    (
        "generate-index-outside",
        lambda w: (  # a sharded folder: no model.safetensors (which is read before an index, as transformers does)
            (w["rope"] / "model.safetensors").unlink(),
            (w["rope"] / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"wte.weight": "../../etc/passwd"}})
            ),
        ),
        lambda w: ["generate", "hi", "--model", str(w["rope"])],
        "outside its folder; refused",
    ),
    (
        "generate-missing-local-path",
        None,
        lambda w: ["generate", "hi", "--model", "runz/nonexistent"],
        "runz/nonexistent: no such local folder",
    ),
    (
        "prepare-workers-negative",
        None,
        lambda w: ["prepare", "--data", str(w["corpus"]), "--out", str(w["tmp"] / "shards"), "--workers", "-1"],
        "--workers must be at least 1",
    ),
    (
        "params-billion-layers",
        None,
        lambda w: ["params", "tiny", "--set", "n_layer=1000000000"],
        "describing a model of 1,000,000,000 layers needs about",
    ),
    (
        "trace-top-negative",
        None,
        lambda w: ["trace", "hi", "--model", str(w["run"]), "--top", "-3"],
        "--top must be at least 1",
    ),
    (
        "compare-lr-negative",
        None,
        lambda w: [
            "compare",
            "--presets",
            "tiny",
            "--out",
            str(w["tmp"] / "cmp"),
            "--lr",
            "-1",
            "--data",
            str(w["corpus"]),
        ],
        "--lr must be positive",
    ),
    (
        "compare-block-size-zero",
        None,
        lambda w: [
            "compare",
            "--presets",
            "tiny",
            "--out",
            str(w["tmp"] / "cmp"),
            "--block-size",
            "0",
            "--data",
            str(w["corpus"]),
        ],
        "--block-size must be positive",
    ),
    (
        "tokenizer-range-empty",
        lambda w: (w["tmp"] / "small.txt").write_text("a few words\n"),
        lambda w: [
            "tokenizer",
            "train",
            "--input",
            str(w["tmp"] / "small.txt"),
            "--range",
            "0:0.001",
            "--vocab-size",
            "300",
            "--out",
            str(w["tmp"] / "tok"),
        ],
        "leaves no text to learn from",
    ),
    (
        "tokenizer-garbage",
        lambda w: (w["run"] / "tokenizer" / "encoder.json").write_text('{"garbage'),
        lambda w: ["generate", "hi", "--model", str(w["run"])],
        "the tokenizer files are damaged",
    ),
    (
        "export-to-a-file",
        lambda w: (w["tmp"] / "file").write_text("mine"),
        lambda w: ["export", str(w["run"]), str(w["tmp"] / "file")],
        "not a folder",
    ),
]


@pytest.mark.parametrize("case, spoil, command, message", OTHER, ids=[c[0] for c in OTHER])
def test_other_commands_bad_input(run_copy, corpus, rope_folder, tmp_path, offline, case, spoil, command, message):
    import shutil

    rope = tmp_path / "rope"
    shutil.copytree(rope_folder, rope)
    w = {"run": run_copy, "corpus": corpus, "rope": rope, "tmp": tmp_path}
    if spoil:
        spoil(w)
    before = snapshot(run_copy)
    start = time.monotonic()
    args = command(w)
    rc, err = cli(args)
    assert_one_message(rc, err, args[0], message)
    assert "this ran" not in err and snapshot(run_copy) == before
    assert time.monotonic() - start < 600  # answered, not hung (a bound only a hang reaches)


def assert_nothing_lost(before: dict[str, str], after: dict[str, str]) -> None:
    """Every file is still there with its bytes; only run.json may have taken the new settings
    (--max-steps) before the refusal, and no temporary file is left."""
    assert set(after) == set(before), set(after) ^ set(before)
    assert {k: v for k, v in after.items() if k != "run.json"} == {k: v for k, v in before.items() if k != "run.json"}


def assert_one_message(rc: int, err: str, command: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err and lines and lines[-1].startswith(f"tegaki {command}: error: "), err
    assert sum("error:" in line for line in lines) == 1 and message in lines[-1], err
