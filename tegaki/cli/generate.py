"""`tegaki generate`: sample text from a run folder, a transformers folder or a hub id."""

from __future__ import annotations

import re
import sys
import time

import torch

from tegaki.chat_template import end_ids as chat_end_ids
from tegaki.chat_template import find_chat_template
from tegaki.cli.options import add_model_arguments
from tegaki.decoding import describe, prepare_for_decoding
from tegaki.device import DTYPES, check_fits, cpu_summary, pick_device, pick_dtype
from tegaki.errors import TegakiError
from tegaki.generate import StopText, compiled_decode_step, generate_tokens
from tegaki.load import ModelSource
from tegaki.quant import quantize_model, quantized_kernels
from tegaki.sampling import SamplingSettings
from tegaki.train.settings import check_seed

CLI_TEMPERATURE = 0.8
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """A shell passes '\\n' as a backslash and an n; a prompt or a stop string means the newline."""
    return re.sub(r"\\([ntr\\])", lambda m: ESCAPES[m.group(1)], text)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="sample text from a model",
        description="Sample text from a tegaki run folder, a transformers folder, or a hub id.",
    )
    p.add_argument(
        "prompt",
        type=unescape,
        help="the text to continue; \\n, \\t and \\\\ stand for a newline, a tab and a backslash (as in --stop)",
    )
    add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to add after the prompt (default 200)")
    add_sampling_arguments(p)
    p.add_argument("--seed", type=int, default=None, help="for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1, help="how many continuations to print (default 1)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        type=unescape,
        help="stop at this text (repeatable); \\n, \\t and \\\\ stand for a newline, a tab and a "
        "backslash, so --stop '\\n\\n' stops at a blank line",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step, captured as a CUDA graph on a GPU; on a CPU inductor writes its "
        "own loops over the weights. Compiling takes tens of seconds (less once inductor's cache has it), "
        "so it pays back over long outputs only; whether it is faster depends on the CPU "
        "(benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="say on stderr how the linear layers multiply (the path measured fastest on this CPU for each "
        "shape, and the times that chose it)",
    )
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--no-cache", action="store_true", help="recompute every token each step (slow; for checking)")
    p.set_defaults(func=run_generate)


def add_sampling_arguments(p) -> None:
    """How tokens are drawn (SamplingSettings' fields): shared with `tegaki chat`."""
    # A command samples a little cooler than the library's plain softmax (temperature 1.0).
    p.add_argument("--temperature", type=float, default=CLI_TEMPERATURE, help=f"0 = greedy (default {CLI_TEMPERATURE})")
    defaults = SamplingSettings()
    p.add_argument(
        "--top-k", type=int, default=defaults.top_k, help="sample among the k most likely tokens only (default: all)"
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=defaults.top_p,
        help="nucleus sampling: the smallest set of tokens whose probability reaches p, in (0, 1] (default: off)",
    )
    p.add_argument(
        "--min-p",
        type=float,
        default=defaults.min_p,
        help="drop tokens less likely than min_p x the top token's probability (default: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=defaults.repetition_penalty,
        help="make tokens already seen less likely: positive logits divided by it, negative multiplied "
        f"(> 1 repeats less; default {defaults.repetition_penalty} = off)",
    )
    p.add_argument(
        "--presence-penalty",
        type=float,
        default=defaults.presence_penalty,
        help=f"subtract this from the logits of tokens already seen (default {defaults.presence_penalty} = off)",
    )


def sampling_from(args) -> SamplingSettings:
    """The flags of `add_sampling_arguments` as settings, checked (before any slow load)."""
    return SamplingSettings.from_keywords(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty,
    )


def load_for_generation(model: str | ModelSource, dtype: torch.dtype, device: torch.device | str = "cpu"):
    """(model, tokenizer) for --model: a tegaki run folder, a transformers folder, or a hub id."""
    source = model if isinstance(model, ModelSource) else ModelSource(model)
    return source.load(device, dtype).eval(), source.tokenizer


def end_ids(model: str | ModelSource, tok) -> list[int]:
    """The tokens that end the text (chat_template.end_ids): end of text, and for a chat model whose
    files hold a chat template (or a tokenizer with ChatML's markers) its end of turn -- a fine-tuned
    model ends its reply with <|im_end|>, and past it comes text it never learned to write. The ends
    `tegaki serve` and `tegaki chat` stop at."""
    source = model if isinstance(model, ModelSource) else ModelSource(model)
    folders = source.template_folders()
    template = find_chat_template(folders, tok) if folders else None
    return sorted(chat_end_ids(tok, template))


def run_generate(args) -> int:
    settings = check_flags(args)  # before the (slow) load
    torch.manual_seed(args.seed if args.seed is not None else int(time.time()))
    device = pick_device(args.device)
    dtype = DTYPES[pick_dtype(args.dtype, device)]
    source = ModelSource(args.model)
    model, tok = load_for_generation(source, dtype, device)
    if args.quantize:
        quantize_model(model, args.quantize)
    started = time.perf_counter()
    prepare_for_decoding(model)  # this model only decodes: each linear layer on its fastest path here
    if args.verbose:
        report_paths(model, time.perf_counter() - started)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        raise TegakiError("the prompt encodes to no tokens")
    max_new = new_token_budget(model.config, len(prompt_ids), args.max_new_tokens)
    check_cache_fits(model.config, len(prompt_ids) + max_new, dtype, device)
    stop_tokens = end_ids(source, tok)
    generator = torch.Generator(device).manual_seed(args.seed) if args.seed is not None else None
    input_ids = torch.tensor([prompt_ids], device=device)
    step = compiled_decode_step(model) if args.compile else None
    if args.compile:
        print("(compiling the decode step on its first call: this takes a while)", file=sys.stderr, flush=True)
    for n in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {n + 1} ---")
        _print_one(model, tok, input_ids, max_new, settings, stop_tokens, args, generator, step)
    return 0


def check_flags(args) -> SamplingSettings:
    """Refuse a flag that cannot work; the sampling settings."""
    if args.num_samples < 1:
        raise TegakiError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise TegakiError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    settings = sampling_from(args)
    if not args.prompt:
        raise TegakiError("the prompt is empty: give some text to continue")
    if args.seed is not None:
        check_seed(args.seed)
    return settings


def new_token_budget(cfg, prompt_tokens: int, asked: int) -> int:
    """How many tokens to add after the prompt: --max-new-tokens, lowered to the end of a learned
    position table (with a note); rotary positions go on past the context, with a warning."""
    if prompt_tokens > cfg.block_size:
        raise TegakiError(
            f"the prompt is {prompt_tokens} tokens, longer than the model's context of {cfg.block_size}; shorten it"
        )
    max_new = asked
    if cfg.pos_embedding == "learned" and prompt_tokens + max_new > cfg.block_size:
        max_new = cfg.block_size - prompt_tokens
        print(f"(max-new-tokens lowered to {max_new}: the model's context is {cfg.block_size} tokens)", file=sys.stderr)
    if max_new < 1:
        raise TegakiError(f"the prompt fills the model's whole context ({cfg.block_size} tokens); shorten it")
    total = prompt_tokens + max_new
    if total > cfg.block_size:  # rotary positions go on, but the model never saw text this long
        print(
            f"(note: {total:,} tokens run past the model's context of {cfg.block_size}; the text may degrade)",
            file=sys.stderr,
        )
    return max_new


def report_paths(model, seconds: float) -> None:
    """--verbose: what the decoding layer chose for each shape, and what quantized layers run."""
    lines = describe(model)
    print(f"decoding paths ({cpu_summary()}; chosen in {seconds:.2f} s):", file=sys.stderr)
    for line in lines or ["no linear layer the CPU's decoding paths serve (another device or dtype)"]:
        print(f"  {line}", file=sys.stderr)
    for line in quantized_kernels(model):
        print(f"  {line}", file=sys.stderr)


def check_cache_fits(cfg, total: int, dtype: torch.dtype, device: torch.device) -> None:
    """The KV cache holds a key and a value vector per layer, key/value head and position (a
    sliding layer only its window): refuse, with the figure, a length it could not hold."""
    slots = sum(min(total, cfg.window(layer) or total) for layer in range(cfg.n_layer))
    check_fits(
        2 * cfg.n_kv_head * cfg.head_dim * slots,
        dtype.itemsize,
        device,
        f"a KV cache for {total:,} tokens",
        items="numbers",
    )


def _print_one(model, tok, input_ids, max_new, settings, stop_tokens, args, generator, step) -> None:
    """Generate one sample; print it (streamed piece by piece with --stream), cut at a --stop."""
    tokens = generate_tokens(
        model, input_ids, max_new, settings, use_cache=not args.no_cache, generator=generator, decode_step=step
    )

    def ids():
        for token in tokens:
            t = int(token[0])
            if t in stop_tokens:
                return
            if t < tok.vocab_size:  # past it: a padding row of the LM head (vocab padded to 64), no text
                yield t

    out = sys.stdout
    out.write(args.prompt)
    if args.stream:
        out.flush()
    text = StopText(args.stop)
    for piece in tok.stream_decode(ids()):
        ready = text.add(piece)
        if args.stream and ready:
            out.write(ready)
            out.flush()
        if text.stopped:
            break
    rest = text.add("", final=True)
    out.write((rest if args.stream else text.text) + "\n")
    out.flush()
