"""The run folder: atomic checkpoints, their checks, loading a run's model and tokenizer, the metrics log.

What `tegaki train --out DIR` writes, and every other command reads:
    DIR/run.json                 model config, tokenizer ("gpt2" or "tokenizer"), training settings
    DIR/tokenizer/               the run's tokenizer, unless a named one ("gpt2") is used
    DIR/data/                    token shards prepared from raw --data
    DIR/checkpoints/step_NNNNNN/ model.safetensors, optimizer.pt, state.json (sizes + sha256)
    DIR/metrics.jsonl            one JSON line per optimizer step, plus validation and sample lines
    DIR/loss.png                 the loss curves, drawn at the end
    DIR/.lock                    the PID of the process training in DIR, while it does

Every file is written atomically (tegaki/files.py, or a folder renamed into place), so a kill at any
moment leaves the old file or the new one; paths recorded inside the folder stay inside it.

Run folders written before attention had one `qkv` projection hold q_proj/k_proj/v_proj tensors;
`upgrade_state_dict` (and `upgrade_optimizer_state` for a resume) join them wherever a run is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tegaki.config import ModelConfig
from tegaki.device import check_fits
from tegaki.errors import TegakiError
from tegaki.files import atomic_write_json, atomic_write_text, explain_os_error, explain_write_error
from tegaki.lora import LoRASettings, add_lora, merge_lora
from tegaki.model import GPT, parameter_count

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"
MADE_BY_FILE = "made_by.json"  # which command made a run folder, written before anything else there
LOCK_FILE = ".lock"


# =================================================================================================
# Old run folders: q_proj/k_proj/v_proj -> one qkv
# =================================================================================================

_OLD_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # in the order their rows are stacked in qkv
_OLD_KEY = re.compile(r"^(?P<layer>.+)\.(?P<proj>q_proj|k_proj|v_proj)\.(?P<kind>weight|bias)$")


def _joined_name(key: str) -> tuple[str, list[str]] | None:
    """For an old q/k/v key: (the qkv key it becomes, the three old keys joined into it)."""
    match = _OLD_KEY.match(key)
    if match is None:
        return None
    layer, kind = match["layer"], match["kind"]
    return f"{layer}.qkv.{kind}", [f"{layer}.{proj}.{kind}" for proj in _OLD_PROJECTIONS]


def _join_by_layer(entries: dict[str, Any], join: Callable[[str, list[Any]], Any]) -> dict[str, Any]:
    """`entries` with every layer's q/k/v entries replaced by one qkv entry, `join(qkv_key, [q, k, v])`,
    at the place of the first of them (so the order of the others is kept)."""
    out: dict[str, Any] = {}
    for key, value in entries.items():
        joined = _joined_name(key)
        if joined is None:
            out[key] = value
            continue
        new_key, parts = joined
        if new_key in out:
            continue  # joined already, at the first of the three
        missing = [p for p in parts if p not in entries]
        if missing:
            raise TegakiError(f"an old-format checkpoint has {key} but not {', '.join(missing)}; it is damaged")
        if new_key in entries:
            raise TegakiError(f"a checkpoint holds both {new_key} and {key}; it is damaged")
        out[new_key] = join(new_key, [entries[p] for p in parts])
    return out


def upgrade_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's tensors as today's model names them; a no-op for tensors saved by today's code.

    Run folders written by earlier versions of tegaki hold q, k and v as three projections; the
    model has one, `qkv`, whose output rows are q's, then k's, then v's:
    `blocks.{i}.attn.qkv.weight` = cat([q_proj.weight (H*D, C), k_proj.weight (K*D, C),
    v_proj.weight (K*D, C)], dim=0), and the same for the biases. The layer computes exactly what
    the three did."""
    if not any(_joined_name(key) for key in tensors):
        return tensors
    return _join_by_layer(tensors, lambda _, parts: torch.cat(parts, dim=0))  # (H*D + 2*K*D, ...)


