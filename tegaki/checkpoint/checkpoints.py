"""Checkpoints: DIR/checkpoints/step_NNNNNN/ holds model.safetensors, optimizer.pt and state.json.

A checkpoint is written into a .tmp folder and renamed into place, so a kill at any moment leaves
the whole new checkpoint or none of it. state.json records each file's size and sha256: a file
damaged afterwards is found (`check_checkpoint`) and skipped (`find_checkpoint`) before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tegaki.checkpoint.layout import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.files import explain_write_error


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_tensors(model_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The model's tensors for safetensors: contiguous CPU copies, a tied head stored once."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    if config.tie_embeddings:  # lm_head.weight (and a LoRA run's lm_head.new_rows) are the embedding's
        for name in [k for k in tensors if k.startswith("lm_head.")]:
            tensors.pop(name)
    return tensors


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    extra: dict[str, Any],
    config: ModelConfig,
    keep: int,
) -> Path:
    """Write checkpoints/step_NNNNNN atomically: into a .tmp folder, then one rename.

    A kill at any moment leaves either the whole new checkpoint or none of it (a stray .tmp folder,
    ignored and removed later). state.json records each file's size and sha256, so a file that
    was damaged afterwards is caught before it is used."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint_files(tmp, step, model_state, optimizer_state, extra, config)
        _put_in_place(tmp, final)
    except Exception as e:  # a full disk: the half-written folder goes; the older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        explained = explain_write_error(final, e)
        if explained is None:
            raise
        raise TegakiError(f"{explained}; the checkpoints saved before are intact") from None
    prune_checkpoints(root, keep)
    return final


def _put_in_place(tmp: Path, final: Path) -> None:
    """Rename the finished folder to step_N. Saving a step again (a resumed run that stopped right
    after a save): never delete the only good copy first. The old folder steps aside as step_N.old
    (still found by find_checkpoint), the new one takes its name, and only then is the old one removed."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_checkpoint_files(
    tmp: Path, step: int, model_state: dict, optimizer_state: dict, extra: dict[str, Any], config: ModelConfig
) -> None:
    """model.safetensors, optimizer.pt and state.json (sizes + sha256 of the other two), on the disk."""
    from safetensors.torch import save_file

    save_file(model_tensors(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    os.chmod(tmp / MODEL_FILE, 0o666 & ~_umask())  # safetensors writes 0600; every other file follows the umask
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    files = {
        name: {"bytes": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
        for name in (MODEL_FILE, OPTIMIZER_FILE)
    }
    state = {"step": step, "model_config": config.to_dict(), "files": files, **extra}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints under `root` (DIR/checkpoints); clear what a kill left."""
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob("*.old"):  # set aside by a re-save: finished (drop it) or killed (restore it)
        if (root / aside.stem).is_dir():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, root / aside.stem)
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def check_checkpoint(folder: Path, need: tuple[str, ...] | None = None) -> str | None:
    """None when the checkpoint is whole; else what is wrong with it, in words.
    `need`: check only these files (what the caller reads); None: every file."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return f"{STATE_FILE} is missing or unreadable"
    if not isinstance(files, dict) or not all(isinstance(e, dict) for e in files.values()):
        return f"{STATE_FILE} is damaged (no list of files)"
    for name, expected in files.items():
        if need is not None and name not in need:
            continue
        if name != Path(name).name or name in ("", ".", ".."):
            return f"{STATE_FILE} names {name!r}, a path outside the checkpoint folder (refused)"
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected.get("bytes"):
            return f"{name} is {size:,} bytes, expected {expected.get('bytes')} (truncated?)"
        if file_sha256(path) != expected.get("sha256"):
            return f"{name} does not match its recorded sha256 (damaged)"
    return None


def find_checkpoint(
    run_dir: Path, say=print, need: tuple[str, ...] | None = None, fix: str = "run again with --fresh to start over"
) -> Path | None:
    """The newest intact checkpoint; damaged ones are reported (never used) and skipped.
    Raises when checkpoints exist but none is intact: starting over silently would lose a run.
    `need`: the files the caller reads (generation needs only the weights, not optimizer.pt)."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    problems = []
    for folder in candidates:
        problem = check_checkpoint(folder, need)
        if problem is None:
            if problems:
                say(f"using the previous intact checkpoint {folder.name}")
            return folder
        say(f"warning: checkpoint {folder} is damaged: {problem}; skipping it")
        problems.append(folder.name)
    if problems:
        raise TegakiError(f"no intact checkpoint in {root} ({', '.join(problems)} damaged); {fix}")
    return None
