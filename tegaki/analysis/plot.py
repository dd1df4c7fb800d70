"""Pictures: loss curves (`tegaki plot RUN_DIR`, and DIR/loss.png after training), where the parameters
go (`tegaki params --plot`) and attention heatmaps (`tegaki attention`).

matplotlib draws off-screen (the Agg backend), so this works on a server with no display. Token
labels may be Japanese: matplotlib's own font (DejaVu Sans) has no kanji or kana, so a CJK font is
added behind it -- the IPAex Gothic that the `matplotlib-fontja` package ships (a dependency of
tegaki), or one installed on the system (Noto Sans CJK, ...). Should none be there, characters no
font can draw are written as `\\u3042`-style escapes rather than empty boxes.

One picture per kind, shared by every command: `plot_losses` draws `tegaki plot` and the pictures
of `tegaki train` and `tegaki compare` alike, so a run has the same colour and name in each.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from tegaki.checkpoint import METRICS_FILE, read_metrics
from tegaki.errors import TegakiError
from tegaki.files import atomic_write

# Fonts that draw Japanese (and Chinese/Korean) glyphs, in order of preference.
CJK_FONTS = [
    "Noto Sans CJK JP",
    "Noto Sans JP",
    "Source Han Sans JP",
    "IPAexGothic",
    "IPAGothic",
    "TakaoGothic",
    "VL Gothic",
    "Hiragino Sans",
    "Yu Gothic",
    "MS Gothic",
    "Meiryo",
    "WenQuanYi Zen Hei",
    "Droid Sans Fallback",
    "Unifont",
]


def pyplot():
    """matplotlib.pyplot on the Agg backend, with a CJK font in the fallback list if one exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["font.family"] = ["DejaVu Sans", *[f for f in _installed_cjk_fonts()]]
    return plt


@lru_cache(maxsize=1)
def _installed_cjk_fonts() -> tuple[str, ...]:
    from matplotlib import font_manager

    _register_packaged_cjk_font(font_manager)
    names = {f.name for f in font_manager.fontManager.ttflist}
    return tuple(f for f in CJK_FONTS if f in names)


# Python packages that ship a Japanese font file (both bring IPAexGothic), found without importing
# them: importing either would change matplotlib's settings for everyone in the process.
FONT_PACKAGES = ("matplotlib_fontja", "japanize_matplotlib")


def _register_packaged_cjk_font(font_manager) -> None:
    import importlib.util

    for package in FONT_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for folder in spec.submodule_search_locations:
            for font in sorted(Path(folder).glob("fonts/*.ttf")):
                try:
                    font_manager.fontManager.addfont(str(font))
                except (OSError, RuntimeError):
                    continue


