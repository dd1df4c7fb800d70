"""`tegaki compare`: train several presets under identical conditions; a table, samples and loss curves."""

from __future__ import annotations

import argparse
from pathlib import Path

from tegaki.analysis.compare import CompareSettings, compare, format_report, parse_entries
from tegaki.train import DTYPE_CHOICES

D = CompareSettings  # the defaults, written once there


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several presets under identical conditions; table, samples and loss curves",
        description="Train each preset on the same tokenizer, batches, budget, schedule and seed, then "
        "write DIR/results.json, DIR/report.md and DIR/loss.png. Each preset is trained once per seed (--seeds). "
        "Run it again to resume.",
    )
    _add_what_to_compare(p)
    _add_budget(p)
    _add_running(p)
    p.set_defaults(func=run)


def _add_what_to_compare(p) -> None:
    """The runs: which presets, on which data and tokenizer, written where."""
    a = p.add_argument_group("what to compare").add_argument
    a("--data", default=D.data, help="shakespeare | a .txt/.md/.jsonl/.parquet file or folder | prepared shards")
    a(
        "--presets",
        required=True,
        help="comma-separated presets, each optionally with :field=value overrides, "
        "e.g. tiny,tiny-llama,tiny:causal=false",
    )
    a("--out", required=True, help="output folder")
    a("--tokenizer", default=D.tokenizer, help="'gpt2' or a tokenizer folder (default: a BPE trained once on the data)")
    a(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ModelConfig field in every run (repeatable)",
    )
    a(
        "--match-params",
        action="store_true",
        default=D.match_params,
        help="scale MLP widths so every run has the first run's parameter count",
    )


def _add_budget(p) -> None:
    """The identical conditions: steps, seeds, batches, schedule and evaluation."""
    a = p.add_argument_group("the identical conditions").add_argument
    a("--max-steps", type=int, default=D.max_steps, help=f"optimizer steps per run (default {D.max_steps})")
    a("--seed", type=int, default=D.seed, help=f"seed of the weights and the batch order (default {D.seed})")
    a(
        "--seeds",
        type=int,
        default=D.seeds,
        help="runs per preset, seeded seed, seed+1, ...; the report gives "
        f"mean ± std and states a difference only where 95%% intervals separate (default {D.seeds})",
    )
    a("--batch-size", type=int, default=D.batch_size, help=f"sequences per step (default {D.batch_size})")
    a(
        "--block-size",
        type=int,
        default=D.block_size,
        help="tokens per sequence (default: the smallest block_size of the presets)",
    )
    a("--lr", type=float, default=D.lr, help=f"peak learning rate (default {D.lr})")
    a("--warmup", type=int, default=D.warmup, help="warmup steps (default: a tenth of the steps, at most 50)")
    a("--eval-every", type=int, default=D.eval_every, help="validation every N steps (default: a tenth of the steps)")
    a(
        "--eval-batches",
        type=int,
        default=D.eval_batches,
        help=f"validation batches per evaluation (default {D.eval_batches})",
    )


def _add_running(p) -> None:
    """How the runs go: precision, device, the decoding timing and samples, resuming."""
    a = p.add_argument_group("running").add_argument
    a("--dtype", default=D.dtype, choices=DTYPE_CHOICES, help=f"training precision (default {D.dtype})")
    a("--device", default=D.device, help=f"auto | cpu | cuda | cuda:N (default {D.device})")
    a(
        "--decode-tokens",
        type=int,
        default=D.decode_tokens,
        help=f"tokens generated to time decoding (default {D.decode_tokens})",
    )
    a("--sample-tokens", type=int, default=D.sample_tokens, help=f"tokens in each sample (default {D.sample_tokens})")
    a("--fresh", action="store_true", default=D.fresh, help="start every run over instead of resuming")
    a("--no-progress", dest="progress", action="store_false", default=D.progress, help="no progress bars")


def run(args: argparse.Namespace) -> int:
    settings = CompareSettings(
        data=args.data,
        entries=parse_entries(args.presets),
        out=Path(args.out),
        max_steps=args.max_steps,
        seed=args.seed,
        seeds=args.seeds,
        batch_size=args.batch_size,
        block_size=args.block_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        tokenizer=args.tokenizer,
        overrides=args.overrides,
        match_params=args.match_params,
        dtype=args.dtype,
        device=args.device,
        decode_tokens=args.decode_tokens,
        sample_tokens=args.sample_tokens,
        progress=args.progress,
        fresh=args.fresh,
    )
    summary = compare(settings)
    print(format_report(summary).split("## Samples")[0].rstrip())
    print(f"\nwrote {settings.out / 'results.json'}, {settings.out / 'report.md'}, {settings.out / 'loss.png'}")
    return 0
