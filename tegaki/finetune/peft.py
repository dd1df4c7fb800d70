"""LoRA adapters in PEFT's format, both ways: `export_peft(model, out)` and `load_peft(model, folder)`.

PEFT (the `peft` package) keeps an adapter as two files beside nothing else:
    adapter_config.json         {"peft_type": "LORA", "r", "lora_alpha", "target_modules", ...}
    adapter_model.safetensors   base_model.model.<transformers module>.lora_A.weight (r, in)
                                base_model.model.<transformers module>.lora_B.weight (out, r)
loaded with `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)` onto the
base model as `tegaki export` writes it. Module names come from tegaki.hf's tables: tegaki's adapter
on the q rows of `blocks.3.attn.qkv` is the adapter of `model.layers.3.self_attn.q_proj` (the join
rule's first name), v's of v_proj. A and B are the same numbers; so are the outputs (a test checks).

The weights file's metadata also carries a "tegaki" entry (JSON): the targets in tegaki's words and a
fingerprint of the base (its shape and a few of its weights), so an adapter is refused on a model it
was not made for. It sits there, not in adapter_config.json, because PEFT warns about every key of
that file it does not know; an adapter_config.json that holds the entry is read too.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch

from tegaki.checkpoint import (
    MODEL_FILE,
    find_checkpoint,
    load_model_tensors,
    read_model_tensors,
    read_run_json,
    read_safetensors,
    safetensors_metadata,
)
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.files import atomic_write, atomic_write_json
from tegaki.hf import family_for_config
from tegaki.load import EXPORT_MARK, claim_export_folder
from tegaki.lora import QKV_PARTS, LoRASettings, add_lora, lora_layers, merge_lora
from tegaki.model import GPT

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."


def transformers_modules(model) -> dict[str, str]:
    """{tegaki adapter name ("blocks.3.attn.qkv:q"): transformers module ("model.layers.3.self_attn.q_proj")}
    for every adapter of a LoRA model."""
    fam = family_for_config(model.config)
    out = {}
    for name, layer in lora_layers(model):
        layer_index = name.split(".")[1]
        for part in layer.parts:
            rule = next((r for r in fam.weights if r.ours.format(i=layer_index) == f"{name}.weight"), None)
            if rule is None:
                raise TegakiError(f"{name} has no transformers counterpart in the {fam.name} tables")
            if part in QKV_PARTS and rule.kind != "join":
                raise TegakiError(
                    f"{fam.name} keeps q, k and v in one transformers module ({rule.hf[0]}); "
                    "a PEFT adapter of part of it cannot be written: use targets o and the MLP's, "
                    "or `tegaki export` for the merged model"
                )
            hf_name = rule.hf[QKV_PARTS.index(part)] if part in QKV_PARTS else rule.hf[0]
            out[f"{name}:{part}"] = hf_name.format(i=layer_index).removesuffix(".weight")
    return out


def base_fingerprint(model) -> str:
    """A short hash of the base model: its shape, and a few weights rounded to bfloat16 (so a float32
    and a bfloat16 copy of the same base agree). Adapters only ever change the LoRA tensors, never these."""
    c = model.config
    shape = [c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.vocab_size, c.intermediate_size]
    h = hashlib.sha256(json.dumps(shape).encode())
    first = model.blocks[0].attn.qkv.weight
    for w in (model.wte.weight, first):
        h.update(w.detach()[:4, :64].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def export_peft(model, out: str | Path, settings: LoRASettings, base_name: str = "") -> Path:
    """Write a LoRA model's adapters (not its base) as a PEFT adapter folder."""
    from safetensors.torch import save_file

    names = transformers_modules(model)
    layers = dict(lora_layers(model))
    tensors = {}
    for key, hf_module in names.items():
        name, part = key.split(":")
        layer = layers[name]
        tensors[f"{PREFIX}{hf_module}.lora_A.weight"] = layer.lora_A[part].detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{hf_module}.lora_B.weight"] = layer.lora_B[part].detach().float().cpu().contiguous()
    fam = family_for_config(model.config)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted({m.rsplit(".", 1)[1] for m in names.values()}),
        "bias": "none",
        "fan_in_fan_out": fam.name == "gpt2",
        "inference_mode": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    own = {"targets": list(settings.targets), "base_fingerprint": base_fingerprint(model)}
    metadata = {"format": "pt", "tegaki": json.dumps(own), EXPORT_MARK: "adapter"}
    out = Path(out)
    claim_export_folder(out, "adapter")
    atomic_write(out / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    atomic_write_json(out / CONFIG_FILE, config)
    return out


# PEFT module names -> tegaki targets, for adapters PEFT wrote itself (no "tegaki" entry)
_HF_TARGETS = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "c_fc": "fc",
}


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise TegakiError(f"{folder} is not a PEFT adapter folder (no {CONFIG_FILE})") from None
    except (ValueError, RecursionError) as e:
        raise TegakiError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise TegakiError(f"{path} is not a JSON object; the adapter is damaged")
    if config.get("peft_type") != "LORA":
        raise TegakiError(f"{path}: peft_type {config.get('peft_type')!r}; tegaki reads LoRA adapters only")
    r, alpha, modules = config.get("r"), config.get("lora_alpha"), config.get("target_modules", [])
    if type(r) is not int or r < 1:
        raise TegakiError(f"{path}: r must be a whole number >= 1, got {r!r}; the adapter is damaged")
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or alpha <= 0:
        raise TegakiError(f"{path}: lora_alpha must be a finite number > 0, got {alpha!r}; the adapter is damaged")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TegakiError(f"{path}: target_modules must be a list of module names, got {modules!r}")
    return config


