"""`tegaki compare`: identical conditions for every run, complete outputs, resumable."""

import json

import pytest

from tegaki.analysis.compare import BatchHashes, batch_digest, parse_entries
from tegaki.analysis.params import count_parameters
from tegaki.cli import main
from tegaki.config import ModelConfig

TINY = ["--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2", "--set", "vocab_size=300",
        "--max-steps", "4", "--batch-size", "4", "--block-size", "32", "--eval-every", "2", "--eval-batches", "2",
        "--decode-tokens", "8", "--sample-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tegaki.data import shakespeare_text

    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text(shakespeare_text()[:40_000])
    return path


@pytest.fixture(scope="module")
def compared(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    argv = ["compare", "--data", str(corpus), "--presets", "tiny,tiny-llama,tiny:causal=false", "--match-params",
            "--out", str(out), *TINY]
    assert main(argv) == 0
    return out, argv, json.loads((out / "results.json").read_text())


def test_outputs_are_complete(compared):
    out, _, results = compared
    runs = results["runs"]
    assert [r["label"] for r in runs] == ["tiny", "tiny-llama", "tiny:causal=false"]
    for r in runs:
        assert r["steps"] == 4 and r["tokens_trained"] == 4 * 4 * 32
        for key in ("final_train_loss", "final_val_loss", "final_val_bpb", "train_tokens_per_s", "peak_memory_bytes",
                    "decode_tokens_per_s_kv_cache", "decode_tokens_per_s_no_cache"):
            assert r[key] is not None and r[key] > 0, key
        assert isinstance(r["sample"], str)
        run_json = out / "runs" / r["label"].replace(":", "+") / "run.json"
        config = ModelConfig.from_dict(json.loads(run_json.read_text())["model_config"])
        assert r["parameters"] == count_parameters(config)["total"]
    report = (out / "report.md").read_text()
    for r in runs:
        assert f"| {r['label']} | {r['parameters']:,} |" in report
    from tegaki.analysis.plot import loss_curves
    from tegaki.checkpoint import read_metrics

    curves = loss_curves(read_metrics(out / "runs" / "tiny" / "metrics.jsonl"))  # the trainer's own log, as plotted
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
    per_step = [json.loads((out / "runs" / name / "batch_hashes.json").read_text()) for name in ("tiny", "tiny-llama")]
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
    stamp = {r["label"]: (out / "runs" / r["label"].replace(":", "+") / "metrics.jsonl").read_text()
             for r in before["runs"]}
    assert main(argv) == 0
    after = json.loads((out / "results.json").read_text())
    for b, a in zip(before["runs"], after["runs"]):
        keys = ("final_train_loss", "final_val_loss", "batch_hash")
        assert [a[k] for k in keys] == [b[k] for k in keys]
        assert (out / "runs" / a["label"].replace(":", "+") / "metrics.jsonl").read_text() == stamp[a["label"]]


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
