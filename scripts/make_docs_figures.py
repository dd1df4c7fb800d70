"""Regenerate every figure of docs/ -- the tables, the traces and the pictures -- in one command.

    python scripts/make_docs_figures.py               # the docs' settings: about 30 minutes on 2 busy cores
    python scripts/make_docs_figures.py --steps 300   # longer runs: firmer numbers (every figure follows)
    python scripts/make_docs_figures.py --ja-corpus ja_manpages_sec1.txt   # also the Japanese comparison

Every number in docs/ that a run produces sits between two markers,

    <!-- figure:NAME -->
    ...written by this script...
    <!-- /figure:NAME -->

and this script rewrites what is between them, in English and Japanese pages alike, together with
the commands that produced it; pictures go to docs/img/. Runs are `tegaki` commands run as a reader
would run them (OMP_NUM_THREADS=1, in --work, default the repository root, so paths read
`runs/cmp-en/...`), and every loss is given over --seeds seeds with its spread: a second machine's
CPU kernels round differently, and the spread over seeds is the yardstick for how much that moves.
Finished runs are resumed, not retrained: delete --work's runs/ folders to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
IMG = DOCS / "img"
sys.path.insert(0, str(ROOT))  # the tegaki of this checkout, also for the report helpers below

from tegaki.analysis.attention import attention_maps, future_attention  # noqa: E402
from tegaki.analysis.compare_report import difference_lines  # noqa: E402
from tegaki.analysis.stats import Spread, format_spread  # noqa: E402
from tegaki.analysis.trace import load_model_and_tokenizer  # noqa: E402

EN_PRESETS = "tiny,tiny-llama,tiny-gpt-oss,tiny-gpt-oss-yarn,tiny-gated,tiny:causal=false"
JA_PRESETS = "tiny,tiny-llama,tiny-gpt-oss,tiny-gpt-oss-yarn,tiny-gated"
# The causal-mask bug shows fastest in a small model with rotary positions.
CAUSAL_SMALL = ["--set", "n_layer=2", "--set", "n_embd=96", "--set", "n_head=4", "--set", "intermediate_size=256"]
TRACE_PROMPT = "ROMEO: I will"
PREVIOUS_TOKEN_HEAD = 0.5  # a previous-token score from which a head is called one (most weight on the token before)
ATTENTION_PROMPT = "ROMEO: I will not speak of it, for the king is dead."


# -------------------------------------------------------------------------------------------------
# Running commands, writing blocks
# -------------------------------------------------------------------------------------------------


def shell_line(argv: list[str]) -> str:
    """argv as the reader types it, continued over lines of at most ~100 characters."""
    words = ["tegaki", *[shlex.quote(a) for a in argv]]
    lines, line = [], ""
    for w in words:
        if line and len(line) + len(w) > 95 and w.startswith("--"):
            lines.append(line + " \\")
            line = "   "
        line = f"{line} {w}" if line else w
    return "\n".join([*lines, line])


def tegaki(argv: list[str], work: Path) -> str:
    """Run one tegaki command in `work` as a reader would; its standard output."""
    print("$ " + shell_line(argv).replace("\n", "\n  "), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "tegaki", *argv], cwd=work, env=env, text=True, stdout=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): tegaki {' '.join(argv)}")
    return done.stdout


def write_block(name: str, content: str, ja: str | None = None) -> None:
    """Put `content` between the markers of `name` in every page of docs/ (and the READMEs) that has them;
    `ja`, when given, on the Japanese pages (*.ja.md)."""
    pattern = re.compile(rf"(<!-- figure:{re.escape(name)} -->\n)(.*?)(<!-- /figure:{re.escape(name)} -->)", re.S)
    pages = [p for p in [*sorted(DOCS.glob("*.md")), *sorted(ROOT.glob("README*.md"))] if pattern.search(p.read_text())]
    if not pages:
        print(f"  (no page has the block {name})")
    for page in pages:
        text = (ja if ja is not None and page.name.endswith(".ja.md") else content).rstrip("\n")
        page.write_text(pattern.sub(lambda m, t=text: m.group(1) + t + "\n" + m.group(3), page.read_text()))
        print(f"  wrote {name} into {page.relative_to(ROOT)}")


def fenced(text: str, kind: str = "text") -> str:
    return f"```{kind}\n{text.rstrip()}\n```\n"


def copy_picture(source: Path, name: str) -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, IMG / name)
    print(f"  wrote docs/img/{name}")


# -------------------------------------------------------------------------------------------------
# The comparisons
# -------------------------------------------------------------------------------------------------


def compare_argv(args, data: str, presets: str, out: str, extra: list[str] = ()) -> list[str]:
    return [
        "compare",
        "--data",
        data,
        "--presets",
        presets,
        *extra,
        "--seeds",
        str(args.seeds),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--block-size",
        str(args.block_size),
        "--eval-every",
        str(max(1, args.steps // 6)),
        "--eval-batches",
        "8",
        "--out",
        out,
        "--no-progress",
    ]


def results_table(results: dict, ja: bool = False) -> str:
    """The docs' table of one comparison: losses over seeds, then the differences they support."""
    n = len(results["seeds"])
    seeds = ", ".join(str(s) for s in results["seeds"])
    same_ja = "はい" if results["identical_batches"] else "いいえ"
    intro_ja = (
        f"各実行: {results['max_steps']} ステップ × {results['batch_size']} 系列 × {results['block_size']} "
        f"トークン = {results['tokens_per_run']:,} トークン、最大学習率 {results['lr']}、コーパスで学習した "
        f"{results['vocab_size']:,} トークンのバイトレベル BPE。シードは {n} つ({seeds})で、同じシードなら"
        f"どのプリセットも同じバッチを見ます(同一バッチ: {same_ja})。"
        "損失はシード間の平均 ± 標準偏差、区間は平均の 95% 区間です。"
    )
    intro_en = (
        f"Each run: {results['max_steps']} steps × {results['batch_size']} sequences × "
        f"{results['block_size']} tokens = {results['tokens_per_run']:,} tokens, peak learning rate "
        f"{results['lr']}, a byte-level BPE of {results['vocab_size']:,} tokens trained on the corpus; "
        f"{n} seeds "
        f"({seeds}), each entry on the same batches for the same seed (identical batches: "
        f"{'yes' if results['identical_batches'] else 'NO'}). Losses are mean ± standard deviation over the "
        "seeds; the interval is the 95% interval of the mean."
    )
    lines = [
        intro_ja if ja else intro_en,
        "",
        "| run | parameters (active) | train loss | val loss | val loss, 95% interval | val bits/byte |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e in results["entries"]:
        val = Spread(tuple(e["final_val_loss"]["values"]))
        low, high = val.interval or (val.mean, val.mean)
        active = f" ({e['parameters_active']:,})" if e["parameters_active"] != e["parameters"] else ""
        lines.append(
            f"| {e['label']} | {e['parameters']:,}{active} | "
            f"{format_spread(Spread(tuple(e['final_train_loss']['values'])))} | {format_spread(val)} | "
            f"{low:.3f} – {high:.3f} | {format_spread(Spread(tuple(e['final_val_bpb']['values'])))} |"
        )
    lead = (
        "検証損失の差(95% 区間が分かれたものだけを差と呼びます。行はレポートのまま英語です):"
        if ja
        else "Differences in validation loss, as the 95% intervals support them:"
    )
    return "\n".join(lines + ["", lead, "", *difference_lines(results["entries"])]) + "\n"


def run_comparison(args, work: Path, name: str, data: str, presets: str, extra: list[str] = ()) -> dict:
    argv = compare_argv(args, data, presets, f"runs/{name}", list(extra))
    tegaki(argv, work)
    # an absolute corpus path (--ja-corpus) is shown by its name: no folder of this machine in the docs
    shown = [Path(a).name if a == data and Path(a).is_absolute() else a for a in argv if a != "--no-progress"]
    write_block(f"{name}-command", fenced(shell_line(shown), "bash"))
    results = json.loads((work / "runs" / name / "results.json").read_text())
    write_block(f"{name}-table", results_table(results), results_table(results, ja=True))
    return results


def causal_figures(results: dict, work: Path) -> None:
    """The bug in numbers: scored as trained, and scored with the causal mask generation has."""
    correct, bug = results["entries"]
    rows = [
        ("training loss", "final_train_loss", "final_train_loss"),
        ("validation loss, as trained", "final_val_loss", "final_val_loss"),
        ("validation loss with the causal mask generation has", "final_val_loss", "final_val_loss_with_causal_mask"),
    ]
    ja_labels = {
        "training loss": "学習損失",
        "validation loss, as trained": "検証損失(学習時と同じ条件)",
        "validation loss with the causal mask generation has": "生成時と同じ causal マスクでの検証損失",
    }
    tables = {}
    for lang in ("en", "ja"):
        head = "| | 正しいモデル(`{}`) | バグ(`{}`) |" if lang == "ja" else "| | correct (`{}`) | bug (`{}`) |"
        lines = [head.format(correct["label"], bug["label"]), "| --- | ---: | ---: |"]
        for label, key_correct, key_bug in rows:
            a, b = (Spread(tuple(e[k]["values"])) for e, k in ((correct, key_correct), (bug, key_bug)))
            shown = ja_labels[label] if lang == "ja" else label
            lines.append(f"| {shown} | {format_spread(a)} | **{format_spread(b)}** |")
        tables[lang] = "\n".join(lines) + "\n"
    write_block("causal-bug-table", tables["en"], tables["ja"])
    first = {r["label"]: r["sample"] for r in results["runs"] if r["seed"] == results["seeds"][0]}
    write_block("causal-bug-sample", fenced(first[bug["label"]]))
    write_block("causal-correct-sample", fenced(first[correct["label"]]))
    copy_picture(work / "runs" / "causal" / "loss.png", "causal-bug.png")


# -------------------------------------------------------------------------------------------------
# Traces, attention maps, parameter counts
# -------------------------------------------------------------------------------------------------


def walkthrough_model(args, work: Path) -> str:
    """The model the walk-through traces: GPT-2 style (tiny), trained on the comparison's shards a little
    longer than the comparison does, long enough for its heads to specialise."""
    argv = [
        "train",
        "--data",
        "runs/cmp-en/data",
        "--preset",
        "tiny",
        "--max-steps",
        str(args.trace_steps),
        "--batch-size",
        "8",
        "--block-size",
        "128",
        "--seed",
        "1337",
        "--out",
        "runs/walkthrough",
    ]
    tegaki([*argv, "--no-progress"], work)
    write_block("walkthrough-command", fenced(shell_line(argv), "bash"))
    return "runs/walkthrough"


def trace_figures(work: Path, model: str) -> None:
    """The walk-through's trace: layer 1 of the GPT-2-style model, the head picked by `tegaki trace`'s own
    rule (the highest previous-token score), so the story holds whichever head it is on a machine."""
    argv = ["trace", "--model", model, TRACE_PROMPT, "--layer", "1"]
    write_block("trace-tiny", fenced("$ " + shell_line(argv) + "\n" + tegaki(argv, work)))
    traced = json.loads(tegaki([*argv, "--json"], work))
    picked, words = traced["attention_pattern"], [t["text"] for t in traced["tokens"]]
    score = picked["previous_token_scores"][picked["head"]]
    weights = picked["weights"]  # (T, T) of the picked head
    first = sum(row[0] for row in weights[1:]) / max(1, len(weights) - 1)  # mean weight on the first token
    h = picked["head"]
    if score >= PREVIOUS_TOKEN_HEAD:
        en = (
            f"Layer 1, head {h} is the head `tegaki trace` picked, and it is a *previous-token head*: its "
            f"previous-token score is {score:.2f} (the mean weight a query puts on the token just before it). "
            f"Here `{words[-1]!r}` puts {weights[-1][-2]:.2f} of its attention on `{words[-2]!r}`.\n"
        )
        ja = (
            f"層 1・ヘッド {h} が `tegaki trace` の選んだヘッドで、*直前トークンのヘッド* です。直前トークン"
            f"スコアは {score:.2f}(クエリが 1 つ前のトークンに向ける重みの平均)。ここでは `{words[-1]!r}` が"
            f"注意の {weights[-1][-2]:.2f} を `{words[-2]!r}` に向けています。\n"
        )
    else:
        en = (
            f"At this budget the rule finds no previous-token head in layer 1: the highest score is {score:.2f} "
            f"(head {h}), where a head that read only the previous token would score near 1. Its queries put "
            f'{first:.2f} of their weight, on average, on the first token (the "attention sink" that '
            "GPT-OSS replaces with a learned sink logit). That is what this small model learned here, on this "
            "machine; a previous-token head, where training grows one, is found by the same rule.\n"
        )
        ja = (
            f"この予算では、規則は層 1 に直前トークンのヘッドを見つけません。最高のスコアは {score:.2f}"
            f"(ヘッド {h})で、直前のトークンだけを読むヘッドなら 1 に近くなります。このヘッドのクエリは平均で"
            f"重みの {first:.2f} を最初のトークンに置いています(GPT-OSS が学習される sink ロジットで置き換える"
            "「attention sink」)。これがこの小さなモデルがここで、このマシンで学んだことです。学習が直前トークンの"
            "ヘッドを育てれば、同じ規則がそれを見つけます。\n"
        )
    write_block("trace-head", en, ja)
    attention = ["attention", "--model", model, ATTENTION_PROMPT, "--layer", "1", "--out"]
    shown = shell_line([*attention, "docs/img/attention-tiny-layer1.png"])
    printed = tegaki([*attention, str(IMG / "attention-tiny-layer1.png")], work).replace(str(IMG), "docs/img")
    write_block("attention-tiny", fenced(f"$ {shown}\n{printed}"))


def causal_trace(work: Path, first_seed: int) -> None:
    """The cheat, seen in one head: the head of layer 1 that puts the most weight on later tokens (the
    per-head figure `tegaki attention` prints in its warning), traced with `--head`."""
    model = f"runs/causal/runs/tiny-llama+causal=false/seed{first_seed}"
    net, tok, _ = load_model_and_tokenizer(model=str(work / model))
    att, _ = attention_maps(net, tok, TRACE_PROMPT, layer=1)  # (H, T, T)
    head = int(future_attention(att).argmax())
    argv = ["trace", "--model", model, TRACE_PROMPT, "--layer", "1", "--head", str(head)]
    weights = json.loads(tegaki([*argv, "--json"], work))["attention_pattern"]["weights"]
    future = weights[2][3]  # query ' I' (position 2) on the next token ' will' (position 3)
    command = " ".join(shlex.quote(a) for a in ["tegaki", *argv])
    write_block(
        "causal-bug-trace",
        f"`{command}` shows the cheat directly. Head {head} is the head of layer 1 "
        "that puts the most weight on later tokens (`tegaki attention` prints that weight for every head); "
        f"in it the query `' I'` puts {future:.2f} of its attention on the *next* token `' will'`, the "
        "token it is supposed to predict.\n",
        f"`{command}` はずるを直接見せます。ヘッド {head} は、層 1 で後のトークンに最も重みを置くヘッドです"
        "(`tegaki attention` がヘッドごとにその重みを表示します)。そこでクエリ `' I'` は注意の "
        f"{future:.2f} を *次の* トークン `' will'`、つまり予測すべきトークンに向けています。\n",
    )
    attention = ["attention", "--model", model, "ROMEO: I will not speak of it", "--layer", "1", "--out", "att.png"]
    write_block("causal-attention", fenced(f"$ {shell_line(attention)}\n{tegaki(attention, work)}"))
    (work / "att.png").unlink()  # the picture is not one of the docs': only the command's warning is


def params_figures(work: Path) -> None:
    for preset in ("gpt2", "gpt-oss-20b"):
        text = tegaki(["params", preset], work)
        write_block(f"params-{preset}", fenced(f"$ tegaki params {preset}\n{text}"))
        tegaki(["params", preset, "--plot", str(IMG / f"params-{preset}.png")], work)


# -------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds per preset (default 3)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--block-size", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--causal-steps", type=int, default=200, help="steps of the causal-bug comparison (default 200)")
    p.add_argument("--ja-corpus", help="a Japanese text file: also run the Japanese comparison (not shipped)")
    p.add_argument("--work", default=str(ROOT), help="folder the runs go into, under runs/ (default: the repository)")
    p.add_argument("--trace-steps", type=int, default=200, help="steps of the walk-through's model (default 200)")
    p.add_argument(
        "--only",
        choices=["params", "en", "trace", "causal", "ja"],
        action="append",
        help="regenerate only these figures (repeatable; default: all)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    wanted = set(args.only or ["params", "en", "trace", "causal", "ja"])
    started = time.time()
    if "params" in wanted:
        params_figures(work)
    if "en" in wanted:
        run_comparison(args, work, "cmp-en", "shakespeare", EN_PRESETS)
        copy_picture(work / "runs" / "cmp-en" / "loss.png", "compare-en.png")
    if "trace" in wanted:
        trace_figures(work, walkthrough_model(args, work))
    if "causal" in wanted:
        causal_args = argparse.Namespace(**{**vars(args), "steps": args.causal_steps})
        results = run_comparison(
            causal_args, work, "causal", "runs/cmp-en/data", "tiny-llama,tiny-llama:causal=false", CAUSAL_SMALL
        )
        causal_figures(results, work)
        causal_trace(work, results["seeds"][0])
    if "ja" in wanted and args.ja_corpus:
        run_comparison(args, work, "cmp-ja", str(Path(args.ja_corpus).resolve()), JA_PRESETS)
        copy_picture(work / "runs" / "cmp-ja" / "loss.png", "compare-ja.png")
    elif "ja" in wanted:
        print("(the Japanese comparison needs --ja-corpus FILE: its corpus is not shipped; left as it was)")
    print(f"done in {(time.time() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
