"""Training: `train(cfg)` trains (or resumes) the run a `TrainConfig` describes.

    settings.py     TrainConfig (every `tegaki train` flag and its default), TOML config files, checks
    schedule.py     learning rate (warmup, cosine, warmup-stable-decay), AdamW, FLOPs per token
    setup.py        the run's tokenizer, its token shards, its model config (device and dtype: tegaki.device)
    distributed.py  the process group under torchrun (DDP, FSDP2)
    loop.py         `Run`: the steps, validation, samples, checkpoints, resume; `train(cfg)`

The run folder it writes (checkpoints, metrics.jsonl, run.json) belongs to tegaki/checkpoint.py;
the `tegaki train` command to tegaki/cli/train.py.
"""

from tegaki.checkpoint import (  # the run folder's home is tegaki.checkpoint; these names stay for older code
    MetricsLog,
    check_checkpoint,
    find_checkpoint,
    load_run_model,
    load_run_tokenizer,
    read_metrics,
    read_run_json,
    save_checkpoint,
)
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
    setup_tokenizer,
    token_byte_lengths,
)

__all__ = [
    "BatchHook",
    "broadcast_object",
    "build_model_config",
    "build_optimizer",
    "check_checkpoint",
    "check_settings",
    "DEFAULT_WARMUP",
    "Dist",
    "DTYPE_CHOICES",
    "find_checkpoint",
    "flops_per_token",
    "flushed_subnormals",
    "init_distributed",
    "load_config_file",
    "load_run_model",
    "load_run_tokenizer",
    "lr_at",
    "MetricsLog",
    "padded_vocab",
    "PlotHook",
    "read_metrics",
    "read_run_json",
    "resolve_config",
    "RESUME_KEYS",
    "Run",
    "save_checkpoint",
    "SCHEDULES",
    "setup_data",
    "setup_tokenizer",
    "token_byte_lengths",
    "train",
    "TrainConfig",
    "warmup_steps",
]
