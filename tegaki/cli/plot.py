"""`tegaki plot RUN_DIR...`: the loss curves of training runs or comparisons, as a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from tegaki.analysis.plot import find_runs, loss_curves, plot_losses
from tegaki.checkpoint import read_metrics


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="loss curves of a run or a comparison, as a PNG",
        description="Draw the train and validation loss curves of `tegaki train` or `tegaki compare` folders.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or comparison folder(s)")
    p.add_argument("--out", help="PNG file (default: RUN_DIR/loss.png)")
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average over N train points")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    runs = []
    for d in args.run_dirs:
        runs += [(label, loss_curves(read_metrics(path))) for label, path in find_runs(d)]
    out = args.out or str(Path(args.run_dirs[0]) / "loss.png")
    title = ", ".join(Path(d).name for d in args.run_dirs)
    path = plot_losses(runs, out, title=title, smooth=args.smooth)
    print(f"wrote {path}")
    for label, curves in runs:
        last_train = f"{curves['train'][-1][1]:.4f}" if curves["train"] else "-"
        last_val = f"{curves['val'][-1][1]:.4f}" if curves["val"] else "-"
        print(f"  {label}: last train loss {last_train}, last val loss {last_val}")
    return 0
