"""Small models for the server's tests, written as transformers folders (config.json + safetensors +
tokenizer.json + tokenizer_config.json), the way `tegaki serve --model FOLDER` reads them.

The model has learned one Japanese passage by heart (a few seconds of training), so its greedy
continuation is known text full of characters that byte-level tokens split in two or three: what
the UTF-8 streaming checks need. Its tokenizer has ChatML's special tokens, so tegaki's default
chat template applies.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from tegaki.config import ModelConfig
from tegaki.load import export_hf
from tegaki.model import GPT
from tegaki.tokenizer import train_bpe

PASSAGE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。The cat sat on the mat. "
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_EXAMPLE = "<|im_start|>user\nこんにちは<|im_end|>\n<|im_start|>assistant\n吾輩は猫である。<|im_end|>\n"


def build_model(block_size: int = 128, train_steps: int = 60, seed: int = 0):
    """(model, tokenizer): a 2-layer GPT that continues PASSAGE, and a tokenizer with ChatML tokens.
    train_steps=0: random weights."""
    # A small vocabulary learned from the passage itself: most Japanese characters stay split in bytes.
    tok = train_bpe([PASSAGE * 4], 300 + len(SPECIALS), special_tokens=SPECIALS, name="tiny-ja")
    config = ModelConfig.preset("tiny").replace(
        vocab_size=tok.vocab_size, n_layer=2, n_head=4, n_embd=64, block_size=block_size
    )
    torch.manual_seed(seed)
    model = GPT(config)
    if train_steps == 0:  # random weights: for tests that need a long context, not known text
        return model.eval(), tok
    # Two rows: the passage, and a ChatML exchange, each from position 0 as a prompt will be.
    rows = [tok.encode(PASSAGE * 8)[: block_size + 1], tok.encode(CHATML_EXAMPLE * 8)[: block_size + 1]]
    ids = torch.tensor(rows)  # (2, block_size + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(train_steps):  # memorise: enough for a greedy continuation to follow the passage
        _, loss = model(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


def write_model_folder(folder: Path, chat_template: str | None = None, chatml: bool = True, **kwargs) -> Path:
    """A transformers folder of `build_model`; chat_template goes into tokenizer_config.json."""
    model, tok = build_model(**kwargs)
    export_hf(model, folder, tokenizer=tok)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if chat_template is not None:
        config["chat_template"] = chat_template
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    if not chatml:  # a tokenizer without ChatML's tokens: no default template applies
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] == "<|endoftext|>"]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return folder


# -------------------------------------------------------------------------------------------------
# A real server process on 127.0.0.1
# -------------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server_process(model: Path, *args: str, timeout: float = 90.0, threads: int = 1, launcher=None):
    """`tegaki serve --model MODEL` on a free port, on `threads` threads (one: tiny models run faster,
    and the cores are shared); yields (the process, its base URL) once it answers; stops it afterwards.
    launcher: what runs `serve ...` in place of `python -m tegaki` (a benchmark's own wrapper)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = str(threads)
    launcher = launcher or [sys.executable, "-m", "tegaki"]
    command = [*launcher, "serve", "--model", str(model), "--port", str(port), *args]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            yield proc, _wait_until_up(proc, log, f"http://127.0.0.1:{port}", timeout)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def running_server(model: Path, *args: str, timeout: float = 90.0):
    """`tegaki serve --model MODEL` on a free port; yields its base URL; stops it afterwards."""
    with server_process(model, *args, timeout=timeout) as (_, url):
        yield url


def _wait_until_up(proc, log, url: str, timeout: float) -> str:
    """Poll /health (bounded); the server's output in the error if it exits or never answers."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read().decode()}")
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return url
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer /health within {timeout} s") from None
            time.sleep(0.2)


def health(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "/health", timeout=5).read())
