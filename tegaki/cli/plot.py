"""`tegaki plot RUN_DIR...`: the loss curves of training runs or comparisons, as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from tegaki.analysis.plot import find_runs, loss_curves, plot_losses
from tegaki.analysis.stats import format_spread, spread
from tegaki.checkpoint import read_metrics


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="loss curves of a run or a comparison, as a PNG",
        description="Draw the train and validation loss curves of `tegaki train` or `tegaki compare` folders.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or comparison folder(s)")
    p.add_argument("--out", help="PNG file (default: RUN_DIR/loss.png)")
    p.add_argument(
        "--smooth", type=int, default=1, metavar="N", help="moving average over N train points (default 1: none)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    groups = []
    for d in args.run_dirs:
        groups += [(label, [loss_curves(read_metrics(path)) for path in paths]) for label, paths in find_runs(d)]
    out = args.out or str(Path(args.run_dirs[0]) / "loss.png")
    title = ", ".join(Path(d).resolve().name for d in args.run_dirs)  # names only: no machine's folders
    path = plot_losses(groups, out, title=title, smooth=args.smooth)
    print(f"wrote {path}")
    for label, runs in groups:
        print(f"  {label}: last train loss {_last(runs, 'train')}, last val loss {_last(runs, 'val')}")
    return 0


def _last(runs: list[dict], split: str) -> str:
    """The last value of a curve, as mean ± std when the label groups several seeds."""
    values = [r[split][-1][1] for r in runs if r[split]]
    s = spread(values)
    return format_spread(s, ".4f") + (f" over {s.n} seeds" if s and s.n > 1 else "")
