"""`tegaki compare`: identical conditions for every run, complete outputs, resumable."""

import json

import pytest

from tegaki.analysis.compare import BatchHashes, batch_digest, parse_entries
from tegaki.analysis.params import count_parameters
from tegaki.cli import main
from tegaki.config import ModelConfig

TINY = [
    "--set",
    "n_layer=1",
    "--set",
    "n_embd=32",
    "--set",
    "n_head=2",
    "--set",
    "vocab_size=300",
    "--max-steps",
    "4",
    "--batch-size",
    "4",
    "--block-size",
    "32",
    "--eval-every",
    "2",
    "--eval-batches",
    "2",
    "--decode-tokens",
    "8",
    "--sample-tokens",
    "8",
    "--no-progress",
]


def run_dir(out, label, seed=1337):
    """Where `tegaki compare` keeps one entry's run of one seed."""
    return out / "runs" / label.replace(":", "+") / f"seed{seed}"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tegaki.data import shakespeare_text

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare_text()[:40_000])
    return path


@pytest.fixture(scope="module")
def compared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    argv = [
        "compare",
        "--data",
        str(corpus),
        "--presets",
        "tiny,tiny-llama,tiny:causal=false",
        "--match-params",
        "--seeds",
        "1",
        "--out",
        str(out),
        *TINY,
    ]
    assert main(argv) == 0
    return out, argv, json.loads((out / "results.json").read_text())


