"""`tegaki finetune`: flags -> FineTuneConfig + TrainConfig -> `tegaki.finetune.loop.finetune`."""

from __future__ import annotations

import os

from tegaki.analysis.plot import plot_run_losses
from tegaki.finetune.loop import (
    LR,
    METHODS,
    TRAIN_DEFAULTS,
    FineTuneConfig,
    finetune,
    train_settings,
)
from tegaki.lora import TARGETS
from tegaki.train.settings import DTYPE_CHOICES, SCHEDULES

F = FineTuneConfig  # the defaults, written once there (and in TRAIN_DEFAULTS for the training settings)
T = TRAIN_DEFAULTS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on instruction records (full or LoRA); resumes when run again",
        description="Teach a pretrained model (a tegaki run folder, a transformers folder or a hub id) to "
        "follow instructions: Alpaca {instruction, input, output} or chat {messages} records, one per "
        "line. The loss counts only the responses. The result is a run folder every command loads.",
    )
    a = p.add_argument
    a("--model", required=True, help="the base model: run folder, transformers folder or hub id")
    a("--data", required=True, help="records (.jsonl); 'instructions' is the bundled English + Japanese set")
    a("--out", required=True, help="run folder to write")
    a("--method", choices=METHODS, default=F.method, help=f"whole weights or low-rank adapters (default {F.method})")
    a("--lora-r", type=int, default=F.lora_r, help=f"adapter rank (default {F.lora_r})")
    a("--lora-alpha", type=float, default=F.lora_alpha, help=f"adapter scale numerator (default {F.lora_alpha:g})")
    a("--lora-dropout", type=float, default=F.lora_dropout, help=f"dropout on adapter inputs ({F.lora_dropout})")
    a(
        "--lora-targets",
        default=F.lora_targets,
        help=f"comma list among {','.join(TARGETS)} (mlp: every MLP projection; default {F.lora_targets})",
    )
    a(
        "--max-seq-len",
        type=int,
        default=F.max_seq_len,
        help=f"tokens per packed row; longer records are reported and left out (default {F.max_seq_len})",
    )
    a(
        "--chat-template",
        help="jinja2 template file, or chatml or plain (default: the model's own; else ChatML, its "
        "<|im_start|> and <|im_end|> added to the tokenizer and the embedding)",
    )
    # The training settings: None means "the fine-tune default" (TRAIN_DEFAULTS, LR by method).
    a("--max-steps", type=int, help=f"optimizer steps (default {T['max_steps']})")
    a("--batch-size", type=int, help=f"rows per micro-batch (default {T['batch_size']})")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, help=f"peak learning rate (default {LR['lora']:g} for lora, {LR['full']:g} for full)")
    a("--warmup", type=int, help=f"linear warmup steps (default {T['warmup']})")
    a("--schedule", choices=SCHEDULES, help="after warmup: cosine decay, or warmup-stable-decay")
    a("--weight-decay", type=float, help=f"AdamW weight decay (default {T['weight_decay']})")
    a("--val-fraction", type=float, help=f"share of the records held out (default {T['val_fraction']})")
    a("--eval-every", type=int, help=f"held-out response loss every N steps (default {T['eval_every']})")
    a("--save-every", type=int, help=f"checkpoint every N steps (default {T['save_every']})")
    a("--sample-every", type=int, help="print a sample every N steps; 0: never (default 0)")
    a("--dtype", choices=DTYPE_CHOICES, help="bf16 autocast or fp32 (auto: bf16 on GPUs and on CPUs with AMX)")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--seed", type=int, help="random seed (default: tegaki train's)")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--fresh", action="store_true", default=None, help="start over in --out instead of resuming")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.set_defaults(func=_cmd_finetune)


TRAIN_FLAGS = (
    "out",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "warmup",
    "schedule",
    "weight_decay",
    "val_fraction",
    "eval_every",
    "save_every",
    "sample_every",
    "dtype",
    "device",
    "seed",
    "compile",
    "fresh",
    "progress",
)


def _cmd_finetune(args) -> int:
    ft = FineTuneConfig(
        model=args.model,
        data=args.data,
        method=args.method,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=args.lora_targets,
        max_seq_len=args.max_seq_len,
        chat_template=args.chat_template,
    )
    ft.check()
    cfg = train_settings(ft, {name: getattr(args, name) for name in TRAIN_FLAGS})
    result = finetune(ft, cfg, plot_losses=plot_run_losses)
    if int(os.environ.get("RANK", "0")) == 0 and result.get("loss") is not None:
        val = f", held-out response loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
        print(f"done: step {result['step']}, loss {result['loss']:.4f}{val}; run folder {cfg.out}")
    return 0
