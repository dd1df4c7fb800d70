"""Two revisions of tegaki side by side: decoding and training throughput, before vs after a change.

    python -m benchmarks.bench_revisions 1285955 HEAD            # 5 rounds, a few minutes on 2 cores
    python -m benchmarks.bench_revisions 1285955 HEAD --rounds 3

Each revision is unpacked from git into a temporary folder (`git archive`), and a fresh Python
process measures it; the two revisions take turns, round after round, so that a burst of other work
on a shared machine hurts both alike. Each figure is reported as the median of the rounds with its
range (min-max): a difference smaller than the ranges is not a difference.

What is measured, with the code each revision has (so only the public API that both revisions
share is used):
  decode fp32    GPT-2 124M shapes, random weights, batch 1, a 32-token prompt + 64 new tokens,
                 greedy, `generate` with the KV cache and the revision's decoding layer applied as
                 its `tegaki generate` command applies it
  decode int8    the same with int8 weights and bf16 activations (`--dtype bf16 --quantize int8`)
  train          the `tiny` preset, batch 16 x 256 tokens, forward + backward + AdamW, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from benchmarks.common import ROOT, cpu_text, median_range

# Runs inside the revision's folder: only names both revisions export.
CHILD = r"""
import json, sys, time, warnings
import torch
torch.set_num_threads(int(sys.argv[1]))
from tegaki.config import ModelConfig
from tegaki.model import GPT
from tegaki.generate import generate
from tegaki.quant import quantize_model
import inspect
# Each revision's `tegaki generate` applies its decoding layer: revisions whose generate() takes
# prepare= (tegaki.fastpath, then tegaki.decoding's packed layout) by prepare=True, later ones by
# decoding.prepare_for_decoding (the path measured fastest); the oldest have none.
extra = dict(prepare=True) if "prepare" in inspect.signature(generate).parameters else {}
try:
    from tegaki.decoding import prepare_for_decoding
except ImportError:
    prepare_for_decoding = None
if extra or prepare_for_decoding is None:
    prepare_for_decoding = lambda model: model
warnings.simplefilter("ignore")
out = {}
torch.manual_seed(0)
base = GPT(ModelConfig.preset("gpt2")).eval()
state = {k: v.clone() for k, v in base.state_dict().items()}  # before the decoding layer swaps the head
prompt = torch.randint(0, 50257, (1, 32), generator=torch.Generator().manual_seed(1))
NEW = 64

def decode(model):
    prepare_for_decoding(model)
    generate(model, prompt, 4, temperature=0, **extra)  # warm-up
    t = time.perf_counter()
    generate(model, prompt, NEW, temperature=0, **extra)
    return NEW / (time.perf_counter() - t)

out["decode fp32 tok/s"] = decode(base)
int8 = GPT(base.config).eval()
int8.load_state_dict(state)
int8 = quantize_model(int8, "int8").to(torch.bfloat16)
out["decode int8 tok/s"] = decode(int8)
del base, int8

torch.manual_seed(0)
model = GPT(ModelConfig.preset("tiny")).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 4096, (16, 257), generator=torch.Generator().manual_seed(2))

def step():
    _, loss = model(x[:, :-1], x[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

step()
t = time.perf_counter()
for _ in range(5):
    step()
out["train tok/s"] = 5 * 16 * 256 / (time.perf_counter() - t)
print(json.dumps(out))
"""


def unpack(rev: str, folder: Path) -> str:
    """Write the tree of `rev` into folder; return its short commit id."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return sha


def measure(folder: Path, threads: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(folder))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(threads)], cwd=folder, env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"measuring {folder.name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_revisions", description=__doc__.split("\n\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        revs = {}
        for label, rev in (("before", args.before), ("after", args.after)):
            folder = Path(tmp) / label
            folder.mkdir()
            revs[label] = (unpack(rev, folder), folder)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in revs}
        for r in range(args.rounds):
            order = list(revs) if r % 2 == 0 else list(reversed(revs))  # alternate who goes first
            for label in order:
                results[label].append(measure(revs[label][1], args.threads))
                print(f"round {r + 1} {label}: {results[label][-1]}", file=sys.stderr, flush=True)
    print(f"machine: {cpu_text()}, {args.threads} threads; {args.rounds} rounds, alternating")
    print(f"| figure | before ({revs['before'][0]}) | after ({revs['after'][0]}) | after / before (median) |")
    print("| --- | ---: | ---: | ---: |")
    for key in results["before"][0]:
        before, after = ([r[key] for r in results[label]] for label in ("before", "after"))
        ratio = statistics.median(after) / statistics.median(before)
        print(f"| {key} | {median_range(before, '{:,.1f}')} | {median_range(after, '{:,.1f}')} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