def test_outputs_are_complete(compared):
    out, _, results = compared
    runs = results["runs"]
    assert [r["label"] for r in runs] == ["tiny", "tiny-llama", "tiny:causal=false"]
    for r in runs:
        assert r["steps"] == 4 and r["tokens_trained"] == 4 * 4 * 32
        for key in (
            "final_train_loss",
            "final_val_loss",
            "final_val_bpb",
            "train_tokens_per_s",
            "peak_memory_bytes",
            "decode_tokens_per_s_kv_cache",
            "decode_tokens_per_s_no_cache",
        ):
            assert r[key] is not None and r[key] > 0, key
        assert isinstance(r["sample"], str)
        run_json = run_dir(out, r["label"]) / "run.json"
        config = ModelConfig.from_dict(json.loads(run_json.read_text())["model_config"])
        assert r["parameters"] == count_parameters(config)["total"]
    report = (out / "report.md").read_text()
    for r in runs:
        assert f"| {r['label']} | {r['parameters']:,} |" in report
    from tegaki.analysis.plot import loss_curves
    from tegaki.checkpoint import read_metrics

    curves = loss_curves(read_metrics(run_dir(out, "tiny") / "metrics.jsonl"))  # the trainer's own log, as plotted
    assert [step for step, _ in curves["train"]] == [1, 2, 3, 4] and [step for step, _ in curves["val"]] == [2, 4]
    assert curves["val"][-1][1] == pytest.approx(runs[0]["final_val_loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "loss.png")).shape[:2] == (420, 700)


def test_every_run_saw_identical_batches(compared):
    out, _, results = compared
    hashes = {r["batch_hash"] for r in results["runs"]}
    assert len(hashes) == 1 and results["identical_batches"]
    assert all(r["batches_hashed"] == 4 for r in results["runs"])
    per_step = [json.loads((run_dir(out, name) / "batch_hashes.json").read_text()) for name in ("tiny", "tiny-llama")]
    assert per_step[0] == per_step[1] and len(set(h[0] for h in per_step[0].values())) == 4  # 4 different batches


def test_match_params_equalises_parameter_counts(compared):
    _, _, results = compared
    first, second = results["runs"][0]["parameters"], results["runs"][1]["parameters"]
    assert abs(first - second) <= 3 * 32 * 8  # one step of the MLP width (a multiple of 8) in a SwiGLU


def test_causal_false_is_scored_with_the_causal_mask_too(compared):
    _, _, results = compared
    bug = results["runs"][2]
    assert bug["final_val_loss_with_causal_mask"] > 0
    assert "final_val_loss_with_causal_mask" not in results["runs"][0]


def test_running_again_resumes_instead_of_retraining(compared, capsys):
    out, argv, before = compared
    stamp = {r["label"]: (run_dir(out, r["label"]) / "metrics.jsonl").read_text() for r in before["runs"]}
    assert main(argv) == 0
    after = json.loads((out / "results.json").read_text())
    for b, a in zip(before["runs"], after["runs"]):
        keys = ("final_train_loss", "final_val_loss", "batch_hash")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert (run_dir(out, a["label"]) / "metrics.jsonl").read_text() == stamp[a["label"]]


def test_batch_hash_tells_different_orders_apart(compared):
    from tegaki.data import BatchLoader, TokenWindows

    out, _, results = compared
    windows = TokenWindows(out / "data", "train", 32)

    def digest(seed):
        loader, hashes = BatchLoader(windows, 4, seed), BatchHashes()
        for step in range(4):
            hashes(step, 0, *loader.next_batch())  # what the run's on_batch hook is handed
        return batch_digest(hashes.hashes)

    assert digest(1337) == results["runs"][0]["batch_hash"]  # the hash is the batches', reproducibly
    assert digest(1338) != digest(1337)


def test_entries_and_errors(capsys, tmp_path):
    entries = parse_entries("tiny, tiny-llama:n_kv_head=1:causal=false")
    assert [(e.preset, e.overrides) for e in entries] == [("tiny", []), ("tiny-llama", ["n_kv_head=1", "causal=false"])]
    for argv, expected in [
        (["--presets", "tiny,nope"], "unknown preset 'nope'"),
        (["--presets", "tiny,tiny"], "the same entry twice"),
        (["--presets", "tiny", "--max-steps", "0"], "--max-steps must be at least 1"),
        (["--presets", "tiny", "--data", str(tmp_path / "missing.txt")], "missing.txt"),
    ]:
        code = main(["compare", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and expected in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def seeded(corpus, tmp_path_factory):
    """Two entries x two seeds, run twice into two folders: the same command on the same machine."""
    outs = [tmp_path_factory.mktemp("seeds"), tmp_path_factory.mktemp("seeds-again")]
    for out in outs:
        argv = [
            "compare",
            "--data",
            str(corpus),
            "--presets",
            "tiny,tiny-llama",
            "--seeds",
            "2",
            "--out",
            str(out),
            *TINY,
        ]
        assert main(argv) == 0
    return [(out, json.loads((out / "results.json").read_text())) for out in outs]


def test_every_entry_is_trained_once_per_seed_on_that_seeds_batches(seeded):
    out, results = seeded[0]
    assert results["seeds"] == [1337, 1338]
    assert [(r["label"], r["seed"]) for r in results["runs"]] == [  # seed by seed, the entries interleaved
        ("tiny", 1337),
        ("tiny-llama", 1337),
        ("tiny", 1338),
        ("tiny-llama", 1338),
    ]
    by_seed = {seed: {r["batch_hash"] for r in results["runs"] if r["seed"] == seed} for seed in (1337, 1338)}
    assert all(len(h) == 1 for h in by_seed.values()) and by_seed[1337] != by_seed[1338]
    assert results["identical_batches"]
    for entry in results["entries"]:
        val = entry["final_val_loss"]
        mine = [r["final_val_loss"] for r in results["runs"] if r["label"] == entry["label"]]
        assert val["values"] == mine and val["n"] == 2 and val["mean"] == pytest.approx(sum(mine) / 2)
        assert val["ci95"][0] < val["mean"] < val["ci95"][1]
        assert (run_dir(out, entry["label"], 1338) / "metrics.jsonl").exists()


def test_report_states_a_difference_only_where_intervals_separate(seeded):
    out, results = seeded[0]
    report = (out / "report.md").read_text()
    assert "mean ± standard deviation over the seeds" in report
    assert "tiny-llama vs tiny:" in report
    separate = "95% intervals separate" in report
    from tegaki.analysis.stats import Spread, separated

    a, b = (Spread(tuple(e["final_val_loss"]["values"])) for e in results["entries"])
    assert separate == separated(a, b)
    assert ("no measurable difference" in report) == (not separate)
    speed = results["speed"]
    assert ("## Speed (indicative)" in report) and (("Left out" in report) == (not speed["shown"]))


def test_the_same_command_gives_the_same_numbers(seeded):
    """Determinism on one machine: every loss and every batch of a second run equals the first's."""
    (_, first), (_, second) = seeded
    keys = ("label", "seed", "final_train_loss", "final_val_loss", "final_val_bpb", "batch_hash", "sample")
    assert [[r[k] for k in keys] for r in first["runs"]] == [[r[k] for k in keys] for r in second["runs"]]


def test_plot_of_a_comparison_groups_its_seeds_under_the_entry_labels(seeded, capsys):
    from tegaki.analysis.plot import find_runs

    out, _ = seeded[0]
    groups = find_runs(out)
    assert [(label, len(paths)) for label, paths in groups] == [("tiny", 2), ("tiny-llama", 2)]
    assert main(["plot", str(out), "--out", str(out / "again.png")]) == 0
    assert "over 2 seeds" in capsys.readouterr().out


def test_picture_titles_name_the_corpus_without_its_folder(tmp_path):
    from tegaki.analysis.compare import CompareSettings, plot_title

    s = CompareSettings(entries=parse_entries("tiny"), out=tmp_path, data="/home/someone/corpora/ja.txt", seeds=3)
    assert plot_title(s, 64) == "ja.txt: 200 steps x 16 x 64 tokens, 3 seeds"


def test_the_help_prints_a_percent_sign_once(capsys):
    """argparse formats help= strings with %, where a literal percent is %%; the reader sees one."""
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "95% intervals separate" in " ".join(out.split()) and "%%" not in out
