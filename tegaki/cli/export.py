"""`tegaki export`: any model tegaki can load -> a folder transformers can load; with --peft, a LoRA
run's adapter in PEFT's format instead."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tegaki.errors import TegakiError
from tegaki.finetune.peft import CONFIG_FILE, WEIGHTS_FILE, adapter_base, export_peft, load_lora_run
from tegaki.load import claim_export_folder, export_hf, from_pretrained, tokenizer_for


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as config.json + model.safetensors for transformers",
        description="Load a tegaki run folder, a transformers folder or a hub id and write it in "
        "transformers' format (with the run's tokenizer as tokenizer.json when it has one).",
    )
    p.add_argument("model", help="tegaki run folder, transformers folder, or hub id")
    p.add_argument("out", help="folder to write")
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
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = from_pretrained(args.model, dtype=dtype)
    tokenizer = None
    if (Path(args.model) / "run.json").exists():
        tokenizer = tokenizer_for(args.model)
    out = export_hf(model, args.out, tokenizer=tokenizer)
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
        export_hf(base.to(getattr(torch, args.dtype)) if args.dtype else base, base_dir, tokenizer_for(args.model))
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