@lru_cache(maxsize=1)
def _drawable_codepoints() -> frozenset[int]:
    """Every character the fonts in use can draw."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    wanted = {"DejaVu Sans", *_installed_cjk_fonts()}
    points: set[int] = set()
    for entry in font_manager.fontManager.ttflist:
        if entry.name in wanted:
            try:
                points.update(FT2Font(entry.fname).get_charmap())
            except (OSError, RuntimeError):  # an unreadable font file: skip it
                continue
    return frozenset(points)


def label_text(token: str) -> str:
    """A token as a readable axis label: whitespace made visible, undrawable characters escaped."""
    if token.startswith("<") and token.endswith(">") and all(c in "0123456789abcdef " for c in token[1:-1]):
        return token  # raw bytes of a piece of a character, as the trace shows them
    drawable = _drawable_codepoints()
    out = []
    for ch in token:
        if ch == " ":
            out.append("␣" if ord("␣") in drawable else "_")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 32 or ord(ch) not in drawable:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
        else:
            out.append(ch)
    return "".join(out)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise TegakiError(f"{path}: pictures are written as PNG; give a file name ending in .png")
    try:  # written beside its place and renamed over it: a kill never leaves half a picture
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=fig.dpi, format="png"))
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------
# Where the parameters go
# -------------------------------------------------------------------------------------------------

GROUP_COLOURS = {
    "embedding": "#4C72B0",
    "attention": "#DD8452",
    "norm": "#937860",
    "mlp": "#55A868",
    "router": "#8172B3",
    "experts": "#55A868",
    "head": "#C44E52",
    "other": "#8C8C8C",
}


def plot_parameters(info: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """One horizontal bar per part of `count_parameters(config)`, longest first."""
    plt = pyplot()
    parts = [p for p in info["parts"] if p["count"] > 0]
    parts.sort(key=lambda p: p["count"])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(parts) + 1.4), dpi=100)
    labels = [" ".join(p["label"].split()) for p in parts]
    ax.barh(labels, [p["count"] for p in parts], color=[GROUP_COLOURS.get(p["group"], "#8C8C8C") for p in parts])
    for i, p in enumerate(parts):
        ax.text(p["count"], i, f" {p['count']:,} ({100 * p['share']:.1f}%)", va="center", fontsize=8)
    ax.set_xlim(0, max(p["count"] for p in parts) * 1.45)
    ax.set_xlabel("parameters")
    headline = f"{title}: {info['total']:,} parameters"
    if info.get("active") is not None:
        headline += f", {info['active']:,} active per token"
    if info.get("tied_embeddings"):
        headline += " (LM head tied to wte)"
    ax.set_title(headline, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    return _save(fig, path)


# -------------------------------------------------------------------------------------------------
# Loss curves
# -------------------------------------------------------------------------------------------------


def loss_curves(records: list[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """Records of a metrics.jsonl (`tegaki.checkpoint.read_metrics`) -> {"train": [(step, loss)],
    "val": [(step, loss)]}.

    A record with `val_loss` is a validation point; a record with `loss` (and no split other than
    "train") is a training point.
    """
    curves: dict[str, list[tuple[float, float]]] = {"train": [], "val": []}
    for rec in records:
        if "step" not in rec:
            continue
        split = rec.get("split", "train")
        if rec.get("val_loss") is not None:
            curves["val"].append((rec["step"], float(rec["val_loss"])))
        if rec.get("loss") is not None:
            curve = "val" if split in ("val", "valid", "validation") else "train"
            curves[curve].append((rec["step"], float(rec["loss"])))
    for key in curves:  # a resumed run may repeat steps: keep the last value of each
        curves[key] = sorted(dict(curves[key]).items())
    return curves


def find_runs(run_dir: str | Path) -> list[tuple[str, list[Path]]]:
    """(label, its metrics.jsonl files) for a run folder, or for each entry of a comparison folder.

    A `tegaki compare` folder is read through its results.json, so the labels are the entries as
    given to --presets and each groups its seeds: the names and order of the comparison's own picture.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise TegakiError(f"{root}: no such folder")
    if (root / METRICS_FILE).exists():
        return [(root.name, [root / METRICS_FILE])]
    results = root / "results.json"
    if results.exists():
        entries = json.loads(results.read_text()).get("entries")
        if entries:
            return [(e["label"], [root / f / METRICS_FILE for f in e["folders"]]) for e in entries]
    found = sorted(root.glob(f"*/{METRICS_FILE}")) + sorted(root.glob(f"runs/*/{METRICS_FILE}"))
    groups = [(p.parent.name, [p]) for p in found]
    seeded: dict[str, list[Path]] = {}  # a comparison still running (no results.json yet): runs/NAME/seedS
    for p in sorted(root.glob(f"runs/*/seed*/{METRICS_FILE}")):
        seeded.setdefault(p.parent.parent.name, []).append(p)
    groups += list(seeded.items())
    if not groups:
        raise TegakiError(
            f"{root}: no metrics.jsonl in it or in its sub-folders; is it a `tegaki train` or `tegaki compare` output?"
        )
    return groups


def preset_colours(count: int) -> list[str]:
    """One colour per entry, in order: the same entry gets the same colour in every picture."""
    plt = pyplot()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]


