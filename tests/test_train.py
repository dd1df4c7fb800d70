"""The training loop, checkpoints, resume and the `tegaki train` command (tegaki/train/, tegaki/checkpoint/)."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tegaki import data
from tegaki.checkpoint import find_checkpoint, load_run_model, load_run_tokenizer, read_metrics
from tegaki.cli import build_parser, main
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.train import TrainConfig, build_optimizer, flops_per_token, lr_at, resolve_config

REPO = Path(__file__).resolve().parents[1]
# A model small enough that a step takes milliseconds.
MICRO = [
    "--set",
    "n_layer=2",
    "--set",
    "n_embd=32",
    "--set",
    "n_head=2",
    "--set",
    "block_size=32",
    "--eval-batches",
    "2",
    "--sample-every",
    "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "plays.txt").write_text(data.shakespeare_text()[:80_000])
    return folder / "plays.txt"


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory) -> Path:
    """Prepared shards with a small trained BPE: runs that share them skip tokenization."""
    from tegaki.tokenizer import train_bpe

    folder = tmp_path_factory.mktemp("prepared")
    tok = train_bpe(corpus.read_text(), 320, name="bpe-320")
    tok.save(folder / "tok")
    data.prepare(
        str(corpus), tok, folder / "shards", tokenizer_ref=str(folder / "tok"), piece_chars=20_000, progress=False
    )
    return folder / "shards"


def run_cli(args, capsys):
    rc = main(["train", "--no-progress", *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") is None]


# --- schedule and optimizer ---------------------------------------------------------------------


def test_lr_schedules():
    cfg = TrainConfig(lr=1.0, warmup=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, warmup=10, max_steps=110, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(87, wsd) == 1.0  # stable until the last 22 steps
    assert lr_at(98, wsd) == pytest.approx(0.5) and lr_at(109, wsd) == pytest.approx(0.0)


def test_weight_decay_only_on_matrices():
    from tegaki.model import GPT

    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=8))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head once


def test_flops_per_token_matches_parameter_count():
    """Without attention's T-dependent term, 6 FLOPs per weight of every matmul: all parameters
    but the position table and the norms/biases."""
    from tegaki.model import GPT

    config = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_embd=64, block_size=32, bias=False)
    model = GPT(config)
    matmul_weights = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and n != "wpe.weight")
    assert flops_per_token(config, seq_len=0) == 6 * matmul_weights


# --- make demo -----------------------------------------------------------------------------------

# The demo's training compute when benchmarks/RESULTS.md ("The demo run") timed it: flops_per_token
# x tokens of 500 steps of 8 x 256 tokens through the demo preset with its 4,096-token BPE.
DEMO_TIMED_FLOPS = 8.86e12


def make_demo_commands() -> list[list[str]]:
    """The tegaki commands of the Makefile's demo target, each as the argv after `-m tegaki`."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("demo:")) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("\t")), len(lines))
    argvs = [shlex.split(line) for line in lines[start:end]]  # the recipe: the tab-indented lines
    return [argv[argv.index("tegaki") + 1 :] for argv in argvs if "tegaki" in argv]


def test_make_demo_is_the_run_that_was_timed():
    """The README says how long `make demo` takes, measured with its settings: a preset, --max-steps or
    batch that costs more needs a new measurement (then raise DEMO_TIMED_FLOPS). And the samples must
    fit the model's context: a learned position table has no row past block_size, and `tegaki generate`
    would cut them short."""
    train_argv, generate_argv = make_demo_commands()
    assert train_argv[0] == "train" and generate_argv[0] == "generate"
    cfg = resolve_config(vars(build_parser().parse_args(train_argv)))
    config = ModelConfig.preset(cfg.preset).with_overrides(cfg.set)
    block = cfg.block_size or config.block_size
    tokens = cfg.max_steps * cfg.grad_accum * cfg.batch_size * block
    assert config.vocab_size == 4096  # the BPE trained for it, padded to 64
    assert flops_per_token(config, block) * tokens <= 1.01 * DEMO_TIMED_FLOPS
    generate = build_parser().parse_args(generate_argv)
    prompt_tokens = len(generate.prompt.encode())  # a byte-level BPE token is at least one byte
    assert prompt_tokens + generate.max_new_tokens <= config.block_size


