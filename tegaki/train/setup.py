"""Setting a run up: everything a `Run` holds before its first step, and the CPU's float mode.

`setup_run(run)` fills in, in this order: the run folder claimed (tegaki.checkpoint), `tokenizer`
and `tokenizer_ref`, `data_dir`, `model_config` and `block_size`, run.json, `loader` (a
BatchLoader), `val_windows`, `token_bytes`, then `raw_model` (the GPT), `model` (wrapped by DDP or
FSDP), `optimizer` and `forward` (compiled or not). A `setup` hook (`tegaki finetune`'s) fills in
the same. Each choice is decided once and recorded in the run folder (run.json, DIR/tokenizer,
DIR/data), so running the same command again resumes with the same choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tegaki.checkpoint import check_same_run, prepare_run_folder, write_run_json
from tegaki.config import ModelConfig
from tegaki.data import BatchLoader, TokenWindows, is_prepared, iter_documents, load_meta, prepare
from tegaki.device import check_fits
from tegaki.errors import TegakiError
from tegaki.files import atomic_write_folder, atomic_write_json
from tegaki.model import GPT, parameter_count
from tegaki.tokenizer import load as load_tokenizer
from tegaki.tokenizer import train_bpe
from tegaki.tokenizer.choose import choose_pattern
from tegaki.train.distributed import broadcast_object, init_single_process_group
from tegaki.train.schedule import build_optimizer
from tegaki.train.settings import RESUME_KEYS, TrainConfig


def setup_run(run) -> None:
    """`tegaki train`'s set-up of `run` (a tegaki.train.loop.Run): what this file's docstring lists."""
    cfg, d = run.cfg, run.dist
    if d.is_main:
        prepare_run_folder(run.run_dir, "train", cfg.fresh, {"--data": cfg.data, "--tokenizer": cfg.tokenizer})
    d.barrier()
    if d.is_main:
        preset = ModelConfig.preset(cfg.preset)
        preset_vocab = (preset.with_overrides(cfg.set) if cfg.set else preset).vocab_size
        tokenizer, ref = setup_tokenizer(cfg, run.run_dir, preset_vocab, run.say)
        data_dir = setup_data(cfg, run.run_dir, tokenizer, ref, cfg.progress, run.say)
    # Other ranks wait for rank 0 to train the tokenizer and write the shards, then read them.
    ref, data_dir = broadcast_object((ref, str(data_dir)) if d.is_main else None, d)
    if not d.is_main:
        tokenizer = load_tokenizer(ref if is_named_tokenizer(ref) else run.run_dir / ref)
    run.tokenizer, run.tokenizer_ref, run.data_dir = tokenizer, ref, Path(data_dir)
    run.model_config = build_model_config(cfg, tokenizer)
    run.block_size = cfg.block_size or run.model_config.block_size
    if run.block_size > run.model_config.block_size:
        raise TegakiError(
            f"--block-size {run.block_size} is larger than the model's context "
            f"(block_size={run.model_config.block_size}); lower --block-size or raise it with --set block_size=N"
        )
    info = run_info(run)
    (write_run_json if d.is_main else check_same_run)(run.run_dir, info, RESUME_KEYS, run.say)
    setup_data_loaders(run)
    setup_model(run)


def run_info(run) -> dict[str, Any]:
    """run.json's content for a `tegaki train` run."""
    inside = Path(run.data_dir).resolve().is_relative_to(run.run_dir.resolve())
    return {
        "model_config": run.model_config.to_dict(),
        "tokenizer": run.tokenizer_ref,
        # inside the run folder: relative to it, so the folder can be moved
        "data": os.path.relpath(run.data_dir, run.run_dir) if inside else str(run.data_dir),
        "train": run.cfg.to_dict(),
    }


def setup_data_loaders(run) -> None:
    """The training batches (this rank's share), the validation windows, each token's length in bytes."""
    cfg, d = run.cfg, run.dist
    train_windows = TokenWindows(run.data_dir, "train", run.block_size)
    run.val_windows = TokenWindows(run.data_dir, "val", run.block_size)
    if len(run.val_windows) == 0:
        raise TegakiError(
            f"the validation split has {run.val_windows.tokens:,} tokens, fewer than one block of "
            f"{run.block_size + 1}; lower --block-size or raise --val-fraction"
        )
    run.loader = BatchLoader(train_windows, cfg.batch_size, cfg.seed, d.rank, d.world_size)
    run.token_bytes = token_byte_lengths(run.tokenizer, run.model_config.vocab_size).to(run.device)


