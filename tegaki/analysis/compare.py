"""`tegaki compare`: train several architectures under identical conditions and put them side by side.

    tegaki compare --data shakespeare --presets tiny,tiny-llama,tiny-gpt-oss --max-steps 300 --out runs/cmp

"Identical" means: one tokenizer (trained once, or --tokenizer), one set of token shards, the same
batches in the same order (same seed, batch size and sequence length: `tegaki.data.BatchLoader`
draws the order from the seed alone), the same number of steps, tokens, learning-rate schedule and
initial seed. Each run is an ordinary `tegaki train` run (`tegaki.train.Run`) in DIR/runs/NAME, so
running the command again resumes whatever was interrupted, and every run folder works with
`tegaki generate`, `tegaki trace` and `tegaki plot`.

An entry of --presets is a preset, optionally with its own overrides after colons:
`tiny,tiny:causal=false` trains GPT-2-style twice, the second time without the causal mask.

What comes out:
    DIR/results.json   per run: parameters (total, active), final train/validation loss, bits per
                       byte, training tokens/s, peak memory, decode tokens/s with and without the KV
                       cache, a sample, and a hash of every batch it was trained on
    DIR/report.md      the same as a table, and the samples
    DIR/loss.png       the train and validation curves overlaid
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tegaki.errors import TegakiError

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
    """"tiny,tiny-llama:n_kv_head=1" -> entries; every preset is checked before any training."""
    from tegaki.config import ModelConfig

    entries = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        preset, *overrides = item.split(":")
        ModelConfig.preset(preset)  # an unknown preset fails now, with the list of known ones
        entries.append(Entry(item, preset, overrides))
    if len(entries) < 1:
        raise TegakiError("--presets needs at least one preset, e.g. --presets tiny,tiny-llama")
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise TegakiError(f"--presets lists the same entry twice: {', '.join(labels)}")
    return entries


# -------------------------------------------------------------------------------------------------
# A training run that also records which batches it saw
# -------------------------------------------------------------------------------------------------


class _HashedBatches:
    """Wraps the run's BatchLoader: every batch handed out is hashed, keyed by optimizer step."""

    def __init__(self, loader):
        self.loader = loader
        self.step = 0
        self.hashes: dict[int, list[str]] = {}

    def next_batch(self):
        inputs, targets = self.loader.next_batch()
        digest = hashlib.sha256(inputs.numpy().tobytes() + targets.numpy().tobytes()).hexdigest()[:16]
        self.hashes.setdefault(self.step, []).append(digest)
        return inputs, targets

    def __getattr__(self, name):  # state_dict, load_state_dict, ... go to the real loader
        return getattr(self.loader, name)


