"""`tegaki eval`: perplexity and bits per byte of a text, multiple-choice accuracy, response loss on records."""

from __future__ import annotations

import json
import sys

from tegaki.errors import TegakiError
from tegaki.eval.tasks import read_tasks, score_tasks
from tegaki.eval.text import read_text, score_records, score_text
from tegaki.finetune.data import records_path
from tegaki.finetune.loop import FineTuneConfig, chat_template_for
from tegaki.finetune.peft import load_peft
from tegaki.load import ModelSource
from tegaki.lora import merge_lora


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure a model: perplexity and bits per byte, multiple choice, response loss",
        description="Evaluate any model tegaki loads. --text: perplexity and bits per byte (sliding window). "
        "--tasks: multiple-choice accuracy ({context, endings, label} per line) with a 95% interval. "
        "--records: mean loss on the responses of instruction records (prompts masked).",
    )
    a = p.add_argument
    a("--model", required=True, help="run folder, transformers folder or hub id")
    a("--adapter", help="a PEFT LoRA adapter folder to put on the model first (refused if made for another base)")
    a("--text", help="a UTF-8 text file")
    a("--window", type=int, help="tokens per window for --text (default: the model's block_size)")
    a("--stride", type=int, help="tokens the window moves by (default: half the window)")
    a("--tasks", help="a .jsonl file of multiple-choice items")
    a("--records", help="a .jsonl file of Alpaca or chat records ('instructions-heldout': the bundled held-out set)")
    a("--max-seq-len", type=int, default=FineTuneConfig.max_seq_len, help="row length for --records")
    a(
        "--chat-template",
        help="jinja2 template file, chatml or plain, for --records (default: the model's own, else ChatML)",
    )
    a("--json", action="store_true", help="print one JSON object instead of lines of text")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    if not (args.text or args.tasks or args.records):
        raise TegakiError("give at least one of --text FILE, --tasks FILE.jsonl, --records FILE.jsonl")
    source = ModelSource(args.model)
    model, tokenizer = source.load(), source.tokenizer
    if args.adapter:
        load_peft(model, args.adapter)
        merge_lora(model)
    model.eval()
    results = {"model": args.model}
    if args.text:
        score = score_text(model, tokenizer, read_text(args.text), args.window, args.stride)
        results["text"] = {
            "file": args.text,
            "tokens": score.tokens,
            "bytes": score.bytes,
            "loss": score.loss,
            "perplexity": score.perplexity,
            "bits_per_byte": score.bits_per_byte,
        }
    if args.tasks:
        score = score_tasks(model, tokenizer, read_tasks(args.tasks))
        low, high = score.interval()
        results["tasks"] = {
            "file": args.tasks,
            "correct": score.correct,
            "total": score.total,
            "accuracy": score.accuracy,
            "ci95": [low, high],
        }
    if args.records:
        template = chat_template_for(args.model, model, tokenizer, args.chat_template)
        score = score_records(model, tokenizer, template, records_path(args.records), args.max_seq_len)
        if score.note:
            print(f"note: {score.note}", file=sys.stderr)
        results["records"] = {
            "file": args.records,
            "records": score.records,
            "response_tokens": score.tokens,
            "response_loss": score.loss,
        }
    print(json.dumps(results, ensure_ascii=False, indent=2) if args.json else _as_text(results))
    return 0


def _as_text(results: dict) -> str:
    lines = [f"model: {results['model']}"]
    if "text" in results:
        t = results["text"]
        lines.append(
            f"text {t['file']}: {t['tokens']:,} tokens, {t['bytes']:,} bytes; loss {t['loss']:.4f}, "
            f"perplexity {t['perplexity']:.2f}, {t['bits_per_byte']:.4f} bits per byte"
        )
    if "tasks" in results:
        t = results["tasks"]
        lines.append(
            f"tasks {t['file']}: accuracy {t['accuracy']:.1%} ({t['correct']}/{t['total']}), "
            f"95% interval {t['ci95'][0]:.1%} - {t['ci95'][1]:.1%}"
        )
    if "records" in results:
        r = results["records"]
        lines.append(
            f"records {r['file']}: response loss {r['response_loss']:.4f} over {r['response_tokens']:,} "
            f"response tokens of {r['records']} records"
        )
    return "\n".join(lines)
