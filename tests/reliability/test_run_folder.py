"""Nothing in a run folder is lost: --fresh, the tokenizer folder, run.json, metrics, the lock,
samples and plots (issue 12, "Data lost" 1-7)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import cli, snapshot, train_args

from tegaki.checkpoint import clear_run_folder, load_run_tokenizer, read_metrics
from tegaki.errors import TegakiError
from tegaki.files import FolderLock

REPO = Path(__file__).resolve().parents[2]


def steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") is None]


# --- 1. --fresh deletes only tegaki's own files, in a run folder --------------------------------------


def test_fresh_on_a_folder_that_is_not_a_run_deletes_nothing(corpus, tmp_path):
    project = tmp_path / "proj"
    (project / "data").mkdir(parents=True)
    shutil.copy(corpus, project / "data" / "corpus.txt")
    (project / "tokenizer").mkdir()
    (project / "metrics.jsonl").write_text('{"step": 1}\n')
    before = snapshot(project)
    rc, err = cli(train_args(project, project / "data" / "corpus.txt", 2, "--fresh"))
    assert rc == 2 and "has no run.json or made_by.json; nothing was deleted" in err and "Traceback" not in err, err
    assert snapshot(project) == before


def test_fresh_refuses_a_run_folder_holding_files_tegaki_did_not_write(run_copy, corpus):
    for stranger in (run_copy / "notes.txt", run_copy / "data" / "corpus.txt"):
        stranger.write_text("mine")
        before = snapshot(run_copy)
        rc, err = cli(train_args(run_copy, corpus, 2, "--fresh"))
        assert rc == 2 and "files tegaki did not write" in err and stranger.name in err, err
        assert snapshot(run_copy) == before
        stranger.unlink()


def test_fresh_never_deletes_the_data_it_starts_from(run_copy):
    before = snapshot(run_copy)
    rc, err = cli(train_args(run_copy, run_copy / "data", 2, "--fresh"))  # the run's own shards as --data
    assert rc == 2 and "--data" in err and "lies inside" in err, err
    assert snapshot(run_copy) == before


def test_fresh_starts_a_run_folder_over(run_copy, corpus):
    rc, err = cli(train_args(run_copy, corpus, 2, "--fresh"))
    assert rc == 0 and "resuming" not in err, err
    assert steps_logged(run_copy) == [1, 2] and sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == [
        "step_000002"
    ]


def test_clear_run_folder_keeps_its_lock(run_copy):
    with FolderLock(run_copy):
        clear_run_folder(run_copy, {})
        assert [p.name for p in run_copy.iterdir()] == [".lock"]


# --- 2. a TOML setting of the wrong type is refused before anything happens ------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ('fresh = "no"', "fresh must be true or false"),
        ('max_steps = "2"', "max_steps must be a whole number"),
        ('lr = "fast"', "lr must be a finite number"),
        ("batch_size = 2.5", "batch_size must be a whole number"),
        ("device = 5", "device must be text"),
        ('[model]\ncausal = "no"', "[model] causal must be true or false"),
    ],
)
def test_toml_settings_of_the_wrong_type_lose_nothing(run_copy, corpus, tmp_path, line, message):
    config = tmp_path / "train.toml"
    config.write_text(line + "\n")
    before = snapshot(run_copy)
    rc, err = cli([*train_args(run_copy, corpus, 6), "--config", str(config)])
    assert rc == 2 and message in err and "train.toml" in err and "Traceback" not in err, err
    assert snapshot(run_copy) == before
    fresh_out = tmp_path / "new"
    assert cli([*train_args(fresh_out, corpus, 6), "--config", str(config)])[0] == 2
    assert not fresh_out.exists()  # no half-made run folder either


# --- 3. a tokenizer folder is replaced only when it is the run's own ------------------------------


def test_tokenizer_folder_not_made_by_the_run_is_kept(shards, corpus, tmp_path):
    out = tmp_path / "run"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "precious.json").write_text("{}")
    rc, err = cli(train_args(out, corpus, 2, "--tokenizer", str(shards.parent / "tok")))
    assert rc == 2 and "tegaki did not write (tokenizer)" in err and "Traceback" not in err, err
    assert (out / "tokenizer" / "precious.json").read_text() == "{}"


def test_the_same_tokenizer_again_resumes(shards, corpus, tmp_path):
    out = tmp_path / "run"
    args = train_args(out, corpus, 2, "--tokenizer", str(shards.parent / "tok"))
    assert cli(args)[0] == 0
    rc, err = cli([*args, "--max-steps", "4"])
    assert rc == 0 and "(step 2)" in err, err


# --- 4, 5. metrics and run.json survive a kill during their rewrite ---------------------------------


def test_a_kill_while_metrics_are_rewritten_loses_no_history(run_copy, corpus, monkeypatch):
    import tegaki.files

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    before = (run_copy / "metrics.jsonl").read_bytes()
    monkeypatch.setattr(tegaki.files.os, "replace", killed)
    with pytest.raises(Killed):
        cli(train_args(run_copy, corpus, 6))
    monkeypatch.undo()
    assert (run_copy / "metrics.jsonl").read_bytes() == before
    assert cli(train_args(run_copy, corpus, 6))[0] == 0
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6]


def test_garbage_in_metrics_is_dropped_on_resume(run_copy, corpus):
    with open(run_copy / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe{"step": \n[1, 2]\n{"step": "x"}\n{"step": 3, "lo')
    assert cli(train_args(run_copy, corpus, 6))[0] == 0
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6]


def test_torn_run_json_is_rebuilt_and_no_advice_deletes_checkpoints(run_copy, corpus):
    text = (run_copy / "run.json").read_text()
    (run_copy / "run.json").write_text(text[: len(text) // 2])  # a torn write
    rc, err = cli(train_args(run_copy, corpus, 6))
    assert rc == 0 and "rebuilt it from checkpoint step_000004" in err and "(step 4)" in err, err
    assert "--fresh" not in err.split("resuming from")[0]
    assert json.loads((run_copy / "run.json").read_text())["model_config"] == json.loads(text)["model_config"]
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6]


# --- 6. the lock --------------------------------------------------------------------------------------


def test_a_second_process_is_refused_with_the_holders_pid(run_copy, corpus):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from tegaki.files import FolderLock; "
            "FolderLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
            str(run_copy),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"  # waits for the lock, not for a time
        before = snapshot(run_copy)
        rc, err = cli(train_args(run_copy, corpus, 6))
        assert rc == 2 and f"tegaki process {holder.pid}" in err and "Traceback" not in err, err
        assert snapshot(run_copy) == before
    finally:
        holder.kill()
        holder.wait(timeout=60)
    rc, err = cli(train_args(run_copy, corpus, 6))  # the holder died: its lock is taken over
    assert rc == 0 and f"took over the lock of process {holder.pid}" in err, err
    assert steps_logged(run_copy) == [1, 2, 3, 4, 5, 6] and not (run_copy / ".lock").exists()


def test_a_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / ".lock").write_text("999999999\n")  # no such process
    with FolderLock(tmp_path) as lock:
        assert lock.took_over == "999999999"
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / ".lock").exists()


# --- 7. samples and plots never kill a run; the checkpoint comes first -------------------------------


def test_a_sample_longer_than_a_learned_context_is_capped(shards, tmp_path):
    out = tmp_path / "run"
    rc, err = cli([*train_args(out, shards, 2), "--sample-every", "2", "--sample-tokens", "200"])
    assert rc == 0 and "--- sample at step 2 ---" in err and "failed" not in err and "Traceback" not in err, err
    assert (out / "checkpoints" / "step_000002").is_dir()
    assert json.loads((out / "run.json").read_text())["model_config"]["pos_embedding"] == "learned"


def test_a_failing_sample_or_plot_is_reported_and_the_run_goes_on(shards, tmp_path, monkeypatch):
    from tegaki.train import Run

    def broken(self, step):
        assert (self.run_dir / "checkpoints" / f"step_{step:06d}").is_dir()  # saved before the sample
        raise RuntimeError("sampler exploded")

    def no_plot(run_dir):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Run, "sample", broken)
    monkeypatch.setattr("tegaki.cli.train.plot_run_losses", no_plot)
    out = tmp_path / "run"
    rc, err = cli([*train_args(out, shards, 4), "--sample-every", "2"])
    assert rc == 0, err
    assert "the sample at step 2 failed (RuntimeError: sampler exploded); training goes on" in err
    assert "could not draw the loss curves" in err and "Traceback" not in err
    assert steps_logged(out) == [1, 2, 3, 4]


# --- paths recorded in a run folder stay inside it --------------------------------------------------


def test_run_json_pointing_outside_the_folder_is_refused(run_copy, tmp_path):
    info = json.loads((run_copy / "run.json").read_text())
    shutil.copytree(run_copy / "tokenizer", tmp_path / "elsewhere")
    info["tokenizer"] = "../elsewhere"
    (run_copy / "run.json").write_text(json.dumps(info))
    with pytest.raises(TegakiError, match="points outside the folder"):
        load_run_tokenizer(run_copy)
    rc, err = cli(["generate", "hi", "--model", str(run_copy), "--max-new-tokens", "2"])
    assert rc == 2 and "points outside the folder" in err, err


def test_state_json_naming_a_file_outside_is_not_followed(run_copy):
    from tegaki.checkpoint import check_checkpoint

    state_path = run_copy / "checkpoints" / "step_000004" / "state.json"
    state = json.loads(state_path.read_text())
    state["files"]["../../run.json"] = {"bytes": 1, "sha256": "0"}
    state_path.write_text(json.dumps(state))
    assert "outside the checkpoint folder" in check_checkpoint(state_path.parent)
