"""The run folder: atomic checkpoints, their checks, loading a run's model and tokenizer, the metrics log.

What `tegaki train --out DIR` writes, and every other command reads:
    DIR/run.json                 model config, tokenizer ("gpt2" or "tokenizer"), training settings
    DIR/tokenizer/               the run's tokenizer, unless a named one ("gpt2") is used
    DIR/data/                    token shards prepared from raw --data
    DIR/checkpoints/step_NNNNNN/ model.safetensors, optimizer.pt, state.json (sizes + sha256)
    DIR/metrics.jsonl            one JSON line per optimizer step, plus validation and sample lines
    DIR/loss.png                 the loss curves, drawn at the end

Run folders written before attention had one `qkv` projection hold q_proj/k_proj/v_proj tensors;
`upgrade_state_dict` (and `upgrade_optimizer_state` for a resume) join them wherever a run is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.lora import LoRASettings, add_lora, merge_lora
from tegaki.model import GPT

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
METRICS_FILE = "metrics.jsonl"


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

    Attention used to have three projections; it has one now, `qkv`, whose output rows are q's,
    then k's, then v's: `blocks.{i}.attn.qkv.weight` = cat([q_proj.weight (H*D, C),
    k_proj.weight (K*D, C), v_proj.weight (K*D, C)], dim=0), and the same for the biases. The
    layer computes exactly what the three did."""
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
            raise TegakiError(f"the optimizer state of {new_key}'s q/k/v parts holds different entries; "
                              "it cannot be joined")
        joined = {}
        for name, first in parts[0].items():
            values = [p[name] for p in parts]
            if isinstance(first, torch.Tensor) and first.dim() >= 1:
                joined[name] = torch.cat(values, dim=0)  # a moment per weight: stacked like the weights
            elif all(_equal(first, v) for v in values[1:]):
                joined[name] = first.clone() if isinstance(first, torch.Tensor) else first  # the step count
            else:
                raise TegakiError(f"the optimizer state of {new_key}'s q/k/v parts differs in {name!r}; "
                                  "it cannot be joined")
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
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def save_checkpoint(run_dir: Path, step: int, model_state: dict, optimizer_state: dict, extra: dict[str, Any],
                    config: ModelConfig, keep: int) -> Path:
    """Write checkpoints/step_NNNNNN atomically: into a .tmp folder, then one rename.

    A kill at any moment leaves either the whole new checkpoint or none of it (a stray .tmp folder,
    ignored and removed later). state.json records each file's size and sha256, so a file that
    was damaged afterwards is caught before it is used."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_tensors(model_state, config), str(tmp / MODEL_FILE), metadata={"format": "pt"})
    os.chmod(tmp / MODEL_FILE, 0o666 & ~_umask())  # safetensors writes 0600; every other file follows the umask
    torch.save(optimizer_state, tmp / OPTIMIZER_FILE)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
             for name in (MODEL_FILE, OPTIMIZER_FILE)}
    state = {"step": step, "model_config": config.to_dict(), "files": files, **extra}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    # Saving a step again (a resumed run that stopped right after a save): never delete the only
    # good copy first. The old folder steps aside as step_N.old (still found by find_checkpoint),
    # the new one takes its name, and only then is the old one removed.
    old = root / f"step_{step:06d}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(root, keep)
    return final


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
# Checking and finding checkpoints
# =================================================================================================


def check_checkpoint(folder: Path, need: tuple[str, ...] | None = None) -> str | None:
    """None when the checkpoint is whole; else what is wrong with it, in words.
    `need`: check only these files (what the caller reads); None: every file."""
    state_path = folder / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
        files = state["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{STATE_FILE} is missing or unreadable"
    for name, expected in files.items():
        if need is not None and name not in need:
            continue
        path = folder / name
        if not path.exists():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size:,} bytes, expected {expected['bytes']:,} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its recorded sha256 (damaged)"
    return None


def find_checkpoint(run_dir: Path, say=print, need: tuple[str, ...] | None = None,
                    fix: str = "run again with --fresh to start over") -> Path | None:
    """The newest intact checkpoint; damaged ones are reported (never used) and skipped.
    Raises when checkpoints exist but none is intact: starting over silently would lose a run.
    `need`: the files the caller reads (generation needs only the weights, not optimizer.pt)."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")),
                        reverse=True)
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
        raise TegakiError(
            f"no intact checkpoint in {root} ({', '.join(problems)} damaged); {fix}"
        )
    return None


# =================================================================================================
# Loading a run: what other modules read
# =================================================================================================


def read_run_json(path: str | os.PathLike) -> dict[str, Any]:
    """DIR/run.json, checked: a readable JSON object with a model_config."""
    run_file = Path(path) / "run.json"
    if not run_file.exists():
        raise TegakiError(f"{path} is not a tegaki run folder (no run.json); "
                          f"train one with `tegaki train --out {path}`")
    try:
        info = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TegakiError(f"{run_file} is damaged ({e}); restore it from a copy, or retrain with "
                          f"`tegaki train --out {path} --fresh`") from None
    if not isinstance(info, dict) or not isinstance(info.get("model_config"), dict):
        raise TegakiError(f"{run_file} is damaged (no model_config); restore it from a copy, or retrain with "
                          f"`tegaki train --out {path} --fresh`")
    return info


def load_run_tokenizer(path: str | os.PathLike):
    """The tokenizer a run was trained with ("gpt2", or the run's own tokenizer/ folder)."""
    from tegaki.tokenizer import load

    info = read_run_json(path)
    ref = info.get("tokenizer", "gpt2")
    if ref == "gpt2":
        return load("gpt2")
    return load(Path(path) / ref)


def read_model_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's model tensors, named as today's model names them (`upgrade_state_dict`)."""
    from safetensors.torch import load_file

    return upgrade_state_dict(load_file(str(Path(checkpoint) / MODEL_FILE)))


def load_run_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """The model of a run folder from its newest intact checkpoint, in eval mode. A LoRA fine-tune
    (run.json "lora") holds its adapters beside the frozen weights; they are merged in here."""
    info = read_run_json(path)
    checkpoint = find_checkpoint(Path(path), say=lambda m: print(m, file=sys.stderr), need=(MODEL_FILE,),
                                 fix=f"retrain with `tegaki train --out {path} --fresh`")
    if checkpoint is None:
        raise TegakiError(f"{path} has no checkpoint yet; train longer or lower --save-every")
    config = ModelConfig.from_dict(info["model_config"])
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
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise TegakiError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# =================================================================================================
# The metrics log
# =================================================================================================


class MetricsLog:
    """metrics.jsonl: one JSON object per line. A resumed run first drops the lines written after
    its checkpoint (they belonged to the interrupted attempt), so every step appears once."""

    def __init__(self, path: Path, start_step: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start_step and start_step > 0:
                        kept.append(line)
                except ValueError:
                    continue  # a half-written last line from a kill
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl, in file order. A line that is not a JSON object (the
    half-written last line of a killed run) is skipped.

    Records: {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "dt"} per optimizer step;
    {"step", "kind": "val", "val_loss", "val_bpb"} per validation; {"step", "kind": "sample", "text"}."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
