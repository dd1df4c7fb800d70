"""Pictures are real PNG files of the expected size, drawn from the right numbers."""

import json

import pytest

from tegaki.analysis.plot import find_runs, label_text, loss_curves, plot_losses
from tegaki.checkpoint import read_metrics
from tegaki.cli import main
from tegaki.errors import TegakiError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def read_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(str(path))  # (height, width, 4)


def write_metrics(folder, losses, val_every=2):
    folder.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, start=1):
        lines.append({"step": step, "loss": loss, "lr": 1e-3})
        if step % val_every == 0:
            lines.append({"step": step, "val_loss": loss + 0.1})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken")


def test_params_plot(tmp_path, capsys):
    out = tmp_path / "params.png"
    assert main(["params", "tiny-gpt-oss", "--plot", str(out)]) == 0
    image = read_png(out)
    assert image.shape[1] == 800 and image.shape[0] > 300  # 8 inches at 100 dpi; one bar per part


def test_read_metrics_splits_train_and_validation(tmp_path):
    write_metrics(tmp_path / "run", [4.0, 3.5, 3.0, 2.8])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")  # the broken last line is skipped
    assert len(records) == 6
    curves = loss_curves(records)
    assert curves["train"] == [(1, 4.0), (2, 3.5), (3, 3.0), (4, 2.8)]
    assert curves["val"] == [(2, 3.6), (4, 2.9)]


def test_loss_plot_of_a_comparison_folder(tmp_path, capsys):
    write_metrics(tmp_path / "cmp" / "runs" / "tiny", [4.0, 3.5, 3.0, 2.8])
    write_metrics(tmp_path / "cmp" / "runs" / "tiny-llama", [4.1, 3.4, 2.9, 2.6])
    assert [label for label, _ in find_runs(tmp_path / "cmp")] == ["tiny", "tiny-llama"]
    assert main(["plot", str(tmp_path / "cmp")]) == 0
    out, _ = capsys.readouterr()
    assert "tiny-llama: last train loss 2.6000, last val loss 2.7000" in out
    assert read_png(tmp_path / "cmp" / "loss.png").shape[:2] == (420, 700)


def test_loss_plot_of_one_run_with_out(tmp_path):
    write_metrics(tmp_path / "run", [5.0, 4.0, 3.0])
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "x.png"), "--smooth", "2"]) == 0
    read_png(tmp_path / "x.png")


def test_attention_plot(tmp_path, capsys):
    out = tmp_path / "att.png"
    code = main(
        [
            "attention",
            "--preset",
            "tiny",
            "--set",
            "n_layer=1",
            "--set",
            "n_head=2",
            "--set",
            "n_embd=32",
            "Hello, I am",
            "--layer",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    image = read_png(out)
    assert image.shape[1] > image.shape[0] > 100  # two heads side by side


def test_labels_never_draw_empty_boxes():
    assert label_text("a b") in ("a␣b", "a_b")
    assert label_text("\ue000") == "\\ue000"  # a private-use character no font draws
    assert label_text("<e3 81>") == "<e3 81>"  # raw bytes of half a character stay as they are


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "nolines").mkdir()
    (tmp_path / "nolines" / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path / "nolines")]) == 2
    assert "no loss values" in capsys.readouterr().err
    with pytest.raises(TegakiError, match="PNG"):
        plot_losses([("a", [{"train": [(1, 1.0)], "val": []}])], tmp_path / "a.svg")


def test_japanese_labels_are_drawn_with_the_packaged_font():
    """matplotlib-fontja (a dependency) brings IPAexGothic: kana and kanji are drawn, not escaped."""
    pytest.importorskip("matplotlib_fontja")
    assert label_text("日本語の文字") == "日本語の文字"


def test_many_heads_keep_their_titles_apart_and_share_a_colour_bar():
    """12 heads: the figure title sits above every head's title, and one colour bar says 0 to 1."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.text import Text

    from tegaki.analysis.plot import attention_figure

    T = 14  # with tight_layout, 12 heads of 14 tokens put the figure title over the top row's titles
    att = np.tril(np.ones((12, T, T))) / np.arange(1, T + 1)[:, None]  # (H, T, T), rows sum to 1
    fig = attention_figure(att, [f"tok{i}" for i in range(T)], title="twelve heads")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = {t: t.get_window_extent(renderer) for t in fig.findobj(Text) if t.get_text()}
    heads = [box for t, box in texts.items() if t.get_text().startswith("head ")]
    (title,) = [box for t, box in texts.items() if t.get_text().startswith("twelve heads")]
    assert len(heads) == 12
    assert all(title.y0 >= box.y1 for box in heads)  # pixels grow upwards: the title above them all
    bars = [ax for ax in fig.axes if ax.get_ylabel() == "attention weight"]
    assert len(bars) == 1 and tuple(bars[0].get_ylim()) == (0.0, 1.0)
    plt.close(fig)


def test_a_comparison_without_results_groups_its_seed_folders(tmp_path):
    for name in ("tiny", "tiny-llama"):
        for seed, losses in ((1337, [4.0, 3.5]), (1338, [4.2, 3.3])):
            write_metrics(tmp_path / "cmp" / "runs" / name / f"seed{seed}", losses)
    groups = find_runs(tmp_path / "cmp")
    assert [(label, [p.parent.name for p in paths]) for label, paths in groups] == [
        ("tiny", ["seed1337", "seed1338"]),
        ("tiny-llama", ["seed1337", "seed1338"]),
    ]
