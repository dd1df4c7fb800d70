"""The three-projection format: run folders whose attention holds q_proj, k_proj and v_proj.

The model has one projection, `qkv`, whose output rows are q's, then k's, then v's. A checkpoint in
the three-projection format is joined into it wherever a run is read (`upgrade_state_dict`), and
its optimizer state too when the run resumes (`upgrade_optimizer_state`); the joined layer
computes exactly what the three did.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from tegaki.errors import TegakiError

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # in the order their rows are stacked in qkv
_PROJECTION_KEY = re.compile(r"^(?P<layer>.+)\.(?P<proj>q_proj|k_proj|v_proj)\.(?P<kind>weight|bias)$")


def _joined_name(key: str) -> tuple[str, list[str]] | None:
    """For a q/k/v key: (the qkv key it becomes, the three keys joined into it)."""
    match = _PROJECTION_KEY.match(key)
    if match is None:
        return None
    layer, kind = match["layer"], match["kind"]
    return f"{layer}.qkv.{kind}", [f"{layer}.{proj}.{kind}" for proj in _PROJECTIONS]


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
            raise TegakiError(f"a three-projection checkpoint has {key} but not {', '.join(missing)}; it is damaged")
        if new_key in entries:
            raise TegakiError(f"a checkpoint holds both {new_key} and {key}; it is damaged")
        out[new_key] = join(new_key, [entries[p] for p in parts])
    return out


def upgrade_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's tensors named as the model names them; tensors with one qkv pass unchanged.

    `blocks.{i}.attn.qkv.weight` = cat([q_proj.weight (H*D, C), k_proj.weight (K*D, C),
    v_proj.weight (K*D, C)], dim=0), and the same for the biases. The layer computes exactly what
    the three did."""
    if not any(_joined_name(key) for key in tensors):
        return tensors
    return _join_by_layer(tensors, lambda _, parts: torch.cat(parts, dim=0))  # (H*D + 2*K*D, ...)


def upgrade_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """A three-projection run's optimizer state (keyed by parameter name, as
    `get_optimizer_state_dict` writes it) for the model with one qkv projection; a state with one
    qkv passes unchanged.

    AdamW works element by element: its moments for qkv are q's, k's and v's moments stacked the
    way the weights are (`exp_avg`, `exp_avg_sq` joined along dim 0), and the step count, the same
    for all three, is kept. The resumed run then takes the step the three projections would have taken."""
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
