"""Reading a run folder: its run.json, its tokenizer, its checkpoints' files, its model.

What every other command reads a run through: `read_run_json`, `load_run_tokenizer`,
`load_run_model`. A path recorded inside the folder is refused when it leads outside it
(`check_inside`); a file that is not what it claims is refused in one sentence naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tegaki.checkpoint.checkpoints import find_checkpoint
from tegaki.checkpoint.layout import MODEL_FILE, OPTIMIZER_FILE, RUN_FILE, STATE_FILE
from tegaki.checkpoint.three_projections import upgrade_state_dict
from tegaki.config import ModelConfig
from tegaki.device import check_fits
from tegaki.errors import TegakiError
from tegaki.files import atomic_write_json, explain_os_error
from tegaki.lora import LoRASettings, add_lora, merge_lora
from tegaki.model import GPT, parameter_count


def read_run_json(path: str | os.PathLike, say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """DIR/run.json, checked: a readable JSON object with a model_config.

    A damaged run.json (a torn write, a slip of an editor) is rebuilt from the
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


def load_run_tokenizer(path: str | os.PathLike, info: dict[str, Any] | None = None):
    """The tokenizer a run was trained with ("gpt2", or the run's own tokenizer/ folder). `info`: the
    run.json already read (read_run_json), if the caller has it."""
    from tegaki.tokenizer import load

    info = info if info is not None else read_run_json(path)
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
            f"{path} holds Python objects that tegaki does not load (not an optimizer state that "
            "tegaki wrote); start over with --fresh"
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
    """A checkpoint's model tensors, named as the model names them (`upgrade_state_dict`)."""
    return upgrade_state_dict(read_safetensors(Path(checkpoint) / MODEL_FILE))


def load_run_model(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    info: dict[str, Any] | None = None,
):
    """The model of a run folder from its newest intact checkpoint, in eval mode. A LoRA fine-tune
    (run.json "lora") holds its adapters beside the frozen weights; they are merged in here. `info`:
    the run.json already read (read_run_json), if the caller has it."""
    info = info if info is not None else read_run_json(path)
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