# --- the tiny preset trains ----------------------------------------------------------------------


def test_tiny_preset_loss_falls_and_run_folder_contract(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    rc, log = run_cli(
        [
            "--data",
            str(corpus),
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--max-steps",
            "15",
            "--batch-size",
            "4",
            "--block-size",
            "64",
            "--warmup",
            "3",
            "--eval-every",
            "15",
            "--save-every",
            "15",
            "--sample-every",
            "15",
            "--sample-tokens",
            "8",
            "--eval-batches",
            "2",
        ],
        capsys,
    )
    assert rc == 0, log
    curve = losses(out)
    assert len(curve) == 15
    assert sum(curve[-3:]) / 3 < curve[0] - 0.5, curve  # clearly lower than where it started
    info = json.loads((out / "run.json").read_text())
    assert info["tokenizer"] == "tokenizer" and (out / "tokenizer").is_dir()
    assert info["model_config"]["vocab_size"] % 64 == 0
    records = read_metrics(out / "metrics.jsonl")
    assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(records[0])
    val = [r for r in records if r.get("kind") == "val"]
    assert val and val[0]["step"] == 15 and math.isfinite(val[0]["val_bpb"])
    assert (out / "loss.png").stat().st_size > 1000
    model = load_run_model(out)
    tok = load_run_tokenizer(out)
    assert not model.training and model.config == ModelConfig.from_dict(info["model_config"])
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"
    ids = torch.tensor([tok.encode("HAMLET:\nTo be")])
    assert model(ids).shape == (1, ids.shape[1], model.config.vocab_size)


def test_grad_accumulation_equals_the_bigger_batch(shards, tmp_path, capsys):
    common = ["--data", str(shards), "--max-steps", "4", "--dtype", "fp32", "--eval-every", "4", *MICRO]
    assert run_cli([*common, "--out", str(tmp_path / "a"), "--batch-size", "4"], capsys)[0] == 0
    assert run_cli([*common, "--out", str(tmp_path / "b"), "--batch-size", "2", "--grad-accum", "2"], capsys)[0] == 0
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), abs=1e-5)


