"""Training: `train(cfg)` trains (or resumes) the run a `TrainConfig` describes.

    settings.py     TrainConfig (every `tegaki train` flag and its default), TOML config files, checks
    schedule.py     learning rate (warmup, cosine, warmup-stable-decay), AdamW, FLOPs per token
    setup.py        what a run holds before its first step: tokenizer, token shards, model config,
                    data loaders, model and optimizer (device and dtype: tegaki.device)
    distributed.py  the process group under torchrun (DDP, FSDP2)
    loop.py         `Run`: the steps, validation, samples, checkpoints, resume; `train(cfg)`

The run folder it writes (run.json, the lock, checkpoints, metrics.jsonl) belongs to
tegaki/checkpoint/; the `tegaki train` command to tegaki/cli/train.py.
"""

from tegaki.train.distributed import Dist, broadcast_object, init_distributed
from tegaki.train.loop import BatchHook, PlotHook, Run, train
from tegaki.train.schedule import (
    DEFAULT_WARMUP,
    build_optimizer,
    flops_per_token,
    lr_at,
    warmup_steps,
)
from tegaki.train.settings import (
    DTYPE_CHOICES,
    RESUME_KEYS,
    SCHEDULES,
    TrainConfig,
    check_settings,
    load_config_file,
    resolve_config,
)
from tegaki.train.setup import (
    build_model_config,
    flushed_subnormals,
    padded_vocab,
    setup_data,
    setup_run,
    setup_tokenizer,
    token_byte_lengths,
)

__all__ = [
    "BatchHook",
    "broadcast_object",
    "build_model_config",
    "build_optimizer",
    "check_settings",
    "DEFAULT_WARMUP",
    "Dist",
    "DTYPE_CHOICES",
    "flops_per_token",
    "flushed_subnormals",
    "init_distributed",
    "load_config_file",
    "lr_at",
    "padded_vocab",
    "PlotHook",
    "resolve_config",
    "RESUME_KEYS",
    "Run",
    "SCHEDULES",
    "setup_data",
    "setup_run",
    "setup_tokenizer",
    "token_byte_lengths",
    "train",
    "TrainConfig",
    "warmup_steps",
]
