"""Training settings: `TrainConfig` (every `tegaki train` flag, with its default), TOML config files, checks.

A setting comes from, in this order of precedence: the command line, a --config TOML file (the same
keys, dashes or underscores; a [model] table sets ModelConfig fields), then TrainConfig's default.
Wherever it comes from, `check_settings` checks it, in one place: its type (a bool is true or false,
never the text "no"), then its range.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tegaki.config import public_fields, type_problem
from tegaki.data import VAL_FRACTION
from tegaki.errors import TegakiError


@dataclass
class TrainConfig:
    """Every `tegaki train` flag; a TOML --config file holds the same keys (dashes or underscores)."""

    # The defaults are `make demo`'s run: the demo preset on Shakespeare, 500 steps of 8 x 256 tokens.
    data: str = "shakespeare"
    preset: str = "demo"
    out: str = "runs/demo"
    max_steps: int = 500
    batch_size: int = 8
    block_size: int | None = None  # training sequence length; None: the model's block_size
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    warmup: int | None = None  # None: DEFAULT_WARMUP, at most a tenth of max_steps (`warmup_steps`)
    schedule: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    dtype: str = "auto"  # "auto" | "fp32" | "bf16"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    compile: bool = False
    tokenizer: str | None = None  # None: a BPE trained on the corpus (small vocab) or "gpt2"
    text_column: str | None = None
    val_fraction: float = VAL_FRACTION
    eval_every: int = 100
    eval_batches: int = 10
    sample_every: int = 100
    sample_tokens: int = 200
    save_every: int = 100
    keep: int = 3
    seed: int = 1337
    fsdp: bool = False
    fresh: bool = False
    progress: bool = True
    set: list[str] = field(default_factory=list)  # ModelConfig overrides, "field=value"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SETTING_TYPES = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}  # "int | None", as type_problem reads

SCHEDULES = ("cosine", "wsd")  # --schedule
DTYPE_CHOICES = ("auto", "fp32", "bf16")  # --dtype

SEED_MAX = 2**63 - 1  # seeds are 0 .. SEED_MAX: torch, numpy and Python all take those

# Keys that change what the run computes: resuming with a different value would not be a resume.
RESUME_KEYS = ("batch_size", "block_size", "grad_accum", "seed", "dtype")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file with the same keys as the flags; a [model] table sets ModelConfig fields."""
    import tomllib

    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TegakiError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise TegakiError(f"{path} is not UTF-8 text (byte {e.start}); a TOML file is UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise TegakiError(f"{path} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "model":
            if not isinstance(value, dict):
                raise TegakiError(f"{path}: [model] must be a table of ModelConfig fields")
            values.setdefault("set", [])
            values["set"] += [model_assignment(path, k, v) for k, v in value.items()]
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise TegakiError(f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(known))}, [model]")
        problem = type_problem(SETTING_TYPES[name], value)
        if problem:
            raise TegakiError(f"{path}: {key} {problem}")
        values[name] = value
    return values


def model_assignment(path: str | os.PathLike, key: str, value: Any) -> str:
    """A [model] entry of a TOML file as the "field=value" text --set takes, once its TOML type is
    the field's: `causal = "no"` is refused, not read as a word that might mean false."""
    annotations = {f.name: str(f.type) for f in public_fields()}
    problem = type_problem(annotations.get(key.replace("-", "_"), "str"), value)
    if problem:
        raise TegakiError(f"{path}: [model] {key} {problem}")
    text = json.dumps(value) if isinstance(value, list) else str(value).lower() if type(value) is bool else value
    return f"{key}={text}"


def resolve_config(cli: dict[str, Any]) -> TrainConfig:
    """Flags given on the command line win over the config file, which wins over the defaults."""
    values: dict[str, Any] = {}
    if cli.get("config"):
        values.update(load_config_file(cli["config"]))
    for key, value in cli.items():
        if key in ("config", "func", "command") or value is None:
            continue
        if key == "set":
            values["set"] = list(values.get("set", [])) + list(value)
        else:
            values[key] = value
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in known})
    check_settings(cfg)
    return cfg


def check_settings(cfg: TrainConfig) -> None:
    """Refuse settings no run can use, naming the flag and what it takes."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TegakiError(message)

    for f in dataclasses.fields(cfg):
        problem = type_problem(str(f.type), getattr(cfg, f.name))
        need(problem is None, f"--{f.name.replace('_', '-')} {problem}")
    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "keep"):
        value = getattr(cfg, name)
        need(value >= 1, f"--{name.replace('_', '-')} must be at least 1, got {value}")
    need(cfg.block_size is None or cfg.block_size >= 1, f"--block-size must be positive, got {cfg.block_size}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0 (0: no clipping), got {cfg.grad_clip}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(
        0.0 <= cfg.beta1 < 1.0 and 0.0 <= cfg.beta2 < 1.0,
        f"beta1 and beta2 must be in [0, 1), got {cfg.beta1} and {cfg.beta2}",
    )
    need(cfg.sample_every >= 0, f"--sample-every must be >= 0 (0: never), got {cfg.sample_every}")
    need(cfg.sample_tokens >= 1, f"--sample-tokens must be at least 1, got {cfg.sample_tokens}")
    check_seed(cfg.seed)
    need(cfg.warmup is None or cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.schedule in SCHEDULES, f"--schedule must be cosine or wsd, got {cfg.schedule!r}")
    need(cfg.dtype in DTYPE_CHOICES, f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    need(0.0 < cfg.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    need(0.0 <= cfg.decay_fraction <= 1.0, f"decay_fraction must be in [0, 1], got {cfg.decay_fraction}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed every random generator takes: a whole number from 0 to 2**63 - 1."""
    if type(seed) is not int or not 0 <= seed <= SEED_MAX:
        raise TegakiError(f"{flag} must be a whole number from 0 to {SEED_MAX} (2**63 - 1), got {seed}")