def setup_model(run) -> None:
    """A new model from `run.model_config`, wrapped for DDP or FSDP2, its optimizer, and its forward."""
    cfg, d = run.cfg, run.dist
    # Refused with the figure before a byte is allocated: weights, gradients and AdamW's two
    # moments are four float32 numbers a parameter.
    check_fits(parameter_count(run.model_config), 16, run.device, f"training this {cfg.preset} model")
    torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
    model = run.raw_model = GPT(run.model_config).to(run.device)
    if cfg.fsdp:
        if not d.enabled:
            run.say("note: --fsdp with one process shards nothing; it still runs, through FSDP2")
            init_single_process_group(run.device)
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)  # each block's weights live in shards, gathered just for its turn
        fully_shard(model)
    elif d.enabled:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    run.model = model
    run.optimizer = build_optimizer(model, cfg, run.device)
    run.forward = torch.compile(model) if cfg.compile else model


def is_named_tokenizer(ref: str) -> bool:
    """A tokenizer known by name ("gpt2"), not a folder."""
    return ref == "gpt2"


def setup_tokenizer(cfg: TrainConfig, run_dir: Path, model_vocab: int, say) -> tuple[Any, str]:
    """The run's tokenizer and how run.json refers to it ("gpt2" or "tokenizer").

    Order: the run folder's own (a resumed run) > --tokenizer > a byte-level BPE trained on the
    corpus with the preset's vocab_size (a preset with GPT-2's vocabulary or more uses "gpt2")."""
    own = run_dir / "tokenizer"
    if cfg.tokenizer is None and own.is_dir():
        return load_tokenizer(own), "tokenizer"
    if cfg.tokenizer is not None:
        if is_named_tokenizer(cfg.tokenizer):
            return load_tokenizer(cfg.tokenizer), cfg.tokenizer
        tok = load_tokenizer(cfg.tokenizer)
        if Path(cfg.tokenizer).resolve() != own.resolve():
            copy_run_tokenizer(tok, own, cfg.tokenizer)
        return tok, "tokenizer"
    if is_prepared(cfg.data):  # shards made with a tokenizer already: use that one
        ref = load_meta(cfg.data)["tokenizer"]
        if not is_named_tokenizer(ref):  # a relative path is relative to the shard folder
            ref = str(Path(cfg.data) / ref)
        return setup_tokenizer(dataclasses.replace(cfg, tokenizer=ref), run_dir, model_vocab, say)
    if model_vocab >= 50257:
        return load_tokenizer("gpt2"), "gpt2"
    return train_run_tokenizer(cfg, own, model_vocab, say), "tokenizer"


def copy_run_tokenizer(tok, own: Path, source: str) -> None:
    """Save --tokenizer into the run folder as DIR/tokenizer. A folder already there is replaced
    only when it is the run's own (run.json refers to it) and no checkpoint was trained with it;
    the same tokenizer again (a resumed run) changes nothing."""
    with tempfile.TemporaryDirectory(dir=own.parent, prefix=".tokenizer-check-", suffix=".tmp") as tmp:
        tok.save(tmp)
        if own.is_dir() and _same_files(Path(tmp), own):
            return
    if own.exists():
        run_json = own.parent / "run.json"
        ours = run_json.exists() and _run_tokenizer_ref(run_json) == "tokenizer"
        if not ours or (own.parent / "checkpoints").exists():
            why = (
                "the run's checkpoints were trained with it"
                if ours
                else "it is not a tokenizer this run folder made (no run.json refers to it)"
            )
            raise TegakiError(
                f"{own} holds another tokenizer than --tokenizer {source}, and {why}; nothing was "
                "replaced. Choose another --out, or leave out --tokenizer to use the one there"
            )
    atomic_write_folder(own, tok.save)


def _same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names if (a / n).is_file()
    )


