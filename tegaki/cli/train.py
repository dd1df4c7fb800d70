"""`tegaki train`: flags -> `TrainConfig` -> `tegaki.train.train`; resumes when run again."""

from __future__ import annotations

import os

from tegaki.analysis.plot import plot_run_losses
from tegaki.train import DEFAULT_WARMUP, DTYPE_CHOICES, SCHEDULES, TrainConfig, resolve_config, train

D = TrainConfig  # the defaults, written once there


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (resumes when run again)",
        description="Train a tegaki model. Running the same command again resumes from the newest intact "
        "checkpoint. Distributed: torchrun --nproc_per_node N -m tegaki train ...",
    )
    # Every default lives in TrainConfig; None here means "not given", so a --config file can fill it.
    a = p.add_argument
    a("--config", help="TOML file with the same keys as these flags ([model] table: ModelConfig fields)")
    a("--data", help="shakespeare | .txt/.md/.jsonl/.parquet file or folder | prepared shard folder | hub id")
    a("--preset", help=f"model preset (tiny, tiny-llama, gpt2, ...); default {D.preset}")
    a("--out", help=f"run folder (default {D.out})")
    a("--max-steps", type=int, help=f"optimizer steps in total (default {D.max_steps})")
    a("--batch-size", type=int, help=f"sequences per micro-batch per process (default {D.batch_size})")
    a("--block-size", type=int, help="tokens per sequence (default: the model's block_size)")
    a("--grad-accum", type=int, help=f"micro-batches per optimizer step (default {D.grad_accum})")
    a("--lr", type=float, help=f"peak learning rate (default {D.lr:g})")
    a("--min-lr-ratio", type=float, help=f"final lr as a fraction of --lr (default {D.min_lr_ratio})")
    a("--weight-decay", type=float, help=f"AdamW weight decay on matrices (default {D.weight_decay})")
    a("--grad-clip", type=float, help=f"clip the gradient norm to this (default {D.grad_clip})")
    a("--warmup", type=int, help=f"linear warmup steps (default {DEFAULT_WARMUP}, at most a tenth of --max-steps)")
    a("--schedule", choices=SCHEDULES, help="after warmup: cosine decay, or warmup-stable-decay")
    a("--dtype", choices=DTYPE_CHOICES, help="bf16 autocast or fp32 (auto: bf16 on GPUs and on CPUs with AMX)")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--tokenizer", help="'gpt2' or a tokenizer folder (default: a BPE trained on the corpus, saved in the run)")
    a("--text-column", help="column holding the text in jsonl/parquet/hub data")
    a("--val-fraction", type=float, help=f"share of the tokens kept for validation (default {D.val_fraction})")
    a("--eval-every", type=int, help=f"validation loss every N steps (default {D.eval_every})")
    a("--eval-batches", type=int, help=f"validation batches per evaluation (default {D.eval_batches})")
    a("--sample-every", type=int, help=f"print a sample every N steps; 0: never (default {D.sample_every})")
    a("--sample-tokens", type=int, help=f"tokens per sample (default {D.sample_tokens})")
    a("--save-every", type=int, help=f"checkpoint every N steps (default {D.save_every})")
    a("--keep", type=int, help=f"keep the last K checkpoints (default {D.keep})")
    a("--seed", type=int, help=f"random seed (default {D.seed})")
    a("--fsdp", action="store_true", default=None, help="shard parameters with FSDP2 (under torchrun)")
    a("--fresh", action="store_true", default=None, help="start over in --out instead of resuming")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--set", action="append", metavar="FIELD=VALUE", help="override a ModelConfig field (repeatable)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    cfg = resolve_config(vars(args))
    result = train(cfg, plot_losses=plot_run_losses)
    if int(os.environ.get("RANK", "0")) == 0 and result.get("loss") is not None:
        val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
        print(f"done: step {result['step']}, loss {result['loss']:.4f}{val}; run folder {cfg.out}")
    return 0
