"""`tegaki compare`: train several architectures under identical conditions, over several seeds, and put
them side by side.

    tegaki compare --data shakespeare --presets tiny,tiny-llama,tiny-gpt-oss --max-steps 300 --out runs/cmp

"Identical" means: one tokenizer (trained once, or --tokenizer), one set of token shards, the same
number of steps, tokens and learning-rate schedule, and, for each seed, the same batches in the same
order and the same initial seed (`tegaki.data.BatchLoader` draws the order from the seed alone).
Every entry is trained once per seed (--seeds N: seed, seed+1, ...): a loss after a few hundred
steps moves by a few hundredths of a nat with the seed alone, so the report gives each number as
mean ± standard deviation over the seeds, and states a difference only where the 95% intervals
separate (`tegaki.analysis.stats`). Runs go seed by seed, each seed through every entry in turn, so
a neighbour's load on a shared machine falls on every entry alike.

Each run is an ordinary `tegaki train` run (`tegaki.train.Run`) in DIR/runs/NAME/seedS, so running
the command again resumes whatever was interrupted, and every run folder works with
`tegaki generate`, `tegaki trace` and `tegaki plot`.

An entry of --presets is a preset, optionally with its own overrides after colons:
`tiny,tiny:causal=false` trains GPT-2-style twice, the second time without the causal mask.

What comes out:
    DIR/results.json   per run: parameters (total, active), final train/validation loss, bits per
                       byte, training tokens/s, peak memory, decode tokens/s with and without the KV
                       cache, a sample, and a hash of every batch it was trained on; per entry: each
                       loss as mean, standard deviation, 95% interval and values over the seeds
    DIR/report.md      the same as a table, the differences the seeds support, and the samples
    DIR/loss.png       the train and validation curves: per entry the mean over seeds and its range
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tegaki.analysis.compare_report import format_report
from tegaki.analysis.params import count_parameters
from tegaki.analysis.plot import loss_curves, plot_losses, plot_run_losses
from tegaki.analysis.stats import spread
from tegaki.checkpoint import METRICS_FILE, read_metrics
from tegaki.config import ModelConfig
from tegaki.data import TokenWindows
from tegaki.errors import TegakiError
from tegaki.train import Run, TrainConfig, build_model_config, flushed_subnormals, setup_data, setup_tokenizer
from tegaki.train.settings import check_settings as check_train_settings

# -------------------------------------------------------------------------------------------------
# What to train
# -------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    label: str  # as given, e.g. "tiny:causal=false"
    preset: str
    overrides: list[str] = field(default_factory=list)

    @property
    def folder_name(self) -> str:
        return re.sub(r"[^\w.=-]+", "+", self.label)


def parse_entries(text: str) -> list[Entry]:
    """ "tiny,tiny-llama:n_kv_head=1" -> entries; every preset is checked before any training."""
    entries = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        preset, *overrides = item.split(":")
        ModelConfig.preset(preset)  # an unknown preset fails here, before any training, with the list of known ones
        entries.append(Entry(item, preset, overrides))
    if len(entries) < 1:
        raise TegakiError("--presets needs at least one preset, e.g. --presets tiny,tiny-llama")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise TegakiError(f"--presets lists the same entry twice: {', '.join(labels)}")
    return entries


# -------------------------------------------------------------------------------------------------
# Which batches a run saw
# -------------------------------------------------------------------------------------------------


def batch_hash(inputs: torch.Tensor, targets: torch.Tensor) -> str:
    """A short hash of one batch (its input and target token ids, as the loader hands them out)."""
    return hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()[:16]


class BatchHashes:
    """The `on_batch` hook of a compared run (`tegaki.train.Run`): a hash of every batch it trains
    on, keyed by optimizer step. A step taken again after a resume replaces its record."""

    def __init__(self):
        self.hashes: dict[int, list[str]] = {}

    def __call__(self, step: int, micro: int, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        if micro == 0:
            self.hashes[step] = []
        self.hashes[step].append(batch_hash(inputs, targets))


def batch_digest(hashes: dict[int, list[str]]) -> str:
    """One hash of every batch of every step, in step order."""
    h = hashlib.sha256()
    for step in sorted(hashes):
        h.update(f"{step}:{','.join(hashes[step])};".encode())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------
# Measuring
# -------------------------------------------------------------------------------------------------


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):  # Linux: writing 5 to clear_refs resets this process's peak RSS (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "peak CUDA memory allocated"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak resident memory of the process during the run"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory of the process so far"


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    """Greedy decoding speed in tokens per second (one warm-up call first)."""
    model.generate(prompt, 2, temperature=0.0, use_cache=use_cache)
    start = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0.0, use_cache=use_cache)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


# -------------------------------------------------------------------------------------------------
# The comparison
# -------------------------------------------------------------------------------------------------


@dataclass
class CompareSettings:
    """Every `tegaki compare` flag (`tegaki/cli/compare.py` takes its defaults from here)."""

    entries: list[Entry]
    out: Path
    data: str = "shakespeare"
    max_steps: int = 200
    seed: int = 1337
    seeds: int = 3  # runs per entry, with seeds seed, seed+1, ...: the spread the report states
    batch_size: int = 16
    block_size: int | None = None
    lr: float = 2e-3
    warmup: int | None = None
    eval_every: int | None = None
    eval_batches: int = 10
    tokenizer: str | None = None
    overrides: list[str] = field(default_factory=list)  # applied to every run
    match_params: bool = False
    dtype: str = "auto"
    device: str = "auto"
    decode_tokens: int = 48
    sample_tokens: int = 96
    progress: bool = True
    fresh: bool = False


def check_settings(s: CompareSettings) -> None:
    """Refuse bad settings before the first run, naming the flag. The flags shared with `tegaki train`
    are checked where train's are (tegaki.train.settings), so both commands take the same values."""
    for name in ("max_steps", "seeds", "batch_size", "decode_tokens", "sample_tokens"):
        if getattr(s, name) < 1:
            raise TegakiError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    check_train_settings(
        TrainConfig(
            max_steps=s.max_steps,
            batch_size=s.batch_size,
            block_size=s.block_size,
            lr=s.lr,
            warmup=s.warmup,
            eval_every=s.eval_every if s.eval_every is not None else 1,
            eval_batches=s.eval_batches,
            seed=s.seed,
            dtype=s.dtype,
            device=s.device,
            tokenizer=s.tokenizer,
            data=s.data,
        )
    )


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_folder(entry: Entry, seed: int) -> str:
    """Where one run of a comparison lives, relative to the comparison's folder."""
    return f"runs/{entry.folder_name}/seed{seed}"


