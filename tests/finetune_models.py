"""Small base models for the fine-tuning and evaluation tests: tegaki run folders made in a moment
(random weights, a 300-token BPE), and a few instruction records."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tegaki.checkpoint import save_checkpoint
from tegaki.config import ModelConfig
from tegaki.model import GPT
from tegaki.tokenizer import train_bpe

TEXT = "To be, or not to be: that is the question. 猫が好きです。 What is 2 plus 3? 2 + 3 = 5. "
RECORDS = [
    {"instruction": "What is 2 plus 3?", "output": "2 + 3 = 5."},
    {"instruction": "Translate this word.", "input": "cat", "output": "猫"},
    {
        "messages": [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A small model."},
        ]
    },
    {"instruction": "Say yes.", "output": "Yes."},
] * 3


def tiny_tokenizer():
    return train_bpe([TEXT * 4], 300, name="tiny")


def make_run(folder: Path, preset: str = "tiny", seed: int = 0, **overrides) -> Path:
    """A tegaki run folder holding a random 2-layer model of `preset` at step 1."""
    tokenizer = tiny_tokenizer()
    shape = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 320, "block_size": 64, **overrides}
    config = ModelConfig.preset(preset).replace(**shape)
    torch.manual_seed(seed)
    model = GPT(config)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(folder / "tokenizer")
    info = {"model_config": config.to_dict(), "tokenizer": "tokenizer", "train": {}}
    (folder / "run.json").write_text(json.dumps(info))
    save_checkpoint(folder, 1, model.state_dict(), {}, {}, config, keep=1)
    return folder


def write_records(path: Path, records=RECORDS) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path
