"""`tegaki export`: any model tegaki can load -> a folder transformers can load; with --peft, a LoRA
run's adapter in PEFT's format instead; to OUT.gguf, one GGUF file for llama.cpp (`tegaki.gguf_export`);
with --web, a static folder that runs the model in a browser (`tegaki.web`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tegaki.errors import TegakiError
from tegaki.finetune.peft import CONFIG_FILE, WEIGHTS_FILE, adapter_base, export_peft, load_lora_run
from tegaki.load import ModelSource, claim_export_folder, export_hf


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as config.json + model.safetensors for transformers",
        description="Load a tegaki run folder, a transformers folder or a hub id and write it in "
        "transformers' format (with the run's tokenizer as tokenizer.json when it has one).",
    )
    p.add_argument("model", help="tegaki run folder, transformers folder, or hub id")
    p.add_argument("out", help="folder to write, or a file ending in .gguf (one GGUF file for llama.cpp)")
    p.add_argument(
        "--outtype",
        choices=["f32", "f16", "bf16", "q8_0"],
        default=None,
        help="the weights' type in a .gguf file (default f16)",
    )
    p.add_argument(
        "--web",
        action="store_true",
        help="write a static folder (index.html, scripts, weights, tokenizer) that runs the model in a "
        "browser, served by any static file server",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="convert the weights first (default: as loaded)",
    )
    p.add_argument(
        "--peft",
        action="store_true",
        help="write a LoRA run's adapter (adapter_config.json + adapter_model.safetensors) for peft, "
        "not the merged model; says which base to load it on",
    )
    p.set_defaults(func=_export_command)


def _export_command(args) -> int:
    if args.peft:
        return _export_peft(args)
    if args.web:
        return _export_web(args)
    if args.out.endswith(".gguf"):
        return _export_gguf(args)
    if args.outtype:
        raise TegakiError(f"--outtype is the weights' type of a .gguf file; {args.out} does not end in .gguf")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    source = ModelSource(args.model)
    out = export_hf(source.load(dtype=dtype), args.out, tokenizer=source.tokenizer if source.is_run else None)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}", file=sys.stderr)
    return 0


def _export_peft(args) -> int:
    """The adapter of a LoRA run, and where its base is. A run that added chat tokens has a base of
    its own (the base it started from has no rows for them): it is written beside, in OUT/base."""
    if not (Path(args.model) / "run.json").exists():
        raise TegakiError(
            f"--peft writes the adapter of a LoRA fine-tune's run folder; {args.model} is not a run folder"
        )
    model, settings, base_name = load_lora_run(args.model)
    out = Path(args.out)
    claim_export_folder(out, "adapter")  # before base/ is written into it
    if settings.new_tokens:
        base_dir = out / "base"
        base = adapter_base(model)
        base = base.to(getattr(torch, args.dtype)) if args.dtype else base
        export_hf(base, base_dir, ModelSource(args.model).tokenizer)
        base_name = str(base_dir.resolve())
        where = (
            f"{base_dir}: the base with rows for the chat tokens this run added "
            f"({', '.join(map(str, settings.new_tokens))}), learned"
        )
    elif (Path(base_name) / "run.json").exists():
        where = f"{base_name} in transformers' format: `tegaki export {base_name} BASE_DIR` writes it"
    else:
        where = base_name
    export_peft(model, out, settings, base_name=base_name)
    print(f"wrote {out / CONFIG_FILE} and {out / WEIGHTS_FILE}; load it with peft onto {where}", file=sys.stderr)
    return 0


def _export_gguf(args) -> int:
    """One GGUF file for llama.cpp: the weights in --outtype, the tokenizer, the chat template."""
    from tegaki.gguf_export import export_gguf

    if args.dtype:
        raise TegakiError("--dtype is for a transformers folder; a .gguf file takes --outtype f32|f16|bf16|q8_0")
    out = export_gguf(args.model, args.out, outtype=args.outtype or "f16")
    size = out.stat().st_size / 2**20
    print(f"wrote {out} ({size:,.1f} MiB); run it with llama.cpp: llama-cli -m {out}", file=sys.stderr)
    return 0


def _export_web(args) -> int:
    """A static folder that runs the model in a browser (weights in float16 unless --dtype says)."""
    from tegaki.web import export_web

    out = export_web(args.model, args.out, dtype=args.dtype or "float16")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(
        f"wrote {out} ({size:,.1f} MiB); open it through any static file server, e.g. "
        f"python -m http.server -d {out}, then http://localhost:8000",
        file=sys.stderr,
    )
    return 0