def _run_tokenizer_ref(run_json: Path):
    try:
        return json.loads(run_json.read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return None


TOKENIZER_SAMPLE_CHARS = 8_000_000  # BPE statistics settle long before; train on at most this much


def train_run_tokenizer(cfg: TrainConfig, folder: Path, vocab_size: int, say):
    """A byte-level BPE trained on (the first 8 million characters of) the corpus, saved into `folder` in
    one rename."""
    texts, size = [], 0
    for _, text in iter_documents(cfg.data, cfg.text_column):
        texts.append(text[: TOKENIZER_SAMPLE_CHARS - size])
        size += len(texts[-1])
        if size >= TOKENIZER_SAMPLE_CHARS:
            break
    if size == 0:
        raise TegakiError(f"the corpus {cfg.data!r} holds no text")
    # `size` counts characters, not bytes (a kana is one character and three UTF-8 bytes)
    amount = f"{size / 1e6:.1f}M characters" if size >= 1e6 else f"{size:,} characters"
    choice = choose_pattern(texts)  # gpt4's pre-tokenization for Japanese/CJK text, else gpt2's
    say(
        f"training a byte-level BPE tokenizer (vocab {vocab_size:,}, pattern {choice.pattern}) on {amount} "
        f"of {cfg.data} ...\n  {choice.reason}"
    )
    start = time.perf_counter()
    tok = train_bpe(texts, vocab_size, choice.pattern, name=f"bpe-{vocab_size}")
    atomic_write_folder(folder, tok.save)
    say(f"tokenizer saved to {folder} ({time.perf_counter() - start:.1f}s)")
    return load_tokenizer(folder)


def setup_data(cfg: TrainConfig, run_dir: Path, tokenizer, tokenizer_ref: str, progress: bool, say) -> Path:
    """Token shards: --data itself when already prepared, else prepared into DIR/data."""
    if is_prepared(cfg.data):
        meta = load_meta(cfg.data)
        if meta["vocab_size"] != tokenizer.vocab_size:
            raise TegakiError(
                f"{cfg.data} was prepared with a {meta['vocab_size']:,}-token vocabulary ({meta['tokenizer']}), "
                f"but the run's tokenizer has {tokenizer.vocab_size:,}; prepare again with this tokenizer"
            )
        return Path(cfg.data)
    folder = run_dir / "data"
    if not (folder / "meta.json").exists():
        say(f"preparing token shards from {cfg.data} into {folder} ...")
    # Stored relative to the shard folder ("../tokenizer"), so a copied or moved run folder still resumes.
    ref = tokenizer_ref if is_named_tokenizer(tokenizer_ref) else os.path.relpath(run_dir / tokenizer_ref, folder)
    if not is_named_tokenizer(tokenizer_ref):
        _relative_tokenizer_ref(folder, run_dir / tokenizer_ref, ref)
    result = prepare(
        cfg.data,
        tokenizer,
        folder,
        tokenizer_ref=ref,
        val_fraction=cfg.val_fraction,
        text_column=cfg.text_column,
        progress=progress,
    )
    if result.seconds:
        say(
            f"  {result.meta['train_tokens']:,} train + {result.meta['val_tokens']:,} validation tokens "
            f"({result.mb_per_s:.1f} MB/s)"
        )
    return folder


def _relative_tokenizer_ref(folder: Path, tokenizer_dir: Path, ref: str) -> None:
    """A run's own tokenizer recorded in DIR/data/prepare.json (and meta.json) as an absolute path,
    "/some/place/tokenizer": those shards were made with DIR/tokenizer, wherever DIR is; the
    reference is rewritten in the relative form, so the settings compare equal."""
    for name in ("prepare.json", "meta.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            settings = json.loads(path.read_text())
        except ValueError:
            continue  # prepare() reports a damaged file
        old = settings.get("tokenizer") if isinstance(settings, dict) else None
        if isinstance(old, str) and os.path.isabs(old) and Path(old).name == tokenizer_dir.name and old != ref:
            settings["tokenizer"] = ref
            atomic_write_json(path, settings)


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple of 64: the LM head matmul runs faster on such shapes
    (GPT-2's 50,257 -> 50,304); the extra rows are never a target and learn to be unlikely."""
    return (n + multiple - 1) // multiple * multiple


def build_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    """The preset, with --set overrides and a vocabulary that fits the tokenizer (padded to 64)."""
    base = ModelConfig.preset(cfg.preset)
    config = base.with_overrides(cfg.set) if cfg.set else base
    set_fields = {item.partition("=")[0].strip().replace("-", "_") for item in cfg.set}
    if "vocab_size" not in set_fields:
        config = config.replace(vocab_size=padded_vocab(tokenizer.vocab_size))
    if config.vocab_size < tokenizer.vocab_size:
        raise TegakiError(
            f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size:,} tokens"
        )
    return config


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """Each token's length in UTF-8 bytes (special tokens and padding rows: 0), for bits per byte:
    the validation loss summed over targets, divided by the bytes of text they stand for."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    specials = set(tokenizer.special_tokens.values())
    for i in range(tokenizer.vocab_size):
        if i not in specials:
            try:
                lengths[i] = len(tokenizer.token_bytes(i))
            except Exception:
                lengths[i] = 0
    return torch.from_numpy(lengths)


@contextlib.contextmanager
def flushed_subnormals(device: str):
    """Flush subnormal floats (|x| < 1.2e-38) to zero while training on a CPU.

    x86 CPUs take a microcode slow path for them, and tiny gradients and Adam moments go subnormal
    late in a run. Zeroing them changes nothing a float32 loss can see. PyTorch's default (off) is
    restored afterwards.
    """
    on_cpu = device in ("auto", "cpu") and not torch.cuda.is_available()
    if on_cpu:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on_cpu:
            torch.set_flush_denormal(False)
