"""Whose run folder it is, and the run in it: claiming, marking and clearing a folder, run.json, the lock.

A run folder belongs to the command that made it (`made_by`): `tegaki train` never continues a
fine-tune, nor either one a folder of a person's files. One process at a time trains in it (the
lock), and run.json, written before the first step, says what run it holds: running the same
command again resumes that run, and a command for another run is refused, with nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tegaki.checkpoint.layout import LEFTOVER, MADE_BY_FILE, RUN_ENTRIES, RUN_FILE
from tegaki.checkpoint.reading import read_run_json
from tegaki.errors import TegakiError
from tegaki.files import FolderLock, atomic_write_json


def run_command(info: dict[str, Any]) -> str:
    """The command that made a run folder, from its run.json: a fine-tune records its settings
    under "finetune"; every other run is `tegaki train`'s."""
    return "finetune" if info.get("finetune") else "train"


def made_by(run_dir: Path) -> str | None:
    """The command that made a run folder ("train", "finetune"): its run.json says, or before that
    is written, made_by.json; None for a folder no tegaki command has marked."""
    if (run_dir / RUN_FILE).is_file():
        return run_command(read_run_json(run_dir))
    try:
        command = json.loads((run_dir / MADE_BY_FILE).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None
    return command if command in ("train", "finetune") else None


def claim_run_folder(run_dir: Path, command: str) -> None:
    """Refuse, with nothing written, to put a run of `command` ("train", "finetune") into a folder
    it did not make: a folder of a person's files (their metrics.jsonl, loss.png, tokenizer/ or
    data/ would be overwritten, taken for the run's, and later deleted by --fresh), or another
    command's run (a fine-tune must not resume a pretraining's checkpoint and rewrite its run.json).
    Welcome: a new or empty folder, and a run of the same command: resumed, or stopped during its
    set-up (made_by.json names the command; the tokenizer/ and data/ it wrote come before run.json).
    `mark_run_folder` writes that mark once the folder is claimed."""
    run_dir = Path(run_dir)
    entries = [e for e in run_dir.iterdir() if not LEFTOVER.fullmatch(e.name)] if run_dir.is_dir() else []
    if not entries:
        return
    maker = made_by(run_dir)
    if maker is not None and maker != command:
        hint = " (to fine-tune this run, give it as --model)" if maker == "train" else ""
        raise TegakiError(
            f"{run_dir} holds a run of `tegaki {maker}`, which `tegaki {command}` does not continue "
            f"or overwrite; nothing was changed. Choose another --out{hint}"
        )
    if (run_dir / RUN_FILE).is_file():
        return
    # Unmarked, every file is a person's (tegaki's names included: a tokenizer/ and data/ that
    # `tegaki tokenizer train` and `tegaki prepare` wrote are theirs); marked, those tegaki never writes.
    strangers = _foreign_files(run_dir, entries) if maker == command else entries
    if strangers:
        names = sorted(str(p.relative_to(run_dir)) for p in strangers)
        marks = "run.json" if maker else f"run.json or {MADE_BY_FILE}"
        hint = " (a tokenizer or shards here can be given as --tokenizer or --data)" if command == "train" else ""
        raise TegakiError(
            f"{run_dir} holds files tegaki did not write ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''}) "
            f"and has no {marks}; nothing was deleted or changed. tegaki {command} writes into a new or empty "
            f"folder, or a run of its own: choose another --out{hint}"
        )


def mark_run_folder(run_dir: Path, command: str) -> None:
    """Write made_by.json (the command) into a run folder just claimed, before its set-up writes
    anything: a run stopped in its set-up is then known as this command's, and nobody else's."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file() and made_by(run_dir) is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / MADE_BY_FILE, {"command": command})


def clear_run_folder(run_dir: Path, sources: dict[str, str | None]) -> None:
    """Delete a run folder's own files so that training starts over (--fresh).

    Refused, with nothing deleted, unless the folder is a tegaki run (run.json or made_by.json)
    holding only what tegaki writes there, and unless `sources` (--data, --tokenizer: flag -> path)
    lie outside what would go: starting over must never delete the data or the tokenizer it starts from."""
    run_dir = Path(run_dir)
    entries = [e for e in run_dir.iterdir() if not LEFTOVER.fullmatch(e.name)] if run_dir.is_dir() else []
    if not entries:
        return
    if made_by(run_dir) is None:
        raise TegakiError(
            f"--fresh deletes only a tegaki run folder, and {run_dir} has no run.json or {MADE_BY_FILE}; "
            "nothing was deleted. Choose another --out, or empty the folder yourself"
        )
    strangers = [str(p.relative_to(run_dir)) for p in _foreign_files(run_dir, entries)]
    if strangers:
        raise TegakiError(
            f"--fresh refused: {run_dir} holds files tegaki did not write ({', '.join(strangers[:5])}"
            f"{' ...' if len(strangers) > 5 else ''}); nothing was deleted. Move them out of the run "
            "folder, or choose another --out"
        )
    for flag, source in sources.items():
        if source and Path(source).exists() and Path(source).resolve().is_relative_to(run_dir.resolve()):
            raise TegakiError(
                f"--fresh refused: {flag} {source} lies inside {run_dir}, whose files --fresh deletes; "
                "nothing was deleted. Move it out of the run folder, or choose another --out"
            )
    for path in entries + [e for e in run_dir.iterdir() if e.name.endswith((".tmp", ".old"))]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _foreign_files(run_dir: Path, entries: list[Path]) -> list[Path]:
    """The entries of a run folder (one level into its folders) that tegaki does not write there."""
    foreign = []
    for entry in entries:
        if entry.name not in RUN_ENTRIES or entry.is_dir() != (RUN_ENTRIES[entry.name] is not None):
            foreign.append(entry)
        elif entry.is_dir():
            inside = re.compile(RUN_ENTRIES[entry.name])
            foreign += [p for p in entry.iterdir() if not inside.fullmatch(p.name)]
    if (run_dir / "tokenizer").is_dir() and not (run_dir / "tokenizer" / "tegaki_tokenizer.json").exists():
        foreign.append(run_dir / "tokenizer")  # not a tokenizer tegaki saved
    return foreign


def prepare_run_folder(run_dir: Path, command: str, fresh: bool, sources: dict[str, str | None]) -> None:
    """Claim `run_dir` for `command` (`claim_run_folder`), clear it when starting over (--fresh;
    `sources`: the flags' paths that must survive), and mark it as this command's, before the
    set-up writes anything there."""
    claim_run_folder(run_dir, command)
    if fresh:
        clear_run_folder(run_dir, sources)
    mark_run_folder(run_dir, command)


@contextlib.contextmanager
def undone_if_refused(run_dir: Path, enabled: bool, started: Callable[[], bool]) -> Iterator[None]:
    """Around a run's set-up and steps: refused before any step (bad preset, data, --set, ...),
    it leaves no half-made folder behind, nor a mark alone in a folder that was empty (the mark
    would keep other commands out). `started()`: whether the steps began; `enabled`: on the
    process that writes the folder."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    was_empty = run_dir.is_dir() and not any(run_dir.iterdir())
    try:
        yield
    except TegakiError:
        if enabled and not started():
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif was_empty and [p.name for p in run_dir.iterdir()] == [MADE_BY_FILE]:
                (run_dir / MADE_BY_FILE).unlink()
        raise


@contextlib.contextmanager
def locked_run_folder(run_dir: Path, say: Callable[[str], None], enabled: bool = True) -> Iterator[None]:
    """One process per run folder: DIR/.lock is held from before anything is read or written until
    the run ends, however it ends. `enabled`: False on the processes that follow the one writing."""
    lock = FolderLock(run_dir, "run folder")
    if enabled:
        lock.acquire()
        if lock.took_over:
            say(f"note: took over the lock of process {lock.took_over}, which is no longer running")
    try:
        yield
    finally:
        lock.release()


def check_same_run(
    run_dir: Path, info: dict[str, Any], resume_keys: tuple[str, ...], say: Callable[[str], None] | None = None
) -> None:
    """Refuse to train the run `info` describes (run.json's content) in a folder whose run.json
    describes another: another model (model_config, or a fine-tune's LoRA settings), or, once a
    checkpoint exists, other training settings among `resume_keys` (what a resume would not continue)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).exists():
        return
    old = read_run_json(run_dir, say=say)
    old_model, new_model = old.get("model_config") or {}, info["model_config"]
    changed = sorted(k for k in old_model.keys() | new_model.keys() if old_model.get(k) != new_model.get(k))
    changed += ["lora"] if old.get("lora") != info.get("lora") else []
    if changed:
        raise TegakiError(
            f"{run_dir} holds a run of another model ({', '.join(changed)} differ); "
            "use another --out, or --fresh to start over there"
        )
    old_train = old.get("train", {})
    changed = [k for k in resume_keys if k in old_train and old_train[k] != info["train"][k]]
    if changed and (run_dir / "checkpoints").exists():
        raise TegakiError(
            f"{run_dir} was trained with other {', '.join(changed)}; resuming would not continue "
            "the same run. Use the same settings, another --out, or --fresh"
        )


def write_run_json(
    run_dir: Path, info: dict[str, Any], resume_keys: tuple[str, ...], say: Callable[[str], None] | None = None
) -> None:
    """run.json for the run about to train in `run_dir`, checked first (`check_same_run`). From
    here on the folder is this run's (`claim_run_folder`)."""
    check_same_run(run_dir, info, resume_keys, say)
    atomic_write_json(Path(run_dir) / RUN_FILE, info)
