"""The training loop, checkpoints and distributed training: `tegaki train`.

One optimizer step, the whole of what training is:

    for each of grad_accum micro-batches:           # accumulate gradients of a bigger batch
        loss = model(inputs, targets)[1]             # forward under bf16 autocast or in fp32
        (loss / grad_accum).backward()               # DDP/FSDP average gradients across ranks here
    clip the gradient norm to --grad-clip            # one bad batch cannot throw the weights away
    lr = warmup, then cosine or warmup-stable-decay  # `lr_at`
    AdamW step (weight decay on matrices only)       # `build_optimizer`

Around it: validation loss and bits per byte every --eval-every steps, a sample every
--sample-every steps, a NaN/inf guard, `metrics.jsonl`, and checkpoints that resume bit for bit.

The run folder (DIR = --out):
    DIR/run.json                 model config, tokenizer ("gpt2" or "tokenizer"), training settings
    DIR/tokenizer/               the run's tokenizer, unless a named one ("gpt2") is used
    DIR/data/                    token shards prepared from raw --data
    DIR/checkpoints/step_NNNNNN/ model.safetensors, optimizer.pt, state.json (sizes + sha256)
    DIR/metrics.jsonl            one JSON line per optimizer step, plus validation and sample lines
    DIR/loss.png                 the loss curves, drawn at the end
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError

# =================================================================================================
# Settings
# =================================================================================================


@dataclass
class TrainConfig:
    """Every `tegaki train` flag; a TOML --config file holds the same keys (dashes or underscores)."""

    data: str = "shakespeare"
    preset: str = "tiny"
    out: str = "runs/demo"
    max_steps: int = 500
    batch_size: int = 8  # x 256 tokens: the tiny preset takes ~0.7 s a step on 2 CPU cores
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
    val_fraction: float = 0.05
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


# Keys that change what the run computes: resuming with a different value would not be a resume.
_RESUME_KEYS = ("batch_size", "block_size", "grad_accum", "seed", "dtype")


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file with the same keys as the flags; a [model] table sets ModelConfig fields."""
    import tomllib

    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TegakiError(f"cannot read config file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TegakiError(f"{path} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "model":
            if not isinstance(value, dict):
                raise TegakiError(f"{path}: [model] must be a table of ModelConfig fields")
            values.setdefault("set", [])
            values["set"] += [f"{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in value.items()]
            continue
        name = key.replace("-", "_")
        if name not in known:
            raise TegakiError(f"{path}: unknown key {key!r}; known keys: {', '.join(sorted(known))}, [model]")
        values[name] = value
    return values


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
    _check_settings(cfg)
    return cfg


def _check_settings(cfg: TrainConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise TegakiError(message)

    for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "save_every", "keep"):
        need(getattr(cfg, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    need(cfg.block_size is None or cfg.block_size >= 1, f"--block-size must be positive, got {cfg.block_size}")
    need(cfg.lr > 0, f"--lr must be positive, got {cfg.lr}")
    need(cfg.warmup is None or cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.schedule in ("cosine", "wsd"), f"--schedule must be cosine or wsd, got {cfg.schedule!r}")
    need(cfg.dtype in ("auto", "fp32", "bf16"), f"--dtype must be auto, fp32 or bf16, got {cfg.dtype!r}")
    need(0.0 < cfg.val_fraction < 1.0, f"--val-fraction must be between 0 and 1, got {cfg.val_fraction}")
    need(0.0 <= cfg.decay_fraction <= 1.0, f"decay_fraction must be in [0, 1], got {cfg.decay_fraction}")


# =================================================================================================
# Learning rate and optimizer
# =================================================================================================


DEFAULT_WARMUP = 30


def warmup_steps(cfg: TrainConfig) -> int:
    """--warmup when given; else 30 steps, but at most a tenth of the run: a warmup longer than
    the run would never reach --lr, nor decay."""
    return cfg.warmup if cfg.warmup is not None else min(DEFAULT_WARMUP, cfg.max_steps // 10)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Warmup: linear from lr/warmup up to lr (Adam's early estimates are noisy; big steps then hurt).
    cosine: from lr down to lr*min_lr_ratio along half a cosine over the remaining steps.
    wsd:    stay at lr, then decay linearly to lr*min_lr_ratio over the last decay_fraction of steps
            (a run can be extended from any checkpoint of the stable phase).
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    warmup = warmup_steps(cfg)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "cosine":
        span = max(cfg.max_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    decay_steps = int(round(cfg.decay_fraction * cfg.max_steps))
    decay_start = cfg.max_steps - decay_steps
    if step < decay_start or decay_steps == 0:
        return cfg.lr
    progress = min((step - decay_start + 1) / decay_steps, 1.0)
    return cfg.lr + (min_lr - cfg.lr) * progress


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices (linear layers, embeddings), none on
    vectors (biases, norm gains, sink logits) -- shrinking a gain towards 0 only fights the norm."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a tied matrix once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    # The fused kernel updates every parameter in one pass (CUDA, and CPU since PyTorch 2.4).
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


# =================================================================================================
# FLOPs, for tokens/s -> model FLOPs utilisation
# =================================================================================================


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight that takes part in a matmul (2 forward, 4 backward),
    plus attention's two (T x T) matmuls, 12 * layers * heads * head_dim * T / 2 for causal
    (the PaLM paper's count, halved because a causal query sees half the keys on average).
    Position embeddings are a lookup, not a matmul; the token embedding counts because the
    LM head multiplies by it. A mixture of experts counts only the experts a token uses."""
    c = config
    attn = c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head) + (c.n_embd * c.n_head if c.attn_gate == "headwise" else 0)
    if c.attn_gate == "elementwise":
        attn += c.n_embd * c.n_head * c.head_dim
    if c.mlp == "gelu":
        mlp = 2 * c.n_embd * c.intermediate_size
    elif c.mlp == "swiglu":
        mlp = 3 * c.n_embd * c.intermediate_size
    else:
        mlp = c.n_experts_per_tok * 3 * c.n_embd * c.intermediate_size + c.n_embd * c.n_experts
    head = c.n_embd * c.vocab_size
    matmul_params = c.n_layer * (attn + mlp) + head
    attention = 12 * c.n_layer * c.n_head * c.head_dim * seq_len / 2
    return 6 * matmul_params + attention


_PEAK: dict[tuple[str, str], float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """The matmul ceiling of this machine for `dtype`, measured: FLOP/s of an n x n x n matmul.

    Each matmul is timed on its own and the fastest counts: on a machine shared with other
    programs, the quietest moment is the closest to what the hardware can do (an average would
    put the ceiling too low and the MFU above 100%)."""
    key = (str(device), str(dtype))
    if key in _PEAK:
        return _PEAK[key]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm up: the library picks its kernel on the first call
    _sync(device)
    fastest, wall = float("inf"), time.perf_counter()
    tries = 0
    while time.perf_counter() - wall < seconds or tries < 3:
        start = time.perf_counter()
        a @ b
        _sync(device)
        fastest = min(fastest, time.perf_counter() - start)
        tries += 1
    _PEAK[key] = 2 * n**3 / max(fastest, 1e-9)
    return _PEAK[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# =================================================================================================
# Checkpoints
# =================================================================================================

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _model_tensors(model_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: contiguous CPU copies, a tied head stored once."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_checkpoint(run_dir: Path, step: int, model_state: dict, optimizer_state: dict, extra: dict[str, Any], config: ModelConfig, keep: int) -> Path:
    """Write checkpoints/step_NNNNNN atomically: into a .tmp folder, then one rename.

    A kill at any moment leaves either the whole new checkpoint or none of it (a stray .tmp folder,
    ignored and removed later). state.json records each file's size and sha256, so a file that
    was damaged afterwards is caught before it is used."""
    from safetensors.torch import save_file

    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_model_tensors(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    os.chmod(tmp / MODEL_FILE, 0o666 & ~_umask())  # safetensors writes 0600; every other file follows the umask
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in (MODEL_FILE, OPTIMIZER_FILE)}
    state = {"step": step, "model_config": config.to_dict(), "files": files, **extra}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    # Saving a step again (a resumed run that stopped right after a save): never delete the only
    # good copy first. The old folder steps aside as step_N.old (still found by find_checkpoint),
    # the new one takes its name, and only then is the old one removed.
    old = root / f"step_{step:06d}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _prune_checkpoints(root, keep)
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _prune_checkpoints(root: Path, keep: int) -> None:
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob("*.old"):  # set aside by a re-save: finished (drop it) or killed (restore it)
        if (root / aside.stem).is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, root / aside.stem)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(folder: Path, need: tuple[str, ...] | None = None) -> str | None:
    """None when the checkpoint is whole; else what is wrong with it, in words.
    `need`: check only these files (what the caller reads); None: every file."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable"
    for name, expected in files.items():
        if need is not None and name not in need:
            continue
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size:,} bytes, expected {expected['bytes']:,} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its recorded sha256 (damaged)"
    return None


def find_checkpoint(run_dir: Path, say=print, need: tuple[str, ...] | None = None,
                    fix: str = "run again with --fresh to start over") -> Path | None:
    """The newest intact checkpoint; damaged ones are reported (never used) and skipped.
    Raises when checkpoints exist but none is intact: starting over silently would lose a run.
    `need`: the files the caller reads (generation needs only the weights, not optimizer.pt)."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    problems = []
    for folder in candidates:
        problem = check_checkpoint(folder, need)
        if problem is None:
            if problems:
                say(f"using the previous intact checkpoint {folder.name}")
            return folder
        say(f"warning: checkpoint {folder} is damaged: {problem}; skipping it")
        problems.append(folder.name)
    if problems:
        raise TegakiError(
            f"no intact checkpoint in {root} ({', '.join(problems)} damaged); {fix}"
        )
    return None


# =================================================================================================
# The run folder: what other modules load
# =================================================================================================


def read_run_json(path: str | os.PathLike) -> dict[str, Any]:
    run_file = Path(path) / "run.json"
    if not run_file.exists():
        raise TegakiError(f"{path} is not a tegaki run folder (no run.json); train one with `tegaki train --out {path}`")
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TegakiError(f"{run_file} is damaged ({e}); restore it from a copy, or retrain with "
                          f"`tegaki train --out {path} --fresh`") from None
    if not isinstance(info, dict) or not isinstance(info.get("model_config"), dict):
        raise TegakiError(f"{run_file} is damaged (no model_config); restore it from a copy, or retrain with "
                          f"`tegaki train --out {path} --fresh`")
    return info


def load_run_tokenizer(path: str | os.PathLike):
    """The tokenizer a run was trained with ("gpt2", or the run's own tokenizer/ folder)."""
    from tegaki.tokenizer import load

    info = read_run_json(path)
    ref = info.get("tokenizer", "gpt2")
    if ref == "gpt2":
        return load("gpt2")
    return load(Path(path) / ref)


def load_run_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The model of a run folder from its newest intact checkpoint, in eval mode."""
    from safetensors.torch import load_file

    from tegaki.model import GPT

    info = read_run_json(path)
    checkpoint = find_checkpoint(Path(path), say=lambda m: print(m, file=sys.stderr), need=(MODEL_FILE,),
                                 fix=f"retrain with `tegaki train --out {path} --fresh`")
    if checkpoint is None:
        raise TegakiError(f"{path} has no checkpoint yet; train longer or lower --save-every")
    config = ModelConfig.from_dict(info["model_config"])
    model = GPT(config)
    tensors = load_file(str(checkpoint / MODEL_FILE))
    _load_tensors(model, tensors)
    model.to(device=device, dtype=dtype)
    return model.eval()


def _load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise TegakiError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# =================================================================================================
# Distributed
# =================================================================================================


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed(device_kind: str) -> Dist:
    """Join the process group that torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment); a plain `tegaki train` is a world of one. NCCL for GPUs, gloo for CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), local_rank=int(os.environ.get("LOCAL_RANK", "0")), world_size=dist.get_world_size())


def _broadcast_object(obj: Any, dist_info: Dist) -> Any:
    if not dist_info.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# =================================================================================================
# Setting up a run
# =================================================================================================


def pick_device(name: str, dist_info: Dist | None = None) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TegakiError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu")
        if name == "cuda" and dist_info is not None and dist_info.enabled:
            name = f"cuda:{dist_info.local_rank}"
    elif name != "cpu":
        raise TegakiError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device) -> str:
    """'auto' is bf16 on a GPU that has it, fp32 elsewhere (bf16 on a CPU pays off for large
    matmuls on AMX; ask for it with --dtype bf16)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def _is_named_tokenizer(ref: str) -> bool:
    return ref == "gpt2"


def setup_tokenizer(cfg: TrainConfig, run_dir: Path, model_vocab: int, say) -> tuple[Any, str]:
    """The run's tokenizer and how run.json refers to it ("gpt2" or "tokenizer").

    Order: the run folder's own (a resumed run) > --tokenizer > a byte-level BPE trained now on the
    corpus with the preset's vocab_size (a preset with GPT-2's vocabulary or more uses "gpt2")."""
    from tegaki import tokenizer as tok_module

    own = run_dir / "tokenizer"
    if cfg.tokenizer is None and own.is_dir():
        return tok_module.load(own), "tokenizer"
    if cfg.tokenizer is not None:
        if _is_named_tokenizer(cfg.tokenizer):
            return tok_module.load(cfg.tokenizer), cfg.tokenizer
        tok = tok_module.load(cfg.tokenizer)
        if Path(cfg.tokenizer).resolve() != own.resolve():
            shutil.rmtree(own, ignore_errors=True)
            tok.save(own)
        return tok, "tokenizer"
    from tegaki.data import is_prepared, load_meta

    if is_prepared(cfg.data):  # shards made with a tokenizer already: use that one
        ref = load_meta(cfg.data)["tokenizer"]
        if not _is_named_tokenizer(ref):  # a relative path is relative to the shard folder
            ref = str(Path(cfg.data) / ref)
        return setup_tokenizer(dataclasses.replace(cfg, tokenizer=ref), run_dir, model_vocab, say)
    if model_vocab >= 50257 or not hasattr(tok_module, "train_bpe"):
        return tok_module.load("gpt2"), "gpt2"
    return _train_run_tokenizer(cfg, own, model_vocab, say), "tokenizer"


TOKENIZER_SAMPLE_CHARS = 8_000_000  # BPE statistics settle long before; train on at most this much


def _train_run_tokenizer(cfg: TrainConfig, folder: Path, vocab_size: int, say):
    from tegaki.data import iter_documents
    from tegaki.tokenizer import train_bpe

    texts, size = [], 0
    for _, text in iter_documents(cfg.data, cfg.text_column):
        texts.append(text[: TOKENIZER_SAMPLE_CHARS - size])
        size += len(texts[-1])
        if size >= TOKENIZER_SAMPLE_CHARS:
            break
    if size == 0:
        raise TegakiError(f"the corpus {cfg.data!r} holds no text")
    amount = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    say(f"training a byte-level BPE tokenizer (vocab {vocab_size:,}) on {amount} of {cfg.data} ...")
    start = time.perf_counter()
    tok = train_bpe(texts, vocab_size, name=f"bpe-{vocab_size}")
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    say(f"tokenizer saved to {folder} ({time.perf_counter() - start:.1f}s)")
    from tegaki.tokenizer import load

    return load(folder)


def setup_data(cfg: TrainConfig, run_dir: Path, tokenizer, tokenizer_ref: str, progress: bool, say) -> Path:
    """Token shards: --data itself when already prepared, else prepared now into DIR/data."""
    from tegaki.data import is_prepared, load_meta, prepare

    if is_prepared(cfg.data):
        meta = load_meta(cfg.data)
        if meta["vocab_size"] != tokenizer.vocab_size:
            raise TegakiError(
                f"{cfg.data} was prepared with a {meta['vocab_size']:,}-token vocabulary ({meta['tokenizer']}), "
                f"but the run's tokenizer has {tokenizer.vocab_size:,}; prepare again with this tokenizer"
            )
        return Path(cfg.data)
    folder = run_dir / "data"
    if not (folder / "meta.json").exists():
        say(f"preparing token shards from {cfg.data} into {folder} ...")
    # Stored relative to the shard folder ("../tokenizer"), so a copied or moved run folder still resumes.
    ref = tokenizer_ref if _is_named_tokenizer(tokenizer_ref) else os.path.relpath(run_dir / tokenizer_ref, folder)
    if not _is_named_tokenizer(tokenizer_ref):
        _relative_tokenizer_ref(folder, run_dir / tokenizer_ref, ref)
    result = prepare(cfg.data, tokenizer, folder, tokenizer_ref=ref, val_fraction=cfg.val_fraction,
                     text_column=cfg.text_column, progress=progress)
    if result.seconds:
        say(f"  {result.meta['train_tokens']:,} train + {result.meta['val_tokens']:,} validation tokens "
            f"({result.mb_per_s:.1f} MB/s)")
    return folder


def _relative_tokenizer_ref(folder: Path, tokenizer_dir: Path, ref: str) -> None:
    """Older runs wrote the run's own tokenizer into DIR/data/prepare.json (and meta.json) as an
    absolute path, "/old/place/tokenizer". Those shards were made with DIR/tokenizer, wherever DIR
    is now: rewrite the reference in the relative form, so the settings compare equal."""
    for name in ("prepare.json", "meta.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            settings = json.loads(path.read_text())
        except ValueError:
            continue  # prepare() reports a damaged file
        old = settings.get("tokenizer") if isinstance(settings, dict) else None
        if isinstance(old, str) and os.path.isabs(old) and Path(old).name == tokenizer_dir.name and old != ref:
            settings["tokenizer"] = ref
            path.write_text(json.dumps(settings, indent=2) + "\n")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Round the vocabulary up to a multiple of 64: the LM head matmul runs faster on such shapes
    (GPT-2's 50,257 -> 50,304); the extra rows are never a target and learn to be unlikely."""
    return (n + multiple - 1) // multiple * multiple


def build_model_config(cfg: TrainConfig, tokenizer) -> ModelConfig:
    base = ModelConfig.preset(cfg.preset)
    config = base.with_overrides(cfg.set) if cfg.set else base
    set_fields = {item.partition("=")[0].strip().replace("-", "_") for item in cfg.set}
    if "vocab_size" not in set_fields:
        config = config.replace(vocab_size=padded_vocab(tokenizer.vocab_size))
    if config.vocab_size < tokenizer.vocab_size:
        raise TegakiError(f"vocab_size={config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size:,} tokens")
    return config


# =================================================================================================
# Training
# =================================================================================================


class Run:
    """Everything one `tegaki train` holds: model, optimizer, data, logs. `run.train()` does it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        device_kind = "cuda" if (cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
        self.dist = init_distributed(device_kind)
        self.device = pick_device(cfg.device, self.dist)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        self.say = self._say if self.dist.is_main else (lambda *a, **k: None)
        self.started = False  # set once setup is done and the steps begin

    def _say(self, message: str) -> None:
        from tqdm.auto import tqdm

        tqdm.write(message, file=sys.stderr)

    # --- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, d = self.cfg, self.dist
        if cfg.fresh and d.is_main:
            self._clear_run_dir()
        d.barrier()
        if d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            preset = ModelConfig.preset(cfg.preset)
            preset_vocab = (preset.with_overrides(cfg.set) if cfg.set else preset).vocab_size
            tokenizer, self.tokenizer_ref = setup_tokenizer(cfg, self.run_dir, preset_vocab, self.say)
            self.data_dir = setup_data(cfg, self.run_dir, tokenizer, self.tokenizer_ref, cfg.progress, self.say)
        # Other ranks wait for rank 0 to train the tokenizer and write the shards, then read them.
        self.tokenizer_ref, self.data_dir = _broadcast_object(
            (self.tokenizer_ref, str(self.data_dir)) if d.is_main else None, d)
        self.data_dir = Path(self.data_dir)
        if not d.is_main:
            from tegaki import tokenizer as tok_module

            ref = self.tokenizer_ref
            tokenizer = tok_module.load(ref if _is_named_tokenizer(ref) else self.run_dir / ref)
        self.tokenizer = tokenizer
        self.model_config = build_model_config(cfg, tokenizer)
        self.block_size = cfg.block_size or self.model_config.block_size
        if self.block_size > self.model_config.block_size:
            raise TegakiError(
                f"--block-size {self.block_size} is larger than the model's context "
                f"(block_size={self.model_config.block_size}); lower --block-size or raise it with --set block_size=N"
            )
        self._check_run_json()
        self._build_data()
        self._build_model()

    def _clear_run_dir(self) -> None:
        for name in ("checkpoints", "metrics.jsonl", "run.json", "loss.png", "tb", "tokenizer", "data"):
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def _check_run_json(self) -> None:
        path = self.run_dir / "run.json"
        info = {
            "model_config": self.model_config.to_dict(),
            "tokenizer": self.tokenizer_ref,
            # inside the run folder: relative to it, so the folder can be moved
            "data": os.path.relpath(self.data_dir, self.run_dir) if self._inside_run(self.data_dir) else str(self.data_dir),
            "train": self.cfg.to_dict(),
        }
        if path.exists():
            old = read_run_json(self.run_dir)
            if old.get("model_config") != info["model_config"]:
                changed = sorted(k for k, v in info["model_config"].items() if old.get("model_config", {}).get(k) != v)
                raise TegakiError(
                    f"{self.run_dir} holds a run of another model ({', '.join(changed)} differ); "
                    "use another --out, or --fresh to start over there"
                )
            old_train = old.get("train", {})
            changed = [k for k in _RESUME_KEYS if k in old_train and old_train[k] != info["train"][k]]
            if changed and (self.run_dir / "checkpoints").exists():
                raise TegakiError(
                    f"{self.run_dir} was trained with other {', '.join(changed)}; resuming would not continue "
                    "the same run. Use the same settings, another --out, or --fresh"
                )
        if self.dist.is_main:
            path.write_text(json.dumps(info, indent=2) + "\n")

    def _inside_run(self, path: Path) -> bool:
        return Path(path).resolve().is_relative_to(self.run_dir.resolve())

    def _build_data(self) -> None:
        from tegaki.data import BatchLoader, TokenWindows

        cfg, d = self.cfg, self.dist
        train_windows = TokenWindows(self.data_dir, "train", self.block_size)
        self.val_windows = TokenWindows(self.data_dir, "val", self.block_size)
        if len(self.val_windows) == 0:
            raise TegakiError(
                f"the validation split has {self.val_windows.tokens:,} tokens, fewer than one block of "
                f"{self.block_size + 1}; lower --block-size or raise --val-fraction"
            )
        self.loader = BatchLoader(train_windows, cfg.batch_size, cfg.seed, d.rank, d.world_size)
        # bits per byte: each target's share of the text, in UTF-8 bytes (special tokens: 0)
        lengths = np.zeros(self.model_config.vocab_size, dtype=np.int64)
        specials = set(self.tokenizer.special_tokens.values())
        for i in range(self.tokenizer.vocab_size):
            if i not in specials:
                try:
                    lengths[i] = len(self.tokenizer.token_bytes(i))
                except Exception:
                    lengths[i] = 0
        self.token_bytes = torch.from_numpy(lengths).to(self.device)

    def _build_model(self) -> None:
        from tegaki.model import GPT

        cfg, d = self.cfg, self.dist
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = GPT(self.model_config).to(self.device)
        self.raw_model = model
        if cfg.fsdp:
            if not d.enabled:
                self.say("note: --fsdp with one process shards nothing; it still runs, through FSDP2")
                self._init_single_process_group()
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)  # each block's weights live in shards, gathered just for its turn
            fully_shard(model)
        elif d.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.model = model
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.forward = torch.compile(model) if cfg.compile else model

    def _init_single_process_group(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", rank=0, world_size=1)

    # --- state ----------------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer states; a collective call under DDP/FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        return model_state, optim_state

    def save(self, step: int, val_loss: float | None) -> None:
        model_state, optim_state = self._state_dicts()
        if self.dist.is_main:
            # Tensors, ints, floats, strings and lists only: optimizer.pt then loads with
            # torch.load(weights_only=True), which runs no code from a downloaded run folder.
            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            version, py_state, py_gauss = random.getstate()
            rng = {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
                "python": [version, list(py_state), py_gauss],
            }
            extra = {"loader": self.loader.state_dict(), "val_loss": val_loss, "train_config": self.cfg.to_dict(),
                     "tokenizer": self.tokenizer_ref, "time": time.time()}
            path = save_checkpoint(self.run_dir, step, model_state, {"optimizer": optim_state, "rng": rng},
                                   extra, self.model_config, self.cfg.keep)
            self.say(f"saved checkpoint {path}")
        self.last_saved = step
        self.dist.barrier()

    def resume(self) -> int:
        """Load the newest intact checkpoint, if any; the step to continue from (0: a new run)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        found = find_checkpoint(self.run_dir, say=self.say) if self.dist.is_main else None
        found = _broadcast_object(str(found) if found else None, self.dist)
        if found is None:
            return 0
        folder = Path(found)
        state = json.loads((folder / STATE_FILE).read_text())
        tensors = load_file(str(folder / MODEL_FILE))
        if self.model_config.tie_embeddings:
            tensors["lm_head.weight"] = tensors["wte.weight"]
        try:
            saved = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise TegakiError(
                f"{folder / OPTIMIZER_FILE} holds Python objects that tegaki does not load (a file from an older "
                "tegaki, or not from tegaki at all); start over with --fresh"
            ) from None
        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        set_model_state_dict(self.model, tensors, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"], options=options)
        rng = saved["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        kind, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, py_state, py_gauss = rng["python"]
        random.setstate((version, tuple(py_state), py_gauss))
        if self.dist.rank != 0:  # rank 0's RNG was saved; the others take their own stream
            torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank + state["step"])
        self.loader.load_state_dict(state["loader"])
        self.say(f"resuming from {folder} (step {state['step']}); pass --fresh to start over")
        return int(state["step"])

    # --- the loop -------------------------------------------------------------------------------
    def autocast(self):
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_context(self, last_micro: bool):
        """Under DDP, gradients are averaged across ranks in backward; skip that on every micro
        step but the last (the sum is the same, and one all-reduce is cheaper than grad_accum)."""
        if not self.dist.enabled or last_micro:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step. Returns (mean loss across ranks, grad norm, lr)."""
        cfg = self.cfg
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            last = micro == cfg.grad_accum - 1
            if last and hasattr(self.model, "set_requires_gradient_sync"):
                self.model.set_requires_gradient_sync(True)
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(self.device), targets.to(self.device)  # (B, T) each
            with self._sync_context(last), self.autocast():
                _, loss = self.forward(inputs, targets)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / cfg.grad_accum
        if self.dist.enabled:
            torch.distributed.all_reduce(loss_mean, op=torch.distributed.ReduceOp.SUM)
            loss_mean = loss_mean / self.dist.world_size
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        loss_value, norm_value = float(loss_mean), float(grad_norm)
        lr = lr_at(step, cfg)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            return loss_value, norm_value, lr  # the caller stops before the weights are touched
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, lr

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(validation loss in nats per token, bits per byte) over the same batches every time."""
        from tegaki.data import validation_batches

        self.model.eval()
        sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, tokens, bytes
        for inputs, targets in validation_batches(self.val_windows, self.cfg.batch_size, self.cfg.eval_batches,
                                                  self.dist.rank, self.dist.world_size):
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast():
                logits = self.forward(inputs)  # (B, T, V)
            losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")  # (B*T,)
            sums += torch.stack([losses.sum().double(), torch.tensor(losses.numel(), device=self.device, dtype=torch.float64),
                                 self.token_bytes[targets.flatten()].sum().double()])
        if self.dist.enabled:
            torch.distributed.all_reduce(sums)
        loss = float(sums[0] / sums[1])
        bpb = float(sums[0] / (math.log(2) * sums[2])) if sums[2] > 0 else float("nan")
        return loss, bpb

    @torch.no_grad()
    def sample(self, step: int) -> str:
        """A short continuation of the end-of-text token (a fresh start). The training RNG stream
        is left untouched."""
        self.raw_model.eval()
        eot = self.tokenizer.eot_id
        start = torch.tensor([[eot if eot is not None else 0]], device=self.device)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.cfg.seed + step)
            with self.autocast():
                out = self.raw_model.generate(start, self.cfg.sample_tokens, temperature=0.8, top_k=50)
        ids = [i for i in out[0, 1:].tolist() if i < self.tokenizer.vocab_size]
        return self.tokenizer.decode(ids)

    def train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        start_step = self.resume()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", start_step, enabled=self.dist.is_main)
        tokens_per_step = cfg.batch_size * self.block_size * cfg.grad_accum * self.dist.world_size
        n_params = self.raw_model.num_parameters()
        flops_step = flops_per_token(self.model_config, self.block_size) * tokens_per_step
        peak = measure_matmul_flops(self.device, torch.bfloat16 if self.dtype == "bf16" else torch.float32) * self.dist.world_size
        if start_step == 0:
            self.say(f"model: {self.cfg.preset}, {n_params / 1e6:.2f}M parameters; {tokens_per_step:,} tokens per step "
                     f"({cfg.batch_size} x {self.block_size}" + (f" x {cfg.grad_accum} accum" if cfg.grad_accum > 1 else "")
                     + (f" x {self.dist.world_size} ranks" if self.dist.enabled else "") + f"); {self.device} {self.dtype}")
        if cfg.warmup is None and warmup_steps(cfg) < DEFAULT_WARMUP and start_step < cfg.max_steps:
            self.say(f"note: warmup shortened to {warmup_steps(cfg)} steps (a tenth of --max-steps {cfg.max_steps}); "
                     "set --warmup to choose")
        bar = _progress(cfg.max_steps, start_step, enabled=self.dist.is_main and cfg.progress)
        last_val, result = None, {"step": start_step}
        if start_step >= cfg.max_steps:
            self.say(f"{self.run_dir} has already trained {start_step} steps (--max-steps {cfg.max_steps})")
        tb = _tensorboard(self.run_dir) if self.dist.is_main else None
        self.started = True  # from here on, the run folder holds work worth keeping
        self.last_saved = start_step or None
        step = start_step
        try:
            for step in range(start_step, cfg.max_steps):
                t0 = time.perf_counter()
                with _explain_out_of_memory(cfg, self.device):
                    loss, grad_norm, lr = self.train_step(step)
                _sync(self.device)
                dt = time.perf_counter() - t0
                done = step + 1
                if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                    bar.close()
                    self._stop_on_nan(done, loss, grad_norm)
                tok_s = tokens_per_step / dt
                mfu = flops_step / dt / peak
                self.metrics.write({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                    "tokens_per_s": round(tok_s, 1), "mfu": round(mfu, 4), "dt": round(dt, 4)})
                if tb is not None:
                    tb.add_scalar("train/loss", loss, done)
                    tb.add_scalar("train/lr", lr, done)
                bar.set_postfix_str(f"loss {loss:.3f}  {tok_s:,.0f} tok/s  mfu {mfu:.1%}")
                bar.update(1)
                if done % cfg.eval_every == 0 or done == cfg.max_steps:
                    val_loss, bpb = self.evaluate()
                    last_val = val_loss
                    self.metrics.write({"step": done, "kind": "val", "val_loss": val_loss, "val_bpb": bpb})
                    if tb is not None:
                        tb.add_scalar("val/loss", val_loss, done)
                        tb.add_scalar("val/bpb", bpb, done)
                    self.say(f"step {done}: train loss {loss:.4f}, val loss {val_loss:.4f}, {bpb:.3f} bits/byte")
                # Under FSDP every rank must take part in each forward (the weights are gathered from all).
                if cfg.sample_every and done % cfg.sample_every == 0 and (self.dist.is_main or cfg.fsdp):
                    text = self.sample(done)
                    if self.dist.is_main:
                        self.metrics.write({"step": done, "kind": "sample", "text": text})
                        self.say(f"--- sample at step {done} ---\n{text}\n---")
                if done % cfg.save_every == 0 or done == cfg.max_steps:
                    self.save(done, last_val)
                result = {"step": done, "loss": loss, "val_loss": last_val}
        except KeyboardInterrupt:
            bar.close()
            if self.dist.is_main:
                kept = (f"the last checkpoint is step {self.last_saved}" if self.last_saved
                        else f"no checkpoint was saved yet (every --save-every {cfg.save_every} steps)")
                self.say(f"stopped during step {step + 1}; {kept}. Run the same command again to "
                         + ("resume from it" if self.last_saved else "start over"))
            raise
        bar.close()
        self.metrics.close()
        if tb is not None:
            tb.close()
        if self.dist.is_main:
            plot = plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
            if plot is not None:
                self.say(f"loss curve: {plot}")
        return result

    def _stop_on_nan(self, step: int, loss: float, grad_norm: float) -> None:
        try:
            good = find_checkpoint(self.run_dir, say=lambda m: None)
        except TegakiError:
            good = None
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        raise TegakiError(
            f"training stopped at step {step}: the loss is {loss} and the gradient norm {grad_norm} (not finite). "
            f"The weights were not updated with it; {where}. Lower --lr, raise --warmup, or use --dtype fp32"
        )


@contextlib.contextmanager
def _explain_out_of_memory(cfg: TrainConfig, device: torch.device):
    """A batch that does not fit in memory is a setting to change, not a crash to debug."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise TegakiError(
            f"a batch of {cfg.batch_size} x {cfg.block_size or 'block_size'} tokens does not fit in {device} memory; "
            f"lower --batch-size (and raise --grad-accum to keep the tokens per step) or --block-size"
        ) from None


class MetricsLog:
    """metrics.jsonl: one JSON object per line. A resumed run first drops the lines written after
    its checkpoint (they belonged to the interrupted attempt), so every step appears once."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step and start_step > 0:
                        kept.append(line)
                except ValueError:
                    continue  # a half-written last line from a kill
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_losses(metrics_path: Path, out: Path) -> Path | None:
    """Training and validation loss against steps, as a PNG (the same picture as `tegaki plot`)."""
    from tegaki.analysis.plot import plot_losses as draw, read_metrics as read_curves

    curves = read_curves(metrics_path)
    if not curves["train"]:
        return None
    smooth = max(1, len(curves["train"]) // 50)
    try:
        return draw([(metrics_path.parent.name, curves)], out, title=metrics_path.parent.name, smooth=smooth)
    except ImportError:  # matplotlib missing: the run is fine without its picture
        return None


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", desc="train", disable=not enabled, dynamic_ncols=True)


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: metrics.jsonl and loss.png are enough
        return None
    return SummaryWriter(str(run_dir / "tb"))


@contextlib.contextmanager
def flushed_subnormals(device: str):
    """Flush subnormal floats (|x| < 1.2e-38) to zero while training on a CPU.

    x86 CPUs take a microcode slow path for them; a GPT-OSS-style run on Japanese text slowed from
    ~2 s to 15-30 s per step once tiny gradients and Adam moments went subnormal. Zeroing them
    changes nothing a float32 loss can see. PyTorch's default (off) is restored afterwards.
    """
    on_cpu = device in ("auto", "cpu") and not torch.cuda.is_available()
    if on_cpu:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if on_cpu:
            torch.set_flush_denormal(False)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) the run described by `cfg`; returns the last step's numbers."""
    out = Path(cfg.out)
    created = not out.exists()
    run = Run(cfg)
    try:
        with flushed_subnormals(cfg.device):
            return run.train()
    except TegakiError:
        # Refused before any step (bad preset, data, --set, ...): leave no half-made --out behind.
        if created and not run.started and run.dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if run.dist.enabled or cfg.fsdp:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# =================================================================================================
# The `tegaki train` command
# =================================================================================================


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (resumes when run again)",
        description="Train a tegaki model. Running the same command again resumes from the newest intact "
        "checkpoint. Distributed: torchrun --nproc_per_node N -m tegaki train ...",
    )
    # Defaults live in TrainConfig; None here means "not given", so a --config file can fill it.
    a = p.add_argument
    a("--config", help="TOML file with the same keys as these flags ([model] table: ModelConfig fields)")
    a("--data", help="shakespeare | .txt/.md/.jsonl/.parquet file or folder | prepared shard folder | hub id")
    a("--preset", help="model preset (tiny, tiny-llama, gpt2, ...); default tiny")
    a("--out", help="run folder (default runs/demo)")
    a("--max-steps", type=int, help="optimizer steps in total (default 500)")
    a("--batch-size", type=int, help="sequences per micro-batch per process (default 8)")
    a("--block-size", type=int, help="tokens per sequence (default: the model's block_size)")
    a("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    a("--lr", type=float, help="peak learning rate (default 2e-3)")
    a("--min-lr-ratio", type=float, help="final lr as a fraction of --lr (default 0.1)")
    a("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    a("--grad-clip", type=float, help="clip the gradient norm to this (default 1.0)")
    a("--warmup", type=int, help="linear warmup steps (default 30, at most a tenth of --max-steps)")
    a("--schedule", choices=["cosine", "wsd"], help="after warmup: cosine decay, or warmup-stable-decay")
    a("--dtype", choices=["auto", "fp32", "bf16"], help="bf16 autocast or fp32 (auto: bf16 on GPUs)")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--compile", action="store_true", default=None, help="torch.compile the model")
    a("--tokenizer", help="'gpt2' or a tokenizer folder (default: a BPE trained on the corpus, saved in the run)")
    a("--text-column", help="column holding the text in jsonl/parquet/hub data")
    a("--val-fraction", type=float, help="share of the tokens kept for validation (default 0.05)")
    a("--eval-every", type=int, help="validation loss every N steps (default 100)")
    a("--eval-batches", type=int, help="validation batches per evaluation (default 10)")
    a("--sample-every", type=int, help="print a sample every N steps; 0: never (default 100)")
    a("--sample-tokens", type=int, help="tokens per sample (default 200)")
    a("--save-every", type=int, help="checkpoint every N steps (default 100)")
    a("--keep", type=int, help="keep the last K checkpoints (default 3)")
    a("--seed", type=int, help="random seed (default 1337)")
    a("--fsdp", action="store_true", default=None, help="shard parameters with FSDP2 (under torchrun)")
    a("--fresh", action="store_true", default=None, help="start over in --out instead of resuming")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--set", action="append", metavar="FIELD=VALUE", help="override a ModelConfig field (repeatable)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    cfg = resolve_config(vars(args))
    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0 and result.get("loss") is not None:
        val = f", val loss {result['val_loss']:.4f}" if result.get("val_loss") is not None else ""
        print(f"done: step {result['step']}, loss {result['loss']:.4f}{val}; run folder {cfg.out}")
    return 0