def upgrade_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An old run's optimizer state (keyed by parameter name, as `get_optimizer_state_dict` writes
    it) for the model with one qkv projection; a no-op for a state saved by today's code.

    AdamW works element by element: its moments for qkv are q's, k's and v's moments stacked the
    way the weights are (`exp_avg`, `exp_avg_sq` joined along dim 0), and the step count, the same
    for all three, is kept. The resumed run then takes the step the old code would have taken."""
    params = state.get("state", {})
    if not any(_joined_name(key) for key in params):
        return state

    def join(new_key: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
        if any(set(p) != set(parts[0]) for p in parts):
            raise TegakiError(
                f"the optimizer state of {new_key}'s q/k/v parts holds different entries; it cannot be joined"
            )
        joined = {}
        for name, first in parts[0].items():
            values = [p[name] for p in parts]
            if isinstance(first, torch.Tensor) and first.dim() >= 1:
                joined[name] = torch.cat(values, dim=0)  # a moment per weight: stacked like the weights
            elif all(_equal(first, v) for v in values[1:]):
                joined[name] = first.clone() if isinstance(first, torch.Tensor) else first  # the step count
            else:
                raise TegakiError(
                    f"the optimizer state of {new_key}'s q/k/v parts differs in {name!r}; it cannot be joined"
                )
        return joined

    groups = []
    for group in state.get("param_groups", []):
        names = {key: None for key in group["params"]}  # a dict: keeps the order, joins like the state
        groups.append({**group, "params": list(_join_by_layer(names, lambda *_: None))})
    return {**state, "state": _join_by_layer(params, join), "param_groups": groups}


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# =================================================================================================
# Saving a checkpoint
# =================================================================================================


def _sha256(path: Path) -> str:
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
        name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
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


# =================================================================================================
# Starting over (--fresh): deleting only what tegaki wrote
# =================================================================================================

# What `tegaki train` writes in a run folder, and, for the folders among them, what they may hold.
RUN_ENTRIES = {
    RUN_FILE: None,
    METRICS_FILE: None,
    "loss.png": None,
    "tb": r"events\.out\.tfevents\..*",
    "tokenizer": r".*",
    "checkpoints": r"step_\d{6}(\.tmp|\.old)?",
    "data": r"(train|val)_\d{6}\.bin(\.tmp)?|meta\.json|prepare\.json|\..*\.tmp",
    "chat_template.jinja": None,  # a fine-tune's template (tegaki finetune)
    MADE_BY_FILE: None,
}
_LEFTOVER = re.compile(r"\..*\.(tmp|old)|\.lock")  # an atomic write's temporary file, a set-aside copy, the lock


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
    entries = [e for e in run_dir.iterdir() if not _LEFTOVER.fullmatch(e.name)] if run_dir.is_dir() else []
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
    entries = [e for e in run_dir.iterdir() if not _LEFTOVER.fullmatch(e.name)] if run_dir.is_dir() else []
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


# =================================================================================================
# Checking and finding checkpoints
# =================================================================================================


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
        if _sha256(path) != expected.get("sha256"):
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


# =================================================================================================
# Loading a run: what other modules read
# =================================================================================================


def read_run_json(path: str | os.PathLike, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """DIR/run.json, checked: a readable JSON object with a model_config.

    A damaged run.json (a torn write by an older tegaki, a slip of an editor) is rebuilt from the
    newest intact checkpoint, which records the same settings, and written back; `say` tells."""
    run_file = Path(path) / RUN_FILE
    if not run_file.exists():
        raise TegakiError(
            f"{path} is not a tegaki run folder (no run.json); train one with `tegaki train --out {path}`"
        )
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
        problem = None if isinstance(info, dict) and isinstance(info.get("model_config"), dict) else "no model_config"
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
        problem = str(e)
    if problem is None:
        check_inside(path, info.get("tokenizer", "gpt2"), "run.json's tokenizer", named=("gpt2",))
        return info
    rebuilt = rebuild_run_json(Path(path))
    if rebuilt is None:
        raise TegakiError(
            f"{run_file} is damaged ({problem}) and no intact checkpoint records its settings; "
            f"restore it from a copy, or retrain with `tegaki train --out {path} --fresh`"
        )
    (say or (lambda m: print(m, file=sys.stderr)))(
        f"warning: {run_file} is damaged ({problem}); rebuilt it from checkpoint {rebuilt.pop('_from')}"
    )
    with contextlib.suppress(TegakiError):  # a read-only folder: the rebuilt settings still serve this reader
        atomic_write_json(run_file, rebuilt)
    return rebuilt


def rebuild_run_json(run_dir: Path) -> dict[str, Any] | None:
    """run.json's content from the newest intact checkpoint's state.json (None: no such checkpoint)."""
    try:
        folder = find_checkpoint(run_dir, say=lambda m: None, need=(MODEL_FILE,))
    except TegakiError:
        return None
    if folder is None:
        return None
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    train = state.get("train_config") or {}
    data = "data" if (run_dir / "data" / "meta.json").exists() else train.get("data")
    return {
        "model_config": state["model_config"],
        "tokenizer": state.get("tokenizer", "tokenizer" if (run_dir / "tokenizer").is_dir() else "gpt2"),
        "data": data,
        "train": train,
        "_from": folder.name,
    }


def check_inside(folder: str | os.PathLike, ref: str, what: str, named: tuple[str, ...] = ()) -> Path | None:
    """A path recorded in `folder` (relative to it), refused when it leads outside: a run folder
    from someone else must not make tegaki read (or delete) files elsewhere. None for a name in `named`."""
    if ref in named:
        return None
    if not isinstance(ref, str):
        raise TegakiError(f"{folder}: {what} is {ref!r}, not a path; the run folder is damaged")
    target = (Path(folder) / ref).resolve()
    if not target.is_relative_to(Path(folder).resolve()):
        raise TegakiError(
            f"{folder}: {what} {ref!r} points outside the folder; refused (a run folder refers only to files inside it)"
        )
    return target


def load_run_tokenizer(path: str | os.PathLike):
    """The tokenizer a run was trained with ("gpt2", or the run's own tokenizer/ folder)."""
    from tegaki.tokenizer import load

    info = read_run_json(path)
    ref = info.get("tokenizer", "gpt2")
    if ref == "gpt2":
        return load("gpt2")
    return load(check_inside(path, ref, "run.json's tokenizer"))


def read_safetensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file. A file that is not one (truncated, a forged header, even
    one whose recorded sha256 was updated to match) is refused in one sentence naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except OSError as e:
        raise explain_os_error(file, e, doing="read") from None
    except Exception as e:  # noqa: BLE001 - safetensors' errors are the file's fault, not a bug
        raise TegakiError(
            f"{file}: could not read weights ({type(e).__name__}: {e}); the file is truncated or damaged. "
            "Restore it from a copy, or download/train it again"
        ) from None


def safetensors_metadata(file: str | os.PathLike) -> dict[str, str]:
    """The metadata in a safetensors file's header, refused like `read_safetensors` when it is damaged."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - as read_safetensors
        raise TegakiError(
            f"{file}: could not read its header ({type(e).__name__}: {e}); the file is truncated or damaged"
        ) from None


def read_resume_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's state.json, checked for what a resume reads: the step and the data loader's
    place (whole numbers). Its files were checked by `check_checkpoint`; state.json itself has no
    hash, so a hand-edited one is refused here in words rather than deep in the resume."""
    path = Path(checkpoint) / STATE_FILE
    state = json.loads(path.read_text())  # readable: check_checkpoint read it before
    loader = state.get("loader")
    whole = [type(state.get("step")) is int] + [
        isinstance(loader, dict) and type(loader.get(k)) is int for k in ("epoch", "position", "seed")
    ]
    if not all(whole):
        raise TegakiError(
            f"{path} is damaged (its step or the data loader's place is not a whole number); "
            "move its checkpoint folder aside to resume from the one before it"
        )
    return state


def read_optimizer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's optimizer.pt: {"optimizer": AdamW's state, "rng": the random generators' states}.
    Loaded with weights_only (no code from a downloaded run folder runs); a file that is not one
    (truncated, forged, even with its recorded sha256 updated to match) is refused in one sentence."""
    import pickle

    path = Path(checkpoint) / OPTIMIZER_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TegakiError(
            f"{path} holds Python objects that tegaki does not load (a file from an older tegaki, or not "
            "from tegaki at all); start over with --fresh"
        ) from None
    except OSError as e:
        raise explain_os_error(path, e, doing="read") from None
    except Exception as e:  # noqa: BLE001 - torch's reader reports a damaged file in many ways
        raise TegakiError(
            f"{path}: could not read the optimizer state ({type(e).__name__}); the file is truncated or "
            "damaged. Move its checkpoint folder aside to resume from the one before it"
        ) from None
    if not (isinstance(saved, dict) and all(isinstance(saved.get(k), dict) for k in ("optimizer", "rng"))):
        raise TegakiError(f"{path} is not a tegaki optimizer state (no optimizer and rng entries); use --fresh")
    return saved


def read_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, named as today's model names them (`upgrade_state_dict`)."""
    return upgrade_state_dict(read_safetensors(Path(checkpoint) / MODEL_FILE))


def load_run_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The model of a run folder from its newest intact checkpoint, in eval mode. A LoRA fine-tune
    (run.json "lora") holds its adapters beside the frozen weights; they are merged in here."""
    info = read_run_json(path)
    checkpoint = find_checkpoint(
        Path(path),
        say=lambda m: print(m, file=sys.stderr),
        need=(MODEL_FILE,),
        fix=f"retrain with `tegaki train --out {path} --fresh`",
    )
    if checkpoint is None:
        raise TegakiError(f"{path} has no checkpoint yet; train longer or lower --save-every")
    config = ModelConfig.from_dict(info["model_config"])
    check_fits(parameter_count(config), 4, "cpu", f"loading the model of {path}")  # built in float32 first
    model = GPT(config)
    if info.get("lora"):
        add_lora(model, LoRASettings.from_dict(info["lora"]))
    load_model_tensors(model, read_model_tensors(checkpoint))
    if info.get("lora"):
        merge_lora(model)
    model.to(device=device, dtype=dtype)
    return model.eval()


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`; a tied LM head may be absent (it is the embedding)."""
    check_shapes(model.state_dict(), tensors)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head.") and model.config.tie_embeddings)]
    if missing or unexpected:
        raise TegakiError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def check_shapes(
    expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str = "checkpoint"
) -> None:
    """Refuse tensors whose shapes differ from the model's, naming the first few."""
    wrong = [
        f"{k} is {tuple(v.shape)}, the model's {tuple(expected[k].shape)}"
        for k, v in tensors.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise TegakiError(
            f"the {where} does not fit the model of run.json: {'; '.join(wrong[:3])}"
            f"{' ...' if len(wrong) > 3 else ''}. Was the checkpoint copied from another run?"
        )


# =================================================================================================
# The metrics log
# =================================================================================================


class MetricsLog:
    """metrics.jsonl: one JSON object per line, appended as the run goes. A resumed run first drops
    the lines written after its checkpoint (they belonged to the interrupted attempt), so every step
    appears once and in order; that rewrite is atomic, so a kill during it loses no history."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = [line for line, record in _metric_lines(path) if start_step > 0 and record.get("step", 0) <= start_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        try:
            self.file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - kept open for the run
        except OSError as e:
            raise explain_os_error(path, e) from None

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def _metric_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every line of a metrics.jsonl that is a JSON object with an integer step.
    Anything else (the half-written last line of a killed run, garbage) is skipped."""
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as e:
        raise explain_os_error(path, e, doing="read") from None
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step", 0)) is int:
            lines.append((line, record))
    return lines


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in file order. A line that is not a JSON object with an
    integer step (the half-written last line of a killed run) is skipped.

    Records: {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "dt"} per optimizer step;
    {"step", "kind": "val", "val_loss", "val_bpb"} per validation; {"step", "kind": "sample", "text"}."""
    if not Path(path).exists():
        raise TegakiError(f"{path} does not exist; is it a run folder that has trained a step?")
    return [record for _, record in _metric_lines(Path(path))]