def _mean_and_range(curves: list[list[tuple[float, float]]]):
    """Seeds' curves -> (steps, mean, low, high) over the steps every seed has."""
    common = sorted(set.intersection(*(set(dict(c)) for c in curves)))
    values = [[dict(c)[step] for c in curves] for step in common]
    return common, [sum(v) / len(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_losses(
    groups: list[tuple[str, list[dict[str, list]]]], path: str | Path, title: str = "", smooth: int = 1
) -> Path:
    """Train (solid) and validation (dashed, dots) loss, one colour per group, named once in the legend.

    A group is one label with the curves of one or more runs (`loss_curves`): the seeds of one
    entry of a comparison. With several, the line is their mean and the shaded band their range
    (lowest to highest seed), so what the seed alone moves is in the picture."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    styles = {"train": {"lw": 1.2}, "val": {"lw": 1.2, "ls": "--", "marker": "o", "ms": 3}}
    drew = False
    for colour, (label, runs) in zip(preset_colours(len(groups)), groups):
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        named = False  # the legend names each group once, by its colour
        for split, style in styles.items():
            curves = [r[split] for r in runs if r[split]]
            if not curves:
                continue
            steps, mean, low, high = _mean_and_range(curves)
            if split == "train":
                mean, low, high = (_moving_average(v, smooth) for v in (mean, low, high))
            ax.plot(steps, mean, color=colour, label=None if named else label + seeds, **style)
            named = True
            if len(curves) > 1:
                ax.fill_between(steps, low, high, color=colour, alpha=0.18, lw=0)
            drew = True
    for split, style in styles.items():  # and the line style once: solid train, dashed validation
        ax.plot([], [], color="#555555", label="train" if split == "train" else "validation", **style)
    if not drew:
        plt.close(fig)
        raise TegakiError("no loss values to plot (the metrics files have no `loss` or `val_loss` lines yet)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.set_title(title or "loss", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_run_losses(run_dir: str | Path) -> Path | None:
    """DIR/loss.png from DIR/metrics.jsonl, drawn when a run ends (`tegaki train` and `tegaki compare`
    hand it to the training loop): the picture of `tegaki plot DIR`, averaged over ~50 points.
    None when there is no training loss yet, or no matplotlib (a run is fine without its picture)."""
    run_dir = Path(run_dir)
    curves = loss_curves(read_metrics(run_dir / METRICS_FILE))
    if not curves["train"]:
        return None
    smooth = max(1, len(curves["train"]) // 50)
    try:
        return plot_losses([(run_dir.name, [curves])], run_dir / "loss.png", title=run_dir.name, smooth=smooth)
    except ImportError:
        return None


def _moving_average(values, width: int) -> list[float]:
    if width <= 1:
        return list(values)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= width:
            acc -= values[i - width]
        out.append(acc / min(i + 1, width))
    return out


# -------------------------------------------------------------------------------------------------
# Attention heatmaps
# -------------------------------------------------------------------------------------------------


def plot_attention_heads(att, tokens: list[str], path: str | Path, title: str = "") -> Path:
    """att (H, T, T) as H heatmaps: row = query token, column = key token it attends to."""
    return _save(attention_figure(att, tokens, title), path)


def attention_figure(att, tokens: list[str], title: str = ""):
    """The figure `plot_attention_heads` writes: one heatmap per head, one colour bar for all."""
    plt = pyplot()
    H, T = att.shape[0], att.shape[-1]
    cols = min(H, 4)
    rows = math.ceil(H / cols)
    cell = max(2.4, min(4.5, 0.28 * T + 1.2))
    # constrained layout keeps the figure title, the head titles, the tick labels and the colour bar
    # apart however many heads there are (tight_layout let a 12-head title overlap the top row)
    fig, axes = plt.subplots(
        rows, cols, figsize=(cell * cols + 1.0, cell * rows + 0.8), dpi=80, squeeze=False, layout="constrained"
    )
    labels = [label_text(t) for t in tokens]
    show_labels = T <= 40
    image = None
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        image = ax.imshow(att[h], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_title(f"head {h}", fontsize=9)
        if show_labels:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(T), labels, fontsize=7)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")  # one scale, 0 to 1, for every head
    fig.suptitle(title + "  (row: query, column: key)", fontsize=10)
    return fig
