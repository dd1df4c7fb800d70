"""Fault injection at every write of a resumed run: the rename that commits a file (os.replace) and
the flush that puts it on the disk (os.fsync) fail, once each, at every place tegaki calls them --
with a full disk (an OSError) or a kill (an exception nothing catches). Afterwards the run resumes
and ends exactly as an uninterrupted one: every step logged once, in order, with the same losses."""

from __future__ import annotations

import errno
import os
import shutil
import traceback
from pathlib import Path

import pytest
from reliability_helpers import cli, train_args

from tegaki.checkpoint import find_checkpoint, read_metrics

POINTS = ("replace", "fsync")


class Killed(BaseException):
    """Stands for kill -9: no `except Exception` stops it (scripts/chaos.sh kills for real)."""


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r.get("kind") is None]


def call_sites(monkeypatch, run: Path, corpus: Path) -> dict[str, list[str]]:
    """The distinct places (file:line in tegaki) that call each fault point during a resume 4 -> 6."""
    sites: dict[str, list[str]] = {name: [] for name in POINTS}
    for name in POINTS:
        real = getattr(os, name)

        def spy(*args, _name=name, _real=real, **kwargs):
            site = _tegaki_caller()
            if site and site not in sites[_name]:
                sites[_name].append(site)
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    assert cli(train_args(run, corpus, 6))[0] == 0
    monkeypatch.undo()
    return sites


def _tegaki_caller() -> str | None:
    """The call path through tegaki (file:line, innermost first): atomic_write's one os.replace
    is a different write for metrics.jsonl and for run.json."""
    frames = [
        f"{Path(f.filename).name}:{f.lineno}:{f.name}"
        for f in reversed(traceback.extract_stack()[:-2])
        if "/tegaki/" in f.filename and "/tests/" not in f.filename
    ]
    return " <- ".join(frames) or None


@pytest.fixture(scope="module")
def reference(trained, corpus, tmp_path_factory):
    """(the uninterrupted run's losses, the write sites) of a resume from step 4 to step 6."""
    run = tmp_path_factory.mktemp("reference") / "run"
    shutil.copytree(trained, run)
    with pytest.MonkeyPatch.context() as mp:
        sites = call_sites(mp, run, corpus)
    assert len(sites["replace"]) >= 3 and len(sites["fsync"]) >= 3, sites  # metrics, run.json, checkpoint, ...
    return losses(run), sites


@pytest.mark.parametrize("fault", ["disk full", "kill"])
@pytest.mark.parametrize("point", POINTS)
def test_a_fault_at_every_write_loses_nothing(reference, trained, corpus, tmp_path, monkeypatch, point, fault):
    expected, sites = reference
    for site in sites[point]:
        run = tmp_path / f"site{sites[point].index(site)}"
        shutil.copytree(trained, run)
        _fail_once_at(monkeypatch, point, site, fault)
        if fault == "kill":
            with pytest.raises(Killed):
                cli(train_args(run, corpus, 6))
        else:
            rc, err = cli(train_args(run, corpus, 6))
            if site.split(" <- ")[0].endswith(":_fsync_folder"):
                assert rc == 0, err  # flushing a folder's entry is best effort: some systems cannot
                monkeypatch.undo()
                continue
            if ":_draw_losses" in site:  # the picture is optional: reported, and the run is done and saved
                assert rc == 0 and "could not draw the loss curves" in err and "disk is full" in err, err
                monkeypatch.undo()
                continue
            assert rc == 2 and "disk is full" in err and "Traceback" not in err, (site, err)
            assert err.strip().splitlines()[-1].startswith("tegaki train: error: could not write "), (site, err)
        monkeypatch.undo()
        assert find_checkpoint(run, say=lambda m: None) is not None, site  # an intact checkpoint is always there
        rc, err = cli(train_args(run, corpus, 6))
        assert rc == 0, (site, err)
        assert losses(run) == expected, site  # every step once, in order, bit for bit


def _fail_once_at(monkeypatch, point: str, site: str, fault: str) -> None:
    real = getattr(os, point)
    state = {"done": False}

    def failing(*args, **kwargs):
        if not state["done"] and _tegaki_caller() == site:
            state["done"] = True
            if fault == "kill":
                raise Killed
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, point, failing)


def test_a_full_disk_while_saving_weights_keeps_the_older_checkpoints(run_copy, corpus, monkeypatch):
    """safetensors reports a full disk as its own error type ("... os error 28")."""
    import safetensors.torch

    class SafetensorError(Exception):
        pass

    def full(*args, **kwargs):
        raise SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
            '"No space left on device" }) os error 28'
        )

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc, err = cli(train_args(run_copy, corpus, 6))
    assert rc == 2 and "disk is full" in err and "checkpoints saved before are intact" in err, err
    assert "Traceback" not in err
    monkeypatch.undo()
    assert not list((run_copy / "checkpoints").glob("*.tmp"))
    assert cli(train_args(run_copy, corpus, 6))[0] == 0
