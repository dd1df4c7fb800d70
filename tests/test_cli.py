"""The `tegaki` command: a user's mistake is one clear message and exit code 2, never a traceback."""

from __future__ import annotations

import pytest
import torch

from tegaki import decoding
from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.load import export_hf
from tegaki.model import GPT


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err


@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory):
    """A GPT-2-shaped model with GPT-2's vocabulary and only 16 learned positions."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    return export_hf(model, tmp_path_factory.mktemp("short") / "model")


def test_unknown_preset_lists_the_known_ones(capsys):
    code, err = run(capsys, "params", "gpt5")
    assert code == 2 and "unknown preset 'gpt5'" in err and "gpt2-medium" in err and "tiny-gpt-oss" in err
    assert "Traceback" not in err


def test_missing_model_folder(capsys, tmp_path):
    code, err = run(capsys, "generate", "--model", str(tmp_path / "nowhere"), "hello")
    assert code == 2 and "no such folder" in err and "Traceback" not in err


def test_wrong_weights_name_every_problem(capsys, short_context_model, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((short_context_model / "config.json").read_text())
    state = load_file(short_context_model / "model.safetensors")
    state.pop("transformer.ln_f.bias")
    state["transformer.wpe.weight"] = torch.zeros(8, 32)
    save_file(state, broken / "model.safetensors")
    code, err = run(capsys, "generate", "--model", str(broken), "hello")
    assert code == 2 and "missing (1): transformer.ln_f.bias" in err
    assert "transformer.wpe.weight: got (8, 32), expected (16, 32)" in err and "Traceback" not in err


def test_prompt_longer_than_the_context(capsys, short_context_model):
    code, err = run(capsys, "generate", "--model", str(short_context_model), "--max-new-tokens", "4", "word " * 40)
    assert code == 2 and "Traceback" not in err
    assert "16" in err  # the message names the context it does not fit


def test_empty_training_data(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = run(
        capsys,
        "train",
        "--data",
        str(empty),
        "--preset",
        "tiny",
        "--out",
        str(tmp_path / "run"),
        "--max-steps",
        "1",
        "--no-progress",
    )
    assert code == 2 and "empty" in err.lower() and "Traceback" not in err


def test_unknown_option_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["params", "gpt2", "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: tegaki params" in err and "unrecognized arguments: --bogus" in err


def test_bad_set_value_and_field(capsys):
    code, err = run(capsys, "params", "tiny", "--set", "n_layer=four")
    assert code == 2 and "n_layer" in err and "int" in err
    code, err = run(capsys, "params", "tiny", "--set", "n_layers=4")
    assert code == 2 and "n_layers" in err and "Fields:" in err


def _arguments(parser, path):
    """(command path, argument) for every argument of every command and sub-command.
    argparse has no public walk, so this reads its action list (the same one --help prints)."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _arguments(sub, [*path, name])
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield " ".join(path), "/".join(action.option_strings) or action.dest, action


def test_every_argument_of_every_command_has_help():
    from tegaki.cli import build_parser

    arguments = list(_arguments(build_parser(), ["tegaki"]))
    commands = {path for path, _, _ in arguments}
    assert {"tegaki compare", "tegaki trace", "tegaki tokenizer stats", "tegaki tokenizer show"} <= commands
    missing = [f"{path} {name}" for path, name, action in arguments if not (action.help or "").strip()]
    assert missing == [], f"arguments without help text: {missing}"


@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_generate_verbose_says_which_path_each_shape_takes_and_why(capsys, short_context_model, quantize):
    """--verbose: one line per (shape, dtype) with the path chosen and the measured times that chose
    it (float32), and what the quantized layers run (int8)."""
    code, err = run(
        capsys, "generate", "--model", str(short_context_model), "--max-new-tokens", "2", "--verbose", *quantize, "hi"
    )
    assert code == 0 and "Traceback" not in err and "decoding paths (" in err
    if quantize:
        assert "int8, groups of 32:" in err
    else:
        lines = [line for line in err.splitlines() if "float32:" in line]
        shapes = {"96x32", "32x32", "128x32", "32x128", "50257x32"}  # qkv, o_proj, fc, proj, the head
        assert {line.split()[0] for line in lines} == shapes
        for line in lines:
            path = line.split(": ")[1].split()[0]
            assert path in decoding.PATHS and "plain " in line and "median of" in line


def test_generate_reads_escapes_in_the_prompt_as_stop_does(capsys, short_context_model):
    """A shell passes \\n as two characters; tegaki generate reads it as the newline, as --stop does
    (docs/finetuning.md's chat prompt relies on it), and \\\\ as one backslash."""
    code = main(["generate", "--model", str(short_context_model), "--max-new-tokens", "1", "--seed", "0", "a\\nb\\\\c"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("a\nb\\c")


def test_the_model_flags_are_one_set_with_one_default():
    """generate, serve, chat, trace and attention take --model and --device from one place:
    --device auto everywhere; chat samples with generate's flags."""
    from tegaki.cli import build_parser

    parser = build_parser()
    common = ["--model", "m", "--port", "0"]
    for argv in (["generate", "hi", "--model", "m"], ["serve", *common], ["chat", "--model", "m"], ["trace", "hi"]):
        args = parser.parse_args(argv)
        assert args.device == "auto", argv
    assert parser.parse_args(["trace", "hi"]).dtype == "fp32"  # measurements: fp32 unless asked
    chat = parser.parse_args(["chat", "--model", "m", "--min-p", "0.1", "--presence-penalty", "0.5"])
    assert chat.min_p == 0.1 and chat.presence_penalty == 0.5 and chat.quantize is None


def test_serve_without_its_extra_says_how_to_install_it_from_a_clone(capsys, monkeypatch):
    """tegaki is installed from a clone, so the hint is pip install -e '.[serve]', not a PyPI name."""
    import sys

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn fails as when it is missing
    code, err = run(capsys, "serve", "--model", "m")
    assert code == 2 and "pip install -e '.[serve]'" in err and "uvicorn" in err


def test_generate_says_it_is_compiling_before_the_wait(capsys, monkeypatch, short_context_model):
    from tegaki.cli import generate as cli_generate

    monkeypatch.setattr(cli_generate, "compiled_decode_step", lambda model: model)  # no real compile here
    code = main(["generate", "--model", str(short_context_model), "--max-new-tokens", "2", "--compile", "hi"])
    assert code == 0 and "compiling the decode step" in capsys.readouterr().err