def test_hooks_see_every_batch_and_draw_the_losses(shards, tmp_path):
    """`on_batch` is handed each micro-batch the run trains on (what `tegaki compare` hashes), in
    the loader's order; `plot_losses` is called once at the end with the run folder."""
    from tegaki.data import BatchLoader, TokenWindows
    from tegaki.train import train

    seen, plotted = [], []
    cfg = TrainConfig(
        data=str(shards),
        out=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        grad_accum=2,
        block_size=16,
        dtype="fp32",
        eval_batches=2,
        sample_every=0,
        progress=False,
        set=["n_layer=1", "n_embd=32", "n_head=2", "block_size=32"],
    )
    result = train(
        cfg,
        on_batch=lambda step, micro, x, y: seen.append((step, micro, x.clone(), y.clone())),
        plot_losses=lambda run_dir: plotted.append(run_dir),
    )
    assert result["step"] == 2 and [(s, m) for s, m, _, _ in seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    loader = BatchLoader(TokenWindows(shards, "train", 16), 2, cfg.seed)
    for _, _, x, y in seen:
        want_x, want_y = loader.next_batch()
        assert torch.equal(x, want_x) and torch.equal(y, want_y) and x.shape == (2, 16)
    assert plotted == [tmp_path / "run"] and not (tmp_path / "run" / "loss.png").exists()


def test_bf16_autocast_and_wsd(shards, tmp_path, capsys):
    out = tmp_path / "bf16"
    rc, log = run_cli(
        [
            "--data",
            str(shards),
            "--out",
            str(out),
            "--max-steps",
            "6",
            "--dtype",
            "bf16",
            "--schedule",
            "wsd",
            "--warmup",
            "2",
            "--lr",
            "0.01",
            "--batch-size",
            "4",
            *MICRO,
        ],
        capsys,
    )
    assert rc == 0, log
    records = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") is None]
    assert all(math.isfinite(r["loss"]) for r in records)
    cfg = TrainConfig(max_steps=6, warmup=2, lr=0.01, schedule="wsd")
    assert [r["lr"] for r in records] == pytest.approx([lr_at(s, cfg) for s in range(6)])


# --- resume ---------------------------------------------------------------------------------------


def _train_cmd(shards: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tegaki",
        "train",
        "--data",
        str(shards),
        "--out",
        str(out),
        "--max-steps",
        str(steps),
        "--save-every",
        "5",
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--batch-size",
        "4",
        "--dtype",
        "fp32",
        "--no-progress",
        "--sample-every",
        "0",
        "--keep",
        "2",
        "--set",
        "n_layer=2",
        "--set",
        "n_embd=64",
        "--set",
        "n_head=2",
        "--set",
        "block_size=32",
    ]


def test_kill_9_then_resume_matches_an_uninterrupted_run(shards, tmp_path):
    steps = 20
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _train_cmd(shards, killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000005").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / f"step_{steps:06d}").exists(), "the run ended before the kill"
    again = subprocess.run(_train_cmd(shards, killed, steps), env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    whole = tmp_path / "whole"
    subprocess.run(_train_cmd(shards, whole, steps), env=env, check=True, capture_output=True)
    assert losses(killed) == losses(whole)  # bit for bit, every step
    assert len(losses(whole)) == steps


def test_truncated_checkpoint_falls_back_then_stops_cleanly(shards, tmp_path, capsys):
    out = tmp_path / "run"
    base = [
        "--data",
        str(shards),
        "--out",
        str(out),
        "--save-every",
        "2",
        "--dtype",
        "fp32",
        "--batch-size",
        "4",
        *MICRO,
    ]
    assert run_cli([*base, "--max-steps", "4"], capsys)[0] == 0
    newest = out / "checkpoints" / "step_000004" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated on disk
    rc, log = run_cli([*base, "--max-steps", "6"], capsys)
    assert rc == 0, log
    assert "step_000004 is damaged" in log and "truncated" in log
    assert "resuming from" in log and "(step 2)" in log and "Traceback" not in log
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") is None] == [1, 2, 3, 4, 5, 6]
    for ckpt in (out / "checkpoints").iterdir():  # now every checkpoint is damaged
        (ckpt / "optimizer.pt").write_bytes(b"garbage")
    rc, log = run_cli([*base, "--max-steps", "8"], capsys)
    assert rc == 2 and "no intact checkpoint" in log and "--fresh" in log and "Traceback" not in log
    # generation reads only the weights: a damaged optimizer.pt does not stop it
    model = load_run_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TegakiError, match="no intact checkpoint.*tegaki train --out"):
        load_run_model(out)
    rc, log = run_cli([*base, "--max-steps", "2", "--fresh"], capsys)
    assert rc == 0 and "resuming" not in log and len(losses(out)) == 2


def test_nan_guard_stops_and_keeps_the_last_good_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "run"
    rc, log = run_cli(
        [
            "--data",
            str(shards),
            "--out",
            str(out),
            "--max-steps",
            "20",
            "--save-every",
            "1",
            "--lr",
            "1e30",
            "--warmup",
            "0",
            "--grad-clip",
            "1e30",
            "--dtype",
            "fp32",
            *MICRO,
        ],
        capsys,
    )
    assert rc == 2, log
    assert "not finite" in log and "last good checkpoint" in log and "Traceback" not in log
    good = find_checkpoint(out)
    assert good is not None and all(torch.isfinite(p).all() for p in load_run_model(out).parameters())


# --- the command line -----------------------------------------------------------------------------


def test_config_file_and_overrides(shards, tmp_path, capsys):
    config = tmp_path / "train.toml"
    config.write_text(
        f'data = "{shards}"\nmax-steps = 3\nbatch_size = 2\n[model]\nn_layer = 1\nn_embd = 32\n'
        "n_head = 2\nblock_size = 16\n"
    )
    out = tmp_path / "run"
    rc, log = run_cli(["--config", str(config), "--out", str(out), "--max-steps", "2"], capsys)
    assert rc == 0, log
    info = json.loads((out / "run.json").read_text())
    assert info["model_config"]["n_layer"] == 1 and info["train"]["batch_size"] == 2
    assert len(losses(out)) == 2  # the flag won over the file
    config.write_text("maxsteps = 3\n")
    rc, log = run_cli(["--config", str(config), "--out", str(out)], capsys)
    assert rc == 2 and "unknown key 'maxsteps'" in log


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--block-size", "64"], "larger than the model's context"),
        (["--set", "block_size=4096", "--block-size", "4096"], "validation split has"),
        (["--set", "n_layerz=2"], "--set expects field=value"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_bad_input_gives_a_clear_message(shards, tmp_path, capsys, extra, message):
    rc, log = run_cli(["--data", str(shards), "--out", str(tmp_path / "r"), "--max-steps", "1", *MICRO, *extra], capsys)
    assert rc == 2 and message in log and "Traceback" not in log, log


def test_empty_and_non_utf8_corpora_via_train(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    rc, log = run_cli(["--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "r1"), *MICRO], capsys)
    assert rc == 2 and "holds no text" in log
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe broken")
    rc, log = run_cli(["--data", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "r2"), *MICRO], capsys)
    assert rc == 2 and "bad.txt is not UTF-8" in log
    rc, log = run_cli(
        ["--data", str(tmp_path / "empty.txt"), "--preset", "nope", "--out", str(tmp_path / "r3")], capsys
    )
    assert rc == 2 and "nope" in log
    # a refused run leaves no --out folder behind; one that existed before is kept
    assert not any((tmp_path / name).exists() for name in ("r1", "r2", "r3"))
    (tmp_path / "mine").mkdir()
    assert run_cli(["--data", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "mine"), *MICRO], capsys)[0] == 2
    assert (tmp_path / "mine").is_dir()


def test_ctrl_c_says_what_was_saved_and_how_to_resume(shards, tmp_path, capsys, monkeypatch):
    from tegaki.train import Run

    out = tmp_path / "run"
    args = [
        "--data",
        str(shards),
        "--out",
        str(out),
        "--max-steps",
        "8",
        "--save-every",
        "2",
        "--dtype",
        "fp32",
        *MICRO,
    ]
    real_step = Run.train_step

    def interrupted_at_5(self, step):
        if step == 4:
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Run, "train_step", interrupted_at_5)
    rc, log = run_cli(args, capsys)
    assert rc == 130 and "the last checkpoint is step 4" in log and "Run the same command again" in log, log
    monkeypatch.setattr(Run, "train_step", real_step)
    rc, log = run_cli(args, capsys)
    assert rc == 0 and "(step 4)" in log and len(losses(out)) == 8, log


@pytest.mark.parametrize("text", ["{", "[]", "\xff"])
def test_damaged_run_json_names_the_file_and_is_rebuilt_from_a_checkpoint(shards, tmp_path, capsys, text):
    out = tmp_path / "run"
    base = ["--data", str(shards), "--out", str(out), "--max-steps", "2", *MICRO]
    assert run_cli(base, capsys)[0] == 0
    intact = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(text, encoding="latin-1")
    for load in (load_run_model, load_run_tokenizer):  # rebuilt from checkpoint step 2, and said so
        assert load(out) is not None
        assert "run.json is damaged" in capsys.readouterr().err
        (out / "run.json").write_text(text, encoding="latin-1")
    rc, log = run_cli([*base[: -len(MICRO)], "--max-steps", "3", *MICRO], capsys)
    assert rc == 0 and "run.json is damaged" in log and "rebuilt it from checkpoint step_000002" in log, log
    assert "(step 2)" in log and len(losses(out)) == 3 and "Traceback" not in log
    assert json.loads((out / "run.json").read_text())["model_config"] == intact["model_config"]
    # with no intact checkpoint to rebuild it from, the file is named and nothing is deleted
    (out / "run.json").write_text(text, encoding="latin-1")
    for ckpt in (out / "checkpoints").iterdir():
        (ckpt / "model.safetensors").write_bytes(b"garbage")
    for load in (load_run_model, load_run_tokenizer):
        with pytest.raises(TegakiError, match="run.json is damaged"):
            load(out)
    rc, log = run_cli([*base[: -len(MICRO)], "--max-steps", "3", *MICRO], capsys)
    assert rc == 2 and "run.json is damaged" in log and "Traceback" not in log, log
    assert len(list((out / "checkpoints").iterdir())) == 2


@pytest.mark.parametrize("old_format", [False, True])
def test_a_copied_run_folder_resumes(corpus, shards, tmp_path, capsys, old_format):
    import shutil

    first = tmp_path / "first"
    base = ["--data", str(corpus), "--tokenizer", str(shards.parent / "tok"), "--dtype", "fp32", *MICRO]
    rc, log = run_cli([*base, "--out", str(first), "--max-steps", "2"], capsys)
    assert rc == 0, log
    if old_format:  # written by an older tegaki: the tokenizer as an absolute path
        for name in ("prepare.json", "meta.json"):
            settings = json.loads((first / "data" / name).read_text())
            settings["tokenizer"] = str(first / "tokenizer")
            (first / "data" / name).write_text(json.dumps(settings))
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)  # moved, not copied: nothing may point back at the old place
    rc, log = run_cli(
        ["--data", str(corpus), "--dtype", "fp32", *MICRO, "--out", str(copy), "--max-steps", "3"], capsys
    )
    assert rc == 0 and "resuming from" in log and "(step 2)" in log, log
    assert len(losses(copy)) == 3
    assert json.loads((copy / "data" / "prepare.json").read_text())["tokenizer"] == os.path.join("..", "tokenizer")
    assert json.loads((copy / "run.json").read_text())["data"] == "data"


def split_qkv(name: str, value, sizes):
    """A tensor of today's qkv, as the three tensors a run folder written before held."""
    layer, _, kind = name.rpartition(".qkv.")
    parts = value.split(list(sizes), dim=0) if value.dim() >= 1 else [value.clone() for _ in sizes]
    return {f"{layer}.{proj}.{kind}": part.clone() for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts)}


def write_in_the_old_format(folder: Path, sizes) -> None:
    """Rewrite a checkpoint as tegaki wrote it before attention had one qkv projection: q_proj/k_proj/v_proj
    weights and biases, their AdamW state split the same way, state.json's sizes and hashes to match."""
    import hashlib

    from safetensors.torch import load_file, save_file

    old = {}
    for name, value in load_file(str(folder / "model.safetensors")).items():
        old.update(split_qkv(name, value, sizes) if ".qkv." in name else {name: value})
    save_file(old, str(folder / "model.safetensors"), metadata={"format": "pt"})
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    optim = saved["optimizer"]
    state = {}
    for name, entry in optim["state"].items():
        if ".qkv." not in name:
            state[name] = entry
            continue
        per_part = {key: split_qkv(name, value, sizes) for key, value in entry.items()}
        for old_name in split_qkv(name, torch.zeros(sum(sizes)), sizes):
            state[old_name] = {key: parts[old_name] for key, parts in per_part.items()}
    for group in optim["param_groups"]:
        group["params"] = [
            old_name
            for n in group["params"]
            for old_name in (split_qkv(n, torch.zeros(sum(sizes)), sizes) if ".qkv." in n else [n])
        ]
    optim["state"] = state
    torch.save(saved, folder / "optimizer.pt")
    info = json.loads((folder / "state.json").read_text())
    for name in info["files"]:
        info["files"][name] = {
            "bytes": (folder / name).stat().st_size,
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
        }
    (folder / "state.json").write_text(json.dumps(info))


def test_a_run_folder_of_the_three_projection_format_loads_and_resumes(shards, tmp_path, capsys):
    """Run folders written before attention had one qkv projection: the weights load (generate,
    export) and the run resumes with the very steps it would have taken."""
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = [
        "--data",
        str(shards),
        "--out",
        str(out),
        "--save-every",
        "2",
        "--dtype",
        "fp32",
        "--preset",
        "tiny-llama",
        "--set",
        "n_kv_head=1",
        "--set",
        "qkv_bias=true",
        *MICRO,
    ]
    assert run_cli([*args, "--max-steps", "2"], capsys)[0] == 0
    new = load_run_model(out)
    old = tmp_path / "old"
    shutil.copytree(out, old)
    write_in_the_old_format(old / "checkpoints" / "step_000002", new.config.qkv_sizes)
    assert "blocks.0.attn.k_proj.bias" in load_file(str(old / "checkpoints" / "step_000002" / "model.safetensors"))
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(load_run_model(old)(ids), new(ids))
    for folder in (out, old):
        rc, log = run_cli([*args[:3], str(folder), *args[4:], "--max-steps", "4"], capsys)
        assert rc == 0 and "(step 2)" in log, log
    assert len(losses(old)) == 4 and losses(old) == losses(out)  # bit for bit
    assert "blocks.0.attn.qkv.weight" in load_file(str(old / "checkpoints" / "step_000004" / "model.safetensors"))


def test_default_warmup_fits_a_short_run(shards, tmp_path, capsys):
    short = TrainConfig(lr=1.0, max_steps=30, min_lr_ratio=0.1)  # --warmup not given
    assert lr_at(2, short) == pytest.approx(1.0)  # peak after a tenth of the run
    assert lr_at(29, short) < 0.11  # and decayed by its end
    assert lr_at(29, TrainConfig(lr=1.0, max_steps=30, warmup=50)) == pytest.approx(0.6)  # an explicit --warmup is kept
    assert lr_at(29, TrainConfig(lr=1.0, max_steps=1000)) == pytest.approx(1.0)  # long runs: 30 steps
    out = tmp_path / "run"
    rc, log = run_cli(["--data", str(shards), "--out", str(out), "--max-steps", "20", *MICRO], capsys)
    assert rc == 0 and "warmup shortened to 2 steps" in log, log
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") is None]
    assert max(lrs) == pytest.approx(2e-3) and lrs[1] == max(lrs) and lrs[-1] < lrs[1] / 5


def test_checkpoint_files_are_readable_safe_to_load_and_resaved_atomically(shards, tmp_path, capsys, monkeypatch):
    import tegaki.checkpoint.checkpoints as checkpoint_module

    out = tmp_path / "run"
    args = [
        "--data",
        str(shards),
        "--out",
        str(out),
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--dtype",
        "fp32",
        *MICRO,
    ]
    assert run_cli(args, capsys)[0] == 0
    folder = out / "checkpoints" / "step_000002"
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "optimizer.pt", "state.json"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # no 0600 weights
    saved = torch.load(folder / "optimizer.pt", weights_only=True)  # no pickled objects: loads safely
    assert {"optimizer", "rng"} <= set(saved)
    # saving step 2 again, killed between the renames: an intact step 2 must survive
    model = load_run_model(out)
    state = json.loads((folder / "state.json").read_text())
    real_replace = os.replace

    def killed(src, dst):
        if str(src).endswith(".tmp"):
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint_module.save_checkpoint(
            out, 2, model.state_dict(), saved, {"loader": state["loader"]}, model.config, keep=3
        )
    monkeypatch.setattr(checkpoint_module.os, "replace", real_replace)
    assert find_checkpoint(out) is not None
    args[args.index("--max-steps") + 1] = "3"
    rc, log = run_cli(args, capsys)
    assert rc == 0 and "(step 2)" in log, log
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