def seed_list(s: CompareSettings) -> list[int]:
    return [s.seed + i for i in range(s.seeds)]


def _train_config(
    s: CompareSettings, entry: Entry, data_dir: Path, extra_set: list[str], block_size: int, seed: int | None = None
):
    seed = s.seed if seed is None else seed
    return TrainConfig(
        data=str(data_dir),
        preset=entry.preset,
        out=str(s.out / run_folder(entry, seed)),
        max_steps=s.max_steps,
        batch_size=s.batch_size,
        block_size=block_size,
        lr=s.lr,
        warmup=s.warmup if s.warmup is not None else max(1, min(50, s.max_steps // 10)),
        eval_every=s.eval_every or max(1, s.max_steps // 10),
        eval_batches=s.eval_batches,
        sample_every=0,
        save_every=s.max_steps,
        keep=1,
        seed=seed,
        dtype=s.dtype,
        device=s.device,
        progress=s.progress,
        fresh=s.fresh,
        set=[*s.overrides, *entry.overrides, *extra_set],
    )


def prepare_shared_data(s: CompareSettings):
    """One tokenizer and one set of shards for every run: (tokenizer, data folder)."""
    s.out.mkdir(parents=True, exist_ok=True)
    first = s.entries[0]
    base = ModelConfig.preset(first.preset).with_overrides([*s.overrides, *first.overrides])
    shared = TrainConfig(data=s.data, tokenizer=s.tokenizer, seed=s.seed, progress=s.progress)
    tokenizer, ref = setup_tokenizer(shared, s.out, base.vocab_size, _say)
    data_dir = setup_data(shared, s.out, tokenizer, ref, s.progress, _say)
    return tokenizer, Path(data_dir)


def _matched_intermediate(
    s: CompareSettings, entry: Entry, data_dir: Path, block_size: int, tokenizer, target: int
) -> int:
    """The MLP width (per expert for MoE) that brings this entry's total parameters closest to target.
    Parameters grow linearly with it, so two counts give the line."""

    def total(width: int) -> int:
        cfg = _train_config(s, entry, data_dir, [f"intermediate_size={width}"], block_size)
        return count_parameters(build_model_config(cfg, tokenizer))["total"]

    a, b = total(64), total(128)
    per_unit = (b - a) / 64
    width = max(8, int(round((64 + (target - a) / per_unit) / 8)) * 8)  # a multiple of 8
    return width


def compare(s: CompareSettings) -> dict[str, Any]:
    """Train every entry under identical conditions (resuming what was interrupted); write
    results.json, report.md and loss.png into s.out; return what results.json holds."""
    check_settings(s)
    with flushed_subnormals(s.device):  # the same CPU float settings as `tegaki train`
        return _compare(s)


def _compare(s: CompareSettings) -> dict[str, Any]:
    tokenizer, data_dir = prepare_shared_data(s)
    block_size = s.block_size or min(
        ModelConfig.preset(e.preset).with_overrides([*s.overrides, *e.overrides]).block_size for e in s.entries
    )
    extra = {e.label: [] for e in s.entries}
    if s.match_params:
        first_cfg = build_model_config(_train_config(s, s.entries[0], data_dir, [], block_size), tokenizer)
        target = count_parameters(first_cfg)["total"]
        for e in s.entries[1:]:
            width = _matched_intermediate(s, e, data_dir, block_size, tokenizer, target)
            extra[e.label] = [f"intermediate_size={width}"]

    # The prompt of every sample and decode measurement: the start of the validation text.
    prompt_ids = TokenWindows(data_dir, "val", 16).window(0)[:16].tolist()
    prompt_text = tokenizer.decode(prompt_ids)

    results, loads = [], []
    for seed in seed_list(s):  # seed by seed, every entry in turn: load drift falls on all entries alike
        for entry in s.entries:
            cfg = _train_config(s, entry, data_dir, extra[entry.label], block_size, seed)
            _say(f"=== {entry.label}, seed {seed}: {s.max_steps} steps -> {cfg.out}")
            loads.append(load_per_core())
            results.append(_train_one(s, entry, cfg, seed, prompt_ids, prompt_text))
            loads.append(load_per_core())
    return _write_outputs(s, results, tokenizer, data_dir, block_size, max(loads))


def _train_one(s: CompareSettings, entry: Entry, cfg: TrainConfig, seed: int, prompt_ids, prompt_text):
    batches = BatchHashes()
    run = Run(cfg, on_batch=batches, plot_losses=plot_run_losses)  # `tegaki train`'s own run, watched
    _reset_peak_memory(run.device)
    started = time.perf_counter()
    run.train()
    seconds = time.perf_counter() - started
    peak, peak_what = _peak_memory_bytes(run.device)
    row = _summarise(s, entry, run, batches, cfg, prompt_ids, prompt_text, peak, peak_what, seconds)
    row["seed"] = seed
    row["folder"] = run_folder(entry, seed)
    return row


def load_per_core() -> float:
    """The 1-minute load average per CPU core (0 where the system does not say): above 1, other
    processes compete for the cores and a tokens/s figure measures them as much as the model."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return 0.0


def _save_hashes(run_dir: Path, hashes: dict[int, list[str]]) -> dict[int, list[str]]:
    """Merge this invocation's batch hashes into the run's record (a resumed run adds the rest)."""
    path = run_dir / "batch_hashes.json"
    known = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    known.update(hashes)
    path.write_text(json.dumps({str(k): known[k] for k in sorted(known)}) + "\n")
    return known


def _summarise(s, entry, run, batches, cfg, prompt_ids, prompt_text, peak, peak_what, seconds) -> dict[str, Any]:
    run_dir = Path(cfg.out)
    metrics = run_dir / METRICS_FILE
    records = read_metrics(metrics) if metrics.exists() else []
    train = [r for r in records if "loss" in r and r.get("kind") is None]
    val = [r for r in records if r.get("kind") == "val"]
    # the first step pays for warm-up (allocations, kernel choice): left out when there are others
    speeds = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r] or [
        r["tokens_per_s"] for r in train if "tokens_per_s" in r
    ]
    counts = count_parameters(run.model_config)
    model = run.raw_model.eval()
    prompt = torch.tensor([prompt_ids], device=run.device)
    with torch.no_grad():
        out = model.generate(prompt, s.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed)
    sample_ids = out[0, len(prompt_ids) :]
    sample = run.tokenizer.decode([i for i in sample_ids.tolist() if i < run.tokenizer.vocab_size])
    hashes = _save_hashes(run_dir, batches.hashes)
    row = {
        "label": entry.label,
        "preset": entry.preset,
        "overrides": cfg.set,
        "run_dir": str(run_dir),
        "device": f"{run.device} {run.dtype}",
        "steps": train[-1]["step"] if train else 0,
        "tokens_trained": (train[-1]["step"] if train else 0) * cfg.batch_size * run.block_size,
        "parameters": counts["total"],
        "parameters_active": counts["active"] if counts["active"] is not None else counts["total"],
        "final_train_loss": train[-1]["loss"] if train else None,
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "final_val_bpb": val[-1].get("val_bpb") if val else None,
        "train_tokens_per_s": statistics.median(speeds) if speeds else None,
        "peak_memory_bytes": peak,
        "peak_memory_means": peak_what,
        "decode_tokens_per_s_kv_cache": decode_speed(model, prompt, s.decode_tokens, use_cache=True),
        "decode_tokens_per_s_no_cache": decode_speed(model, prompt, s.decode_tokens, use_cache=False),
        "seconds_this_invocation": round(seconds, 1),
        "sample_prompt": prompt_text,
        "sample": sample,
        "batch_hash": batch_digest(hashes),
        "batches_hashed": sum(len(v) for v in hashes.values()),
    }
    if not run.model_config.causal:
        # The lesson of causal=false: the same weights, scored with the mask generation really has.
        run.raw_model.config.causal = True
        try:
            row["final_val_loss_with_causal_mask"], _ = run.evaluate()
        finally:
            run.raw_model.config.causal = False
    return row


# -------------------------------------------------------------------------------------------------
# Writing the results
# -------------------------------------------------------------------------------------------------


SPREAD_KEYS = (
    "final_train_loss",
    "final_val_loss",
    "final_val_bpb",
    "final_val_loss_with_causal_mask",
    "train_tokens_per_s",
    "decode_tokens_per_s_kv_cache",
    "decode_tokens_per_s_no_cache",
)
SPEED_LOAD_LIMIT = 1.0  # load average per core above which speeds are left out of the report


def summarise_entries(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per entry, in the order given: its parameters and each number over its seeds (`Spread.as_dict`)."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    entries = []
    for label, rows in by_label.items():
        entry = {
            "label": label,
            "seeds": [r["seed"] for r in rows],
            "folders": [r["folder"] for r in rows],
            "parameters": rows[0]["parameters"],
            "parameters_active": rows[0]["parameters_active"],
            "peak_memory_bytes": max((r["peak_memory_bytes"] or 0) for r in rows) or None,
        }
        for key in SPREAD_KEYS:
            values = spread(r.get(key) for r in rows)
            if values is not None:
                entry[key] = values.as_dict()
        entries.append(entry)
    return entries


def identical_batches(results: list[dict[str, Any]]) -> bool:
    """True when, for every seed, every entry trained on the same batches."""
    by_seed: dict[int, set[str]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], set()).add(r["batch_hash"])
    return all(len(hashes) == 1 for hashes in by_seed.values())


def plot_title(s: CompareSettings, block_size: int) -> str:
    """The picture's title: the corpus by its name only (no folder of this machine in a picture)."""
    seeds = f", {s.seeds} seeds" if s.seeds > 1 else ""
    return f"{Path(s.data).name}: {s.max_steps} steps x {s.batch_size} x {block_size} tokens{seeds}"


def draw_comparison(folder: Path, summary: dict[str, Any], path: Path, title: str, smooth: int = 1) -> Path:
    """The loss picture of a comparison: per entry, the mean over its seeds and their range, one colour
    each (`tegaki plot DIR` draws the same)."""
    groups = [
        (e["label"], [loss_curves(read_metrics(folder / f / METRICS_FILE)) for f in e["folders"]])
        for e in summary["entries"]
    ]
    return plot_losses(groups, path, title=title, smooth=smooth)


def _write_outputs(s: CompareSettings, results, tokenizer, data_dir: Path, block_size: int, load: float):
    summary = {
        "data": s.data,
        "data_dir": str(data_dir),
        "tokenizer": getattr(tokenizer, "name", None),
        "vocab_size": tokenizer.vocab_size,
        "max_steps": s.max_steps,
        "batch_size": s.batch_size,
        "block_size": block_size,
        "tokens_per_run": s.max_steps * s.batch_size * block_size,
        "lr": s.lr,
        "seed": s.seed,
        "seeds": seed_list(s),
        "match_params": s.match_params,
        "overrides": s.overrides,
        "identical_batches": identical_batches(results),
        "device": results[0]["device"] if results else s.device,
        "torch": torch.__version__,
        # Speeds are shown only when no other process competed for the cores (see SPEED_LOAD_LIMIT).
        "speed": {"max_load_per_core": round(load, 2), "cores": os.cpu_count(), "shown": load <= SPEED_LOAD_LIMIT},
        "entries": summarise_entries(results),
        "runs": results,
    }
    (s.out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    draw_comparison(s.out, summary, s.out / "loss.png", plot_title(s, block_size), smooth=max(1, s.max_steps // 50))
    (s.out / "report.md").write_text(format_report(summary))
    return summary
