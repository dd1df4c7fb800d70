"""A training run's whole state in a checkpoint, and back: weights, AdamW, random generators, data.

What makes a resume exact: the weights and AdamW's moments, the random generators (dropout, the
LoRA dropout, sampling) and the data loader's place, all taken at the same step. Under DDP and
FSDP the states are gathered whole (unsharded) from every rank and written by the first.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tegaki.checkpoint.checkpoints import save_checkpoint
from tegaki.checkpoint.reading import check_shapes, read_model_tensors, read_optimizer_state, read_resume_state
from tegaki.checkpoint.three_projections import upgrade_optimizer_state
from tegaki.config import ModelConfig


def rng_state() -> dict[str, Any]:
    """The random generators' states (torch, CUDA, numpy, Python) in tensors, ints, floats,
    strings and lists only: optimizer.pt then loads with torch.load(weights_only=True), which runs
    no code from a downloaded run folder."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": [version, list(py_state), py_gauss],
    }


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Put back what `rng_state` took."""
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = rng["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def full_state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer states on the CPU; a collective call under DDP/FSDP."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def save_training_state(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    config: ModelConfig,
    keep: int,
    write: bool,
) -> Path | None:
    """Checkpoint step `step` of a run: every rank takes part in gathering the states; the one
    with `write` writes them, with the random generators' states (`save_checkpoint`), and gets the
    checkpoint's folder. `extra`: what state.json records beside (the data loader's place, ...)."""
    model_state, optim_state = full_state_dicts(model, optimizer)
    if not write:
        return None
    saved = {"optimizer": optim_state, "rng": rng_state()}
    return save_checkpoint(run_dir, step, model_state, saved, extra, config, keep)


def restore_training_state(
    folder: Path, model: torch.nn.Module, raw_model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Load checkpoint `folder` into `model` (wrapped by DDP/FSDP or not; `raw_model`: the GPT
    inside) and `optimizer`, and put the random generators back; its state.json, checked."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    state = read_resume_state(folder)
    tensors = read_model_tensors(folder)
    check_shapes(raw_model.state_dict(), tensors, where=f"checkpoint {folder}")
    if raw_model.config.tie_embeddings:  # the head's tensors are the embedding's
        tensors |= {"lm_head" + k.removeprefix("wte"): v for k, v in tensors.items() if k.startswith("wte.")}
    saved = read_optimizer_state(folder)
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    set_model_state_dict(model, tensors, options=options)
    # a three-projection run's AdamW moments are joined like its weights
    set_optimizer_state_dict(model, optimizer, upgrade_optimizer_state(saved["optimizer"]), options=options)
    restore_rng_state(saved["rng"])
    return state
