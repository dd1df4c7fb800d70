"""Training throughput: tegaki vs a nanoGPT-style baseline vs the matmul ceiling, in one run.

Shapes (the issue's): a GPT-2-shaped model with 6 layers, 384 wide, 6 heads, vocabulary 50,304,
batch 8 x 256 tokens. One step = forward + backward + AdamW update, as in training.

    python -m benchmarks.bench_train                 # fp32 and bf16, tegaki and baseline
    python -m benchmarks.bench_train --steps 5 --dtypes fp32
    python -m benchmarks.bench_train --prepare        # also: tokenization throughput of `prepare`
    python -m benchmarks.bench_train --nanogpt ~/src/nanoGPT   # also nanoGPT's own model.py

`--nanogpt DIR` imports DIR/model.py from a checkout of nanoGPT (not part of tegaki) and times its
GPT with its own configure_optimizers (fused/foreach AdamW as it chooses) in the same rounds.

The baseline is written here in nanoGPT's manner (fused q/k/v Linear, exact GELU, sdpa attention,
plain foreach AdamW), so both run under the same conditions. The matmul ceilings are measured in
the same process; achieved FLOP/s use `tegaki.train.flops_per_token` (6 per matmul weight per
token + causal attention), the same count for both models. Measurements alternate between the
contenders so that a change in machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import interleaved_seconds
from tegaki.config import ModelConfig
from tegaki.model import GPT
from tegaki.train import TrainConfig, build_optimizer, flops_per_token

SHAPE = dict(vocab_size=50304, n_layer=6, n_head=6, n_embd=384, block_size=256)


# --- a nanoGPT-style baseline, written from the paper-level description -----------------------


class BaselineBlock(nn.Module):
    def __init__(self, c: int, h: int):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.fc, self.out = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class Baseline(nn.Module):
    def __init__(self, vocab: int, layers: int, heads: int, width: int, block: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.blocks = nn.ModuleList(BaselineBlock(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


# --- measuring ---------------------------------------------------------------------------------


def matmul_ceiling(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or count < 2:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


class Contender:
    def __init__(self, name: str, model: nn.Module, optimizer, dtype: str, batch: int, block: int, vocab: int):
        self.name, self.model, self.optimizer, self.dtype = name, model, optimizer, dtype
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (batch, block), generator=gen)
        self.y = torch.randint(0, vocab, (batch, block), generator=gen)
        self.times: list[float] = []

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == "bf16"):
            _, loss = self.model(self.x, self.y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def nanogpt_model(directory: str, config: ModelConfig):
    """nanoGPT's GPT and optimizer from a checkout's model.py, at the same shape."""
    import importlib.util

    path = Path(directory).expanduser() / "model.py"
    if not path.is_file():
        raise SystemExit(f"--nanogpt {directory}: no model.py there (give a nanoGPT checkout)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = dict(vocab_size=config.vocab_size, n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd)
    model = module.GPT(module.GPTConfig(block_size=config.block_size, dropout=0.0, bias=True, **shape))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    return model, optimizer


def build(
    kind: str, dtype: str, batch: int, block: int, compile_model: bool, nanogpt: str | None = None, shape=None
) -> Contender:
    """One contender at SHAPE (or `shape`, a dict of the same keys)."""
    torch.manual_seed(0)
    config = ModelConfig(**(shape or SHAPE))
    if kind == "nanoGPT":
        model, optimizer = nanogpt_model(nanogpt, config)
    elif kind == "tegaki":
        model = GPT(config)
        optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
        if compile_model:
            model = torch.compile(model)
    else:
        model = Baseline(config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.block_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    name = f"{kind}{'+compile' if compile_model else ''} {dtype}"
    return Contender(name, model, optimizer, dtype, batch, block, config.vocab_size)


def time_steps(contenders: list[Contender], warmup: int, steps: int) -> None:
    """Warm-up steps (kernel selection, allocator, compile), then `steps` timed steps of every
    contender, interleaved: a change in machine load hits every contender alike."""
    for c in contenders:
        for _ in range(warmup):
            c.step()
    times = interleaved_seconds({c.name: c.step for c in contenders}, steps)
    for c in contenders:
        c.times += times[c.name]


def bench_training(args) -> None:
    config = ModelConfig(**SHAPE)
    tokens = args.batch * args.block
    flops_step = flops_per_token(config, args.block) * tokens
    print(
        f"model: {sum(p.numel() for p in GPT(config).parameters()) / 1e6:.1f}M parameters, "
        f"batch {args.batch} x {args.block}, {flops_step / 1e9:.1f} GFLOP per step; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    ceilings = {d: matmul_ceiling(torch.float32 if d == "fp32" else torch.bfloat16) for d in args.dtypes}
    for d in list(args.dtypes):
        print(f"matmul ceiling {d}: {ceilings[d] / 1e9:,.1f} GFLOP/s (1024 x 1024 x 1024)")
    if (
        "bf16" in args.dtypes
        and "fp32" in ceilings
        and ceilings["bf16"] < 0.5 * ceilings["fp32"]
        and not args.force_bf16
    ):
        # No native bf16 matmul (no AMX / AVX512-BF16): every bf16 matmul is emulated, a step would
        # take minutes, and bf16 is not what anyone would train with on this machine.
        print("bf16 training skipped: bf16 matmul is slower than fp32 here (no native bf16); --force-bf16 runs it")
        args.dtypes = [d for d in args.dtypes if d != "bf16"]
    kinds = ("tegaki", "baseline", "nanoGPT") if args.nanogpt else ("tegaki", "baseline")
    contenders = [build(kind, d, args.batch, args.block, False, args.nanogpt) for d in args.dtypes for kind in kinds]
    if args.compile:
        contenders += [build("tegaki", d, args.batch, args.block, True) for d in args.dtypes]
    time_steps(contenders, args.warmup, args.steps)
    for d in args.dtypes:  # the ceilings again, after: a drift in load shows up as a change
        again = matmul_ceiling(torch.float32 if d == "fp32" else torch.bfloat16)
        print(f"matmul ceiling {d} after the steps: {again / 1e9:,.1f} GFLOP/s")
        ceilings[d] = max(ceilings[d], again)
    print()
    print("| contender | tokens/s (median) | ms/step | achieved GFLOP/s | ceiling GFLOP/s | of ceiling |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for c in contenders:
        dt = statistics.median(c.times)
        achieved = flops_step / dt
        print(
            f"| {c.name} | {tokens / dt:,.0f} | {dt * 1e3:,.0f} | {achieved / 1e9:,.1f} | "
            f"{ceilings[c.dtype] / 1e9:,.1f} | {achieved / ceilings[c.dtype]:.1%} |"
        )


def bench_prepare(args) -> None:
    import shutil
    import tempfile

    from tegaki.data import Encoder, prepare, shakespeare_text
    from tegaki.tokenizer import load, train_bpe

    text = shakespeare_text()
    work = Path(tempfile.mkdtemp())
    try:
        corpus = work / "corpus.txt"
        corpus.write_text(text * args.repeat)
        size = corpus.stat().st_size
        print(f"\nprepare: {size / 1e6:.1f} MB of plain text (Shakespeare x {args.repeat}), {args.workers} workers")
        # MB per CPU-second (all threads' CPU time) does not depend on what else runs on the machine;
        # times the number of cores it is the throughput of an otherwise idle machine.
        print("| tokenizer | encoder | MB/s (wall) | MB per CPU-second | x cores |")
        print("| --- | --- | ---: | ---: | ---: |")
        bpe = train_bpe(text[:2_000_000], 4096, name="bpe-4096")
        for name, tok in (("gpt2", load("gpt2")), ("bpe-4096 (trained)", bpe)):
            cpu = time.process_time()
            result = prepare(str(corpus), tok, work / name.split()[0], workers=args.workers, progress=False)
            per_cpu = result.text_bytes / 1e6 / (time.process_time() - cpu)
            print(
                f"| {name} | {'tiktoken' if Encoder(tok).fast else 'python'} | {result.mb_per_s:.1f} | "
                f"{per_cpu:.1f} | {per_cpu * args.workers:.1f} |"
            )
        sample = text[:1_000_000]
        cpu = time.process_time()
        bpe.encode_ordinary(sample)
        readable = len(sample.encode()) / 1e6 / (time.process_time() - cpu)
        print(f"| bpe-4096 (trained) | readable Python encoder, 1 MB | | {readable:.1f} | |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout: time its model.py too")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=8, help="timed steps per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time tegaki under torch.compile")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 even where bf16 matmul is emulated")
    p.add_argument("--prepare", action="store_true", help="also time `prepare` (tokens per second)")
    p.add_argument("--prepare-only", action="store_true")
    p.add_argument("--repeat", type=int, default=4, help="copies of Shakespeare in the prepare corpus")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    if not args.prepare_only:
        bench_training(args)
    if args.prepare or args.prepare_only:
        bench_prepare(args)


if __name__ == "__main__":
    main()
