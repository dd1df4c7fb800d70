"""The report of `tegaki compare` (DIR/report.md): results.json as Markdown.

Losses are written as mean ± standard deviation over the seeds, beside the 95% interval of the
mean; a difference between two entries is stated only where those intervals separate. Speeds are
indicative at best (a shared machine's neighbours change them from one minute to the next), so
they stand in a table of their own, and are left out when the machine was loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tegaki.analysis.stats import Spread, difference_sentence, format_spread


def _spread(entry: dict[str, Any], key: str) -> Spread | None:
    """The Spread that results.json stores as a dict (`Spread.as_dict`)."""
    value = entry.get(key)
    return Spread(tuple(value["values"])) if value else None


def _interval(entry: dict[str, Any], key: str) -> str:
    s = _spread(entry, key)
    if s is None or s.interval is None:
        return "-"
    low, high = s.interval
    return f"{low:.3f} – {high:.3f}"


def _header(s: dict[str, Any]) -> list[str]:
    seeds = s["seeds"]
    return [
        f"# Comparison on {Path(s['data']).name}",
        "",
        f"Every run: {s['max_steps']} steps x {s['batch_size']} sequences x {s['block_size']} tokens "
        f"= {s['tokens_per_run']:,} tokens, lr {s['lr']}, tokenizer {s['tokenizer']} ({s['vocab_size']:,} tokens), "
        f"device {s['device']}, torch {s['torch']}."
        + (" Widths matched to equal parameter counts." if s["match_params"] else ""),
        f"Each entry was trained with {len(seeds)} seed{'s' if len(seeds) > 1 else ''} "
        f"({', '.join(str(x) for x in seeds)}): the seed sets the initial weights and the batch order.",
        f"For each seed, every entry trained on identical batches: {'yes' if s['identical_batches'] else 'NO'} "
        "(hash of every batch, in results.json).",
        "",
        "Losses: mean ± standard deviation over the seeds, and the 95% interval of the mean (Student's t).",
        "",
    ]


def _loss_table(entries: list[dict[str, Any]]) -> list[str]:
    columns = (
        "run",
        "params",
        "active",
        "train loss",
        "val loss",
        "val loss, 95% interval",
        "val bits/byte",
        "peak mem",
    )
    lines = ["| " + " | ".join(columns) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
    for e in entries:
        peak = e.get("peak_memory_bytes")
        cells = [
            e["label"],
            f"{e['parameters']:,}",
            f"{e['parameters_active']:,}",
            format_spread(_spread(e, "final_train_loss")),
            format_spread(_spread(e, "final_val_loss")),
            _interval(e, "final_val_loss"),
            format_spread(_spread(e, "final_val_bpb")),
            f"{peak / 2**20:,.0f} MiB" if peak else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def difference_lines(entries: list[dict[str, Any]], key: str = "final_val_loss") -> list[str]:
    """Every pair of entries, in the order given: a difference only where the intervals separate."""
    lines = []
    for i, earlier in enumerate(entries):
        for later in entries[i + 1 :]:
            a, b = _spread(later, key), _spread(earlier, key)
            if a is not None and b is not None:
                lines.append("- " + difference_sentence(later["label"], a, earlier["label"], b))
    return lines


def _speed_section(s: dict[str, Any]) -> list[str]:
    speed = s["speed"]
    lines = ["## Speed (indicative)", ""]
    if not speed["shown"]:
        return lines + [
            f"Left out: the load average reached {speed['max_load_per_core']:.1f} per core on {speed['cores']} "
            "cores during the runs, so tokens/s would measure the other processes as much as the models "
            "(results.json keeps them). `benchmarks/` times speeds properly.",
            "",
        ]
    lines += [
        "Means over the seeds; the entries ran interleaved (seed by seed, every entry in turn) on a machine "
        f"whose load stayed under {speed['max_load_per_core']:.1f} per core. Read them as orders of "
        "magnitude, not as a ranking.",
        "",
        "| run | train tok/s | decode tok/s (KV cache) | decode tok/s (no cache) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for e in s["entries"]:
        cells = [
            format_spread(_spread(e, k), ",.0f")
            for k in ("train_tokens_per_s", "decode_tokens_per_s_kv_cache", "decode_tokens_per_s_no_cache")
        ]
        lines.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _causal_lines(entries: list[dict[str, Any]]) -> list[str]:
    lines = []
    for e in entries:
        masked = _spread(e, "final_val_loss_with_causal_mask")
        if masked is not None:
            lines += [
                f"{e['label']}: trained without the causal mask, its validation loss is "
                f"{format_spread(_spread(e, 'final_val_loss'))} -- but scored with the causal mask that "
                f"generation has, the same weights give {format_spread(masked)}.",
                "",
            ]
    return lines


def _samples(s: dict[str, Any]) -> list[str]:
    first_seed = [r for r in s["runs"] if r["seed"] == s["seeds"][0]]
    lines = [
        "## Samples",
        "",
        f"Seed {s['seeds'][0]}; each continues the start of the validation text (temperature 0.8, top-k 50):",
        "",
        "```",
        first_seed[0]["sample_prompt"] if first_seed else "",
        "```",
        "",
    ]
    for r in first_seed:
        lines += [f"### {r['label']}", "", "```", r["sample"].strip("\n"), "```", ""]
    return lines


def format_report(summary: dict[str, Any]) -> str:
    """results.json as Markdown: the settings, the losses, the differences, the speeds, the samples."""
    entries = summary["entries"]
    lines = _header(summary) + _loss_table(entries) + [""]
    if len(entries) > 1:
        lines += ["## Differences in validation loss", ""] + difference_lines(entries) + [""]
    lines += _causal_lines(entries) + _speed_section(summary) + _samples(summary)
    return "\n".join(lines)
