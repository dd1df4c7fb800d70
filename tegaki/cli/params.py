"""`tegaki params NAME`: print where a model's parameters live; nothing is allocated."""

from __future__ import annotations

import argparse
import json

from tegaki.analysis.params import count_parameters, format_report, resolve_config
from tegaki.analysis.plot import plot_parameters


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "params",
        help="where a model's parameters are: embeddings, attention, MLP/experts, head; memory",
        description="Print the parameter breakdown of a preset, a run folder or a transformers folder. "
        "Nothing is allocated: the model is built on the meta device.",
    )
    p.add_argument("name", help="a preset (gpt2, tiny, gpt-oss-20b, ...), a run folder or a transformers folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ModelConfig field, e.g. --set qkv_bias=false (repeatable)",
    )
    p.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also draw where the parameters go")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args.name)
    if args.overrides:
        config = config.with_overrides(args.overrides)
    info = count_parameters(config)
    if args.json:
        print(json.dumps(dict(name=args.name, overrides=args.overrides, **info), indent=2))
    else:
        title = args.name + (" " + " ".join(f"--set {o}" for o in args.overrides) if args.overrides else "")
        print(format_report(title, config, info))
    if args.plot:
        out = plot_parameters(info, args.plot, title=args.name)
        if not args.json:
            print(f"\nwrote {out}")
    return 0
