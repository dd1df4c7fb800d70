"""Tensors both ways: the family's WEIGHTS rules applied to a state dict, with one error that lists
every missing, unexpected or mis-shaped tensor."""

from __future__ import annotations

import re

import torch

from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.hf.config import family_for_config
from tegaki.hf.tables import IGNORED, Family, Rule


def _expand(rules: list[Rule], n_layer: int) -> list[Rule]:
    out = []
    for r in rules:
        if "{i}" in r.ours:
            out += [Rule(tuple(h.format(i=i) for h in r.hf), r.ours.format(i=i), r.kind) for i in range(n_layer)]
        else:
            out.append(r)
    return out


def _to_ours(kind: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    if kind == "same":
        return tensors[0]
    if kind == "transpose":
        return tensors[0].t().contiguous()
    if kind == "join":  # q, k, v (out_i, ...) -> (sum of out_i, ...)
        return torch.cat(tensors, dim=0)
    raise ValueError(kind)


def _to_hf(kind: str, tensor: torch.Tensor, config: ModelConfig) -> list[torch.Tensor]:
    if kind == "same":
        return [tensor]
    if kind == "transpose":
        return [tensor.t().contiguous()]
    if kind == "join":
        return [t.contiguous() for t in tensor.split(config.qkv_sizes, dim=0)]
    raise ValueError(kind)


def _normalise_gpt2_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hub GPT-2 checkpoints have no "transformer." prefix; save_pretrained writes it. Accept both."""
    out = {}
    for key, value in state.items():
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key
        out[key] = value
    return out


def state_dict_from_hf(model, hf_state: dict[str, torch.Tensor], fam: Family) -> dict[str, torch.Tensor]:
    """Map transformers tensors onto the model's names; one error lists every problem."""
    if fam.name == "gpt2":
        hf_state = _normalise_gpt2_keys(hf_state)
    ours_expected = model.state_dict()
    result: dict[str, torch.Tensor] = {}
    missing, mis_shaped = [], []
    used = set()
    for rule in _expand(fam.weights, model.config.n_layer):
        if rule.ours not in ours_expected:
            continue  # this model has no such parameter (a bias switched off, say)
        if rule.hf == ("lm_head.weight",) and model.config.tie_embeddings:
            used.add("lm_head.weight")  # tied: the head is the embedding; a stored copy is fine and unused
            continue
        absent = [h for h in rule.hf if h not in hf_state]
        if absent:
            missing += absent
            continue
        used.update(rule.hf)
        expected = _to_hf(rule.kind, ours_expected[rule.ours], model.config)  # the file's shapes
        wrong = [
            f"{h}: got {tuple(hf_state[h].shape)}, expected {tuple(e.shape)}"
            for h, e in zip(rule.hf, expected)
            if hf_state[h].shape != e.shape
        ]
        if wrong:
            mis_shaped += wrong
            continue
        result[rule.ours] = _to_ours(rule.kind, [hf_state[h] for h in rule.hf])
    unexpected = [k for k in hf_state if k not in used and not any(re.search(p, k) for p in IGNORED)]
    if missing or unexpected or mis_shaped:
        lines = [f"the checkpoint does not fit a {fam.architecture} built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" …" if len(items) > 20 else ""))
        raise TegakiError("\n".join(lines))
    if model.config.tie_embeddings:
        result["lm_head.weight"] = result["wte.weight"]
    return result


def state_dict_to_hf(model) -> dict[str, torch.Tensor]:
    fam = family_for_config(model.config)
    ours = model.state_dict()
    out = {}
    for rule in _expand(fam.weights, model.config.n_layer):
        if rule.ours not in ours:
            continue
        if rule.hf == ("lm_head.weight",) and model.config.tie_embeddings:
            continue
        for name, tensor in zip(rule.hf, _to_hf(rule.kind, ours[rule.ours].detach().cpu(), model.config)):
            out[name] = tensor.contiguous()
    return out