def _compared_run_class():
    from tegaki.train import Run

    class ComparedRun(Run):
        """`tegaki train`'s own Run; only the batch loader is watched."""

        def _build_data(self) -> None:
            super()._build_data()
            self.loader = _HashedBatches(self.loader)

        def train_step(self, step: int):
            self.loader.step = step
            self.loader.hashes.pop(step, None)  # a step re-run after a resume replaces its record
            return super().train_step(step)

    return ComparedRun


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
    try:  # Linux: writing 5 to clear_refs resets this process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


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
    data: str
    entries: list[Entry]
    out: Path
    max_steps: int = 200
    seed: int = 1337
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


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _train_config(s: CompareSettings, entry: Entry, data_dir: Path, extra_set: list[str], block_size: int):
    from tegaki.train import TrainConfig

    return TrainConfig(
        data=str(data_dir), preset=entry.preset, out=str(s.out / "runs" / entry.folder_name),
        max_steps=s.max_steps, batch_size=s.batch_size, block_size=block_size, lr=s.lr,
        warmup=s.warmup if s.warmup is not None else max(1, min(50, s.max_steps // 10)),
        eval_every=s.eval_every or max(1, s.max_steps // 10), eval_batches=s.eval_batches,
        sample_every=0, save_every=s.max_steps, keep=1, seed=s.seed, dtype=s.dtype, device=s.device,
        progress=s.progress, fresh=s.fresh, set=[*s.overrides, *entry.overrides, *extra_set],
    )


def prepare_shared_data(s: CompareSettings):
    """One tokenizer and one set of shards for every run: (tokenizer, data folder)."""
    from tegaki.config import ModelConfig
    from tegaki.train import TrainConfig, setup_data, setup_tokenizer

    s.out.mkdir(parents=True, exist_ok=True)
    first = s.entries[0]
    base = ModelConfig.preset(first.preset).with_overrides([*s.overrides, *first.overrides])
    shared = TrainConfig(data=s.data, tokenizer=s.tokenizer, seed=s.seed, progress=s.progress)
    tokenizer, ref = setup_tokenizer(shared, s.out, base.vocab_size, _say)
    data_dir = setup_data(shared, s.out, tokenizer, ref, s.progress, _say)
    return tokenizer, Path(data_dir)


def _matched_intermediate(s: CompareSettings, entry: Entry, data_dir: Path, block_size: int, tokenizer, target: int) -> int:
    """The MLP width (per expert for MoE) that brings this entry's total parameters closest to target.
    Parameters grow linearly with it, so two counts give the line."""
    from tegaki.analysis.params import count_parameters
    from tegaki.train import build_model_config

    def total(width: int) -> int:
        cfg = _train_config(s, entry, data_dir, [f"intermediate_size={width}"], block_size)
        return count_parameters(build_model_config(cfg, tokenizer))["total"]

    a, b = total(64), total(128)
    per_unit = (b - a) / 64
    width = max(8, int(round((64 + (target - a) / per_unit) / 8)) * 8)  # a multiple of 8
    return width


def compare(s: CompareSettings) -> dict[str, Any]:
    from tegaki.train import flushed_subnormals

    with flushed_subnormals(s.device):  # the same CPU float settings as `tegaki train`
        return _compare(s)


def _compare(s: CompareSettings) -> dict[str, Any]:
    from tegaki.analysis.params import count_parameters
    from tegaki.config import ModelConfig
    from tegaki.data import TokenWindows
    from tegaki.train import build_model_config

    tokenizer, data_dir = prepare_shared_data(s)
    block_size = s.block_size or min(
        ModelConfig.preset(e.preset).with_overrides([*s.overrides, *e.overrides]).block_size for e in s.entries
    )
    extra = {e.label: [] for e in s.entries}
    if s.match_params:
        first_cfg = build_model_config(_train_config(s, s.entries[0], data_dir, [], block_size), tokenizer)
        target = count_parameters(first_cfg)["total"]
        for e in s.entries[1:]:
            extra[e.label] = [f"intermediate_size={_matched_intermediate(s, e, data_dir, block_size, tokenizer, target)}"]

    # The prompt of every sample and decode measurement: the start of the validation text.
    prompt_ids = TokenWindows(data_dir, "val", 16).window(0)[:16].tolist()
    prompt_text = tokenizer.decode(prompt_ids)

    results = []
    ComparedRun = _compared_run_class()
    for entry in s.entries:
        cfg = _train_config(s, entry, data_dir, extra[entry.label], block_size)
        _say(f"=== {entry.label}: {s.max_steps} steps -> {cfg.out}")
        run = ComparedRun(cfg)
        _reset_peak_memory(run.device)
        started = time.perf_counter()
        run.train()
        seconds = time.perf_counter() - started
        peak, peak_what = _peak_memory_bytes(run.device)
        results.append(_summarise(s, entry, run, cfg, prompt_ids, prompt_text, peak, peak_what, seconds))

    return _write_outputs(s, results, tokenizer, data_dir, block_size, prompt_text)


def _save_hashes(run_dir: Path, hashes: dict[int, list[str]]) -> dict[int, list[str]]:
    """Merge this invocation's batch hashes into the run's record (a resumed run adds the rest)."""
    path = run_dir / "batch_hashes.json"
    known = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    known.update(hashes)
    path.write_text(json.dumps({str(k): known[k] for k in sorted(known)}) + "\n")
    return known


def _summarise(s, entry, run, cfg, prompt_ids, prompt_text, peak, peak_what, seconds) -> dict[str, Any]:
    from tegaki.analysis.params import count_parameters
    from tegaki.train import read_metrics

    run_dir = Path(cfg.out)
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    train = [r for r in records if "loss" in r and r.get("kind") is None]
    val = [r for r in records if r.get("kind") == "val"]
    speeds = [r["tokens_per_s"] for r in train[1:] if "tokens_per_s" in r] or [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    counts = count_parameters(run.model_config)
    model = run.raw_model.eval()
    prompt = torch.tensor([prompt_ids], device=run.device)
    with torch.no_grad():
        sample_ids = model.generate(prompt, s.sample_tokens, temperature=0.8, top_k=50, seed=s.seed)[0, len(prompt_ids):]
    sample = run.tokenizer.decode([i for i in sample_ids.tolist() if i < run.tokenizer.vocab_size])
    hashes = _save_hashes(run_dir, run.loader.hashes)
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


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _write_outputs(s: CompareSettings, results, tokenizer, data_dir: Path, block_size: int, prompt_text: str):
    from tegaki.analysis.plot import plot_losses, read_metrics

    same_batches = len({r["batch_hash"] for r in results}) == 1
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
        "match_params": s.match_params,
        "overrides": s.overrides,
        "identical_batches": same_batches,
        "device": results[0]["device"] if results else s.device,
        "torch": torch.__version__,
        "runs": results,
    }
    (s.out / "results.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    curves = [(r["label"], read_metrics(Path(r["run_dir"]) / "metrics.jsonl")) for r in results]
    plot_losses(curves, s.out / "loss.png", title=f"{s.data}: {s.max_steps} steps x {s.batch_size} x {block_size} tokens",
                smooth=max(1, s.max_steps // 50))
    (s.out / "report.md").write_text(format_report(summary))
    return summary


def format_report(summary: dict[str, Any]) -> str:
    lines = [
        f"# Comparison on {summary['data']}",
        "",
        f"Every run: {summary['max_steps']} steps x {summary['batch_size']} sequences x {summary['block_size']} tokens "
        f"= {summary['tokens_per_run']:,} tokens, lr {summary['lr']}, seed {summary['seed']}, tokenizer "
        f"{summary['tokenizer']} ({summary['vocab_size']:,} tokens), device {summary['device']}, torch {summary['torch']}."
        + (" Widths matched to equal parameter counts." if summary["match_params"] else ""),
        f"Identical batches in every run: {'yes' if summary['identical_batches'] else 'NO'} (hash of every batch, in results.json).",
        "",
        "| run | params | active | train loss | val loss | val bits/byte | train tok/s | peak mem | decode tok/s (KV cache) | decode tok/s (no cache) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["runs"]:
        lines.append(
            f"| {r['label']} | {r['parameters']:,} | {r['parameters_active']:,} | {_fmt(r['final_train_loss'], '.4f')} | "
            f"{_fmt(r['final_val_loss'], '.4f')} | {_fmt(r['final_val_bpb'], '.3f')} | {_fmt(r['train_tokens_per_s'], ',.0f')} | "
            f"{_fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 2**20, ',.0f')} MiB | "
            f"{_fmt(r['decode_tokens_per_s_kv_cache'], ',.0f')} | {_fmt(r['decode_tokens_per_s_no_cache'], ',.0f')} |"
        )
    for r in summary["runs"]:
        if "final_val_loss_with_causal_mask" in r:
            lines += ["", f"{r['label']}: trained without the causal mask, its validation loss is "
                      f"{r['final_val_loss']:.4f} -- but scored with the causal mask that generation has, "
                      f"the same weights give {r['final_val_loss_with_causal_mask']:.4f}."]
    lines += ["", "## Samples", "", "Each continues the start of the validation text (temperature 0.8, top-k 50):", "",
              "```", summary["runs"][0]["sample_prompt"] if summary["runs"] else "", "```", ""]
    for r in summary["runs"]:
        lines += [f"### {r['label']}", "", "```", r["sample"].strip("\n"), "```", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several presets under identical conditions; table, samples and loss curves",
        description="Train each preset on the same tokenizer, batches, budget, schedule and seed, then "
        "write DIR/results.json, DIR/report.md and DIR/loss.png. Run it again to resume.",
    )
    a = p.add_argument
    a("--data", default="shakespeare", help="shakespeare | a .txt/.md/.jsonl/.parquet file or folder | prepared shards")
    a("--presets", required=True, help="comma-separated presets, each optionally with :field=value overrides, "
      "e.g. tiny,tiny-llama,tiny:causal=false")
    a("--out", required=True, help="output folder")
    a("--max-steps", type=int, default=200, help="optimizer steps per run (default 200)")
    a("--seed", type=int, default=1337, help="seed of the weights and the batch order (default 1337)")
    a("--batch-size", type=int, default=16, help="sequences per step (default 16)")
    a("--block-size", type=int, help="tokens per sequence (default: the smallest block_size of the presets)")
    a("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    a("--warmup", type=int, help="warmup steps (default: a tenth of the steps, at most 50)")
    a("--eval-every", type=int, help="validation every N steps (default: a tenth of the steps)")
    a("--eval-batches", type=int, default=10, help="validation batches per evaluation (default 10)")
    a("--tokenizer", help="'gpt2' or a tokenizer folder (default: a BPE trained once on the data)")
    a("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
      help="override a ModelConfig field in every run (repeatable)")
    a("--match-params", action="store_true", help="scale MLP widths so every run has the first run's parameter count")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    a("--device", default="auto")
    a("--decode-tokens", type=int, default=48, help="tokens generated to time decoding (default 48)")
    a("--sample-tokens", type=int, default=96, help="tokens in each sample (default 96)")
    a("--fresh", action="store_true", help="start every run over instead of resuming")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name in ("max_steps", "batch_size", "decode_tokens", "sample_tokens"):
        if getattr(args, name) < 1:
            raise TegakiError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    settings = CompareSettings(
        data=args.data, entries=parse_entries(args.presets), out=Path(args.out), max_steps=args.max_steps,
        seed=args.seed, batch_size=args.batch_size, block_size=args.block_size, lr=args.lr, warmup=args.warmup,
        eval_every=args.eval_every, eval_batches=args.eval_batches, tokenizer=args.tokenizer,
        overrides=args.overrides, match_params=args.match_params, dtype=args.dtype, device=args.device,
        decode_tokens=args.decode_tokens, sample_tokens=args.sample_tokens, progress=args.progress, fresh=args.fresh,
    )
    summary = compare(settings)
    print(format_report(summary).split("## Samples")[0].rstrip())
    print(f"\nwrote {settings.out / 'results.json'}, {settings.out / 'report.md'}, {settings.out / 'loss.png'}")
    return 0