def load_peft(model, folder: str | Path) -> LoRASettings:
    """Put the adapter in `folder` onto `model` (in place; merge it with tegaki.lora.merge_lora).
    Refuses an adapter made for another base model, saying which."""
    config = read_adapter_config(folder)
    if not (Path(folder) / WEIGHTS_FILE).is_file():
        raise TegakiError(f"{folder} holds {CONFIG_FILE} but not {WEIGHTS_FILE}; the adapter is incomplete")
    written = safetensors_metadata(Path(folder) / WEIGHTS_FILE).get("tegaki")
    try:
        own = json.loads(written) if written else config.get("tegaki", {})
    except (ValueError, RecursionError):
        raise TegakiError(f"{folder}: the adapter's tegaki metadata is not JSON; the adapter is damaged") from None
    if not isinstance(own, dict):
        raise TegakiError(f"{folder}: the adapter's tegaki entry is not a JSON object; the adapter is damaged")
    expected = own.get("base_fingerprint")
    if expected and expected != base_fingerprint(model):
        base = config.get("base_model_name_or_path") or "another model"
        raise TegakiError(
            f"the adapter in {folder} was made for another base model ({base}; fingerprint "
            f"{expected}, this model's is {base_fingerprint(model)}); load it onto its own base"
        )
    targets = own.get("targets") or [_HF_TARGETS.get(m, m) for m in config.get("target_modules", [])]
    settings = LoRASettings(int(config["r"]), float(config["lora_alpha"]), 0.0, tuple(targets))
    add_lora(model, settings)
    tensors = read_safetensors(Path(folder) / WEIGHTS_FILE)
    layers = dict(lora_layers(model))
    for key, hf_module in transformers_modules(model).items():
        name, part = key.split(":")
        for kind, params in (("lora_A", layers[name].lora_A), ("lora_B", layers[name].lora_B)):
            tensor = tensors.get(f"{PREFIX}{hf_module}.{kind}.weight")
            if tensor is None or tensor.shape != params[part].shape:
                got = "missing" if tensor is None else tuple(tensor.shape)
                raise TegakiError(
                    f"the adapter in {folder} does not fit this model: {hf_module}.{kind} is {got}, "
                    f"expected {tuple(params[part].shape)} (an adapter for another base model?)"
                )
            params[part].data.copy_(tensor)
    return settings


def load_lora_run(path: str | Path, device: str | torch.device = "cpu"):
    """(model with its adapters unmerged, LoRA settings, base model name) of a LoRA fine-tune's run folder,
    from its newest intact checkpoint -- what `export_peft` needs. (load_run_model merges them.)"""
    info = read_run_json(path)
    if not info.get("lora"):
        raise TegakiError(f'{path} is not a LoRA fine-tune (run.json has no "lora"); it has no adapter to write')
    checkpoint = find_checkpoint(Path(path), say=lambda m: None, need=(MODEL_FILE,))
    if checkpoint is None:
        raise TegakiError(f"{path} has no checkpoint yet")
    model = GPT(ModelConfig.from_dict(info["model_config"]))
    settings = LoRASettings.from_dict(info["lora"])
    add_lora(model, settings)
    load_model_tensors(model, read_model_tensors(checkpoint))
    return model.to(device).eval(), settings, (info.get("finetune") or {}).get("model", "")


def adapter_base(model):
    """The base model a LoRA model's adapter goes on, as a plain model: the model with its adapters
    left out (B zeroed, then merged: W + 0). Rows learned for added chat tokens stay: they are part
    of the base an adapter of such a run needs, since the base it started from has no such tokens."""
    base = copy.deepcopy(model)
    for _, layer in lora_layers(base):
        for b in layer.lora_B.values():
            b.data.zero_()
    return merge_lora(base)
