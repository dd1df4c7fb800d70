"""LoRA vs full fine-tuning on the CPU: time per step and optimizer state, side by side; and, given
two models, the held-out response loss before and after a fine-tune.

    python -m benchmarks.bench_finetune                                  # speed and optimizer state
    python -m benchmarks.bench_finetune --base runs/demo --tuned runs/demo-lora   # + response loss
    python -m benchmarks.bench_finetune --shape gpt2 --batch 2 --rounds 5 --steps 1  # GPT-2 124M

`--shape gpt2` is GPT-2 124M's shape (12 x 768, vocabulary 50,257): the model people fine-tune on
a CPU, where the batch is small and full fine-tuning's AdamW update of 124M weights is a visible
part of a step; the default shape is small and its batch large, where a step is nearly all matmuls.

One step = forward + backward + gradient clipping + AdamW update (tegaki.train's build_optimizer),
on the same model (GPT-2-shaped, 6 layers, 384 wide, vocabulary 8,192) and the same batch
(8 x 256 tokens, the prompt half masked with -100). LoRA: r=8, alpha=16 on q and v, the base frozen.
The two alternate, round after round, so a change in machine load hits both alike; each figure is
the median of the rounds with their range (and fastest vs fastest: on a shared machine, the least
disturbed round). Optimizer state: the bytes of AdamW's exp_avg and
exp_avg_sq after a step.
"""

from __future__ import annotations

import argparse
import datetime
import statistics

import torch

from benchmarks.common import command_line, interleaved_seconds
from tegaki.config import ModelConfig
from tegaki.device import cpu_summary
from tegaki.eval.text import score_records
from tegaki.finetune.loop import chat_template_for
from tegaki.load import from_pretrained, tokenizer_for
from tegaki.lora import LoRASettings, add_lora
from tegaki.model import GPT
from tegaki.train import TrainConfig, build_optimizer

SHAPES = {
    "small": {"vocab_size": 8192, "n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    "gpt2": {"vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
}


def contender(method: str, shape: dict):
    torch.manual_seed(0)
    model = GPT(ModelConfig.preset("tiny").replace(**shape))
    if method == "lora":
        add_lora(model, LoRASettings(r=8, alpha=16, targets=("q", "v")))
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, weight_decay=0.0), torch.device("cpu"))
    return model.train(), optimizer


def step(model, optimizer, inputs, targets) -> None:
    _, loss = model(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def optimizer_bytes(optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    )


def measure(shape: dict, rounds: int, steps: int, batch: int, seq: int) -> dict:
    torch.manual_seed(1)
    inputs = torch.randint(0, shape["vocab_size"], (batch, seq))
    targets = inputs.roll(-1, dims=1)
    targets[:, : seq // 2] = -100  # the prompt: no loss, as in fine-tuning
    runs = {m: contender(m, shape) for m in ("full", "lora")}
    for model, optimizer in runs.values():
        step(model, optimizer, inputs, targets)  # warm-up (and creates the optimizer state)
    steppers = {m: (lambda m=m: step(*runs[m], inputs, targets)) for m in runs}
    times = interleaved_seconds(steppers, rounds, repeat=steps)
    return {
        m: {
            "ms": [t * 1000 for t in times[m]],
            "state": optimizer_bytes(runs[m][1]),
            "trainable": sum(p.numel() for p in runs[m][0].parameters() if p.requires_grad),
        }
        for m in runs
    }


def response_losses(base: str, tuned: str, records: str, max_seq_len: int) -> dict:
    out = {}
    for name in (base, tuned):
        model, tokenizer = from_pretrained(name), tokenizer_for(name)
        template = chat_template_for(name, model, tokenizer, None)
        out[name] = score_records(model, tokenizer, template, records, max_seq_len)
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_finetune", description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=SHAPES, default="small", help="the model's shape (see above)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per round")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--base", help="a model before fine-tuning")
    p.add_argument("--tuned", help="the same model after")
    p.add_argument("--records", default="instructions-heldout", help="held-out records (default: the bundled set's)")
    p.add_argument("--max-seq-len", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    print(f"$ {command_line('bench_finetune')}")
    print(
        f"date {datetime.date.today()}; torch {torch.__version__}; {args.threads} threads; CPU flags: {cpu_summary()}"
    )
    print(f"model {shape}; batch {args.batch} x {args.seq}; {args.rounds} rounds of {args.steps} steps")
    results = measure(shape, args.rounds, args.steps, args.batch, args.seq)
    print(f"{'method':<6} {'ms/step (median, min-max)':>28} {'trainable':>12} {'optimizer state':>16}")
    for method, r in results.items():
        ms = r["ms"]
        print(
            f"{method:<6} {statistics.median(ms):>12.0f} ({min(ms):.0f}-{max(ms):.0f}){'':>6} "
            f"{r['trainable']:>12,} {r['state'] / 2**20:>13.2f} MiB"
        )
    full, lora = results["full"], results["lora"]
    ratios = sorted(f / l for f, l in zip(full["ms"], lora["ms"]))
    print(
        f"LoRA speed-up per step: {statistics.median(ratios):.2f}x median of the rounds ({ratios[0]:.2f}-"
        f"{ratios[-1]:.2f}x), {min(full['ms']) / min(lora['ms']):.2f}x fastest vs fastest; "
        f"optimizer state {lora['state'] / full['state']:.2%} of full's"
    )
    if args.base and args.tuned:
        for name, score in response_losses(args.base, args.tuned, args.records, args.max_seq_len).items():
            print(f"held-out response loss {score.loss:.4f} ({score.tokens:,} tokens, {score.records} records): {name}")


if __name__ == "__main__":
    main()
