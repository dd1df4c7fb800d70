"""The run folder's formats (tegaki/checkpoint/): three-projection q_proj/k_proj/v_proj tensors and
their AdamW state become one qkv, exactly; the metrics reader skips what a kill left."""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from tegaki.checkpoint import (
    locked_run_folder,
    read_metrics,
    restore_rng_state,
    rng_state,
    upgrade_optimizer_state,
    upgrade_state_dict,
    write_run_json,
)
from tegaki.errors import TegakiError

C, H, K, D = 32, 4, 2, 8  # model width, query heads, key/value heads (GQA), head size


def old_layer_tensors(layer: int, bias: bool = True) -> dict[str, torch.Tensor]:
    prefix = f"blocks.{layer}.attn"
    rows = {"q_proj": H * D, "k_proj": K * D, "v_proj": K * D}
    out = {}
    for name, n in rows.items():
        out[f"{prefix}.{name}.weight"] = torch.randn(n, C)
        if bias:
            out[f"{prefix}.{name}.bias"] = torch.randn(n)
    out[f"{prefix}.o_proj.weight"] = torch.randn(C, H * D)
    return out


def test_old_q_k_v_tensors_become_one_qkv_stacked_q_then_k_then_v():
    old = {
        "wte.weight": torch.randn(50, C),
        **old_layer_tensors(0),
        **old_layer_tensors(1, bias=False),
        "ln_f.weight": torch.randn(C),
    }
    new = upgrade_state_dict(old)
    assert list(new) == [
        "wte.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.qkv.bias",
        "blocks.0.attn.o_proj.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.1.attn.o_proj.weight",
        "ln_f.weight",
    ]
    for layer in (0, 1):
        p = f"blocks.{layer}.attn"
        assert new[f"{p}.qkv.weight"].shape == ((H + 2 * K) * D, C)
        assert torch.equal(new[f"{p}.qkv.weight"][: H * D], old[f"{p}.q_proj.weight"])
        assert torch.equal(new[f"{p}.qkv.weight"][H * D : (H + K) * D], old[f"{p}.k_proj.weight"])
        assert torch.equal(new[f"{p}.qkv.weight"][(H + K) * D :], old[f"{p}.v_proj.weight"])
        assert new[f"{p}.o_proj.weight"] is old[f"{p}.o_proj.weight"]
    assert torch.equal(
        new["blocks.0.attn.qkv.bias"],
        torch.cat([old[f"blocks.0.attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj")]),
    )
    assert "blocks.0.attn.q_proj.weight" in old  # the caller's dict is left as it was


def test_one_qkv_linear_computes_what_the_three_did():
    old = old_layer_tensors(0)
    new = upgrade_state_dict(old)
    x = torch.randn(3, 5, C)
    qkv = nn.functional.linear(x, new["blocks.0.attn.qkv.weight"], new["blocks.0.attn.qkv.bias"])
    q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
    for part, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
        want = nn.functional.linear(x, old[f"blocks.0.attn.{name}.weight"], old[f"blocks.0.attn.{name}.bias"])
        assert torch.equal(part, want), name


def test_tensors_of_today_are_left_alone():
    tensors = {"blocks.0.attn.qkv.weight": torch.randn((H + 2 * K) * D, C), "wte.weight": torch.randn(50, C)}
    assert upgrade_state_dict(tensors) is tensors
    state = {"state": {"wte.weight": {"step": torch.tensor(3.0)}}, "param_groups": [{"params": ["wte.weight"]}]}
    assert upgrade_optimizer_state(state) is state


def test_a_layer_with_a_missing_part_is_refused():
    old = old_layer_tensors(0)
    del old["blocks.0.attn.v_proj.bias"]
    with pytest.raises(TegakiError, match="v_proj.bias"):
        upgrade_state_dict(old)


class OldAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(C, H * D), nn.Linear(C, K * D), nn.Linear(C, K * D)
        self.o_proj = nn.Linear(H * D, C)

    def forward(self, x):
        return self.o_proj(self.q_proj(x)) + (self.k_proj(x).sum() + self.v_proj(x).square().sum())


class NewAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(C, (H + 2 * K) * D)
        self.o_proj = nn.Linear(H * D, C)

    def forward(self, x):
        q, k, v = self.qkv(x).split([H * D, K * D, K * D], dim=-1)
        return self.o_proj(q) + (k.sum() + v.square().sum())


class Wrapped(nn.Module):
    """A model holding one attention layer as `attn`: its parameters are named as in GPT's blocks."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.attn = attention

    def forward(self, x):
        return self.attn(x)


def adamw(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95)
    )


def test_an_old_optimizer_state_resumes_the_same_steps_on_the_joined_weights():
    """AdamW on q, k and v apart, saved as `tegaki train` saves it (keyed by parameter name), then
    continued on the joined qkv: the weights after two more steps are the old code's weights."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    torch.manual_seed(0)
    old = Wrapped(OldAttention())
    old_opt = adamw(old)
    batches = [torch.randn(4, C) for _ in range(5)]
    for x in batches[:3]:
        old(x).square().mean().backward()
        old_opt.step()
        old_opt.zero_grad()
    buffer = io.BytesIO()  # through a file, as optimizer.pt: nothing shared with the live optimizer
    torch.save(get_optimizer_state_dict(old, old_opt), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert "attn.q_proj.weight" in saved["state"]

    new = Wrapped(NewAttention())
    new.load_state_dict(upgrade_state_dict(old.state_dict()))
    new_opt = adamw(new)
    set_optimizer_state_dict(new, new_opt, upgrade_optimizer_state(saved))
    for x in batches[3:]:
        for model, opt in ((old, old_opt), (new, new_opt)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for name, tensor in upgrade_state_dict(old.state_dict()).items():
        torch.testing.assert_close(new.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    joined = get_optimizer_state_dict(new, new_opt)["state"]["attn.qkv.weight"]
    assert joined["exp_avg"].shape == ((H + 2 * K) * D, C) and float(joined["step"]) == 5


def test_optimizer_states_that_differ_in_step_are_refused():
    torch.manual_seed(0)
    state = {
        "state": {
            f"attn.{n}.weight": {
                "step": torch.tensor(3.0),
                "exp_avg": torch.zeros(2, C),
                "exp_avg_sq": torch.zeros(2, C),
            }
            for n in ("q_proj", "k_proj", "v_proj")
        },
        "param_groups": [{"params": ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"]}],
    }
    joined = upgrade_optimizer_state(state)
    assert joined["param_groups"][0]["params"] == ["attn.qkv.weight"]
    assert joined["state"]["attn.qkv.weight"]["exp_avg"].shape == (6, C)
    state["state"]["attn.v_proj.weight"]["step"] = torch.tensor(4.0)
    with pytest.raises(TegakiError, match="step"):
        upgrade_optimizer_state(state)


def test_read_metrics_skips_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        json.dumps({"step": 1, "loss": 3.0})
        + "\n"
        + json.dumps({"step": 1, "kind": "val"})
        + "\n"
        + "[1, 2]\n"
        + '{"step": 2, "lo'
    )
    assert read_metrics(path) == [{"step": 1, "loss": 3.0}, {"step": 1, "kind": "val"}]


def run_info(n_layer: int = 2, batch_size: int = 8, lora=None) -> dict:
    return {
        "model_config": {"n_layer": n_layer},
        "tokenizer": "gpt2",
        "train": {"batch_size": batch_size},
        "lora": lora,
    }


def test_run_json_refuses_another_model_always_and_other_settings_once_trained(tmp_path):
    """run.json is checked where it is written: the same model (and LoRA settings), and once a
    checkpoint exists, the same settings among the resume keys."""
    write_run_json(tmp_path, run_info(), ("batch_size",))
    write_run_json(tmp_path, run_info(batch_size=4), ("batch_size",))  # no checkpoint yet: a new start
    assert json.loads((tmp_path / "run.json").read_text())["train"]["batch_size"] == 4
    for other in (run_info(n_layer=3, batch_size=4), run_info(batch_size=4, lora={"r": 8})):
        with pytest.raises(TegakiError, match="another model"):
            write_run_json(tmp_path, other, ("batch_size",))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(TegakiError, match="other batch_size"):
        write_run_json(tmp_path, run_info(batch_size=8), ("batch_size",))
    assert json.loads((tmp_path / "run.json").read_text()) == run_info(batch_size=4)  # refused: unchanged


def test_the_random_generators_come_back_as_they_were():
    import random

    import numpy as np

    saved = rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(saved, buffer := io.BytesIO())  # as optimizer.pt holds it: loadable with weights_only
    buffer.seek(0)
    restore_rng_state(torch.load(buffer, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


def test_one_process_per_run_folder(tmp_path):
    said = []
    with locked_run_folder(tmp_path, said.append):
        assert (tmp_path / ".lock").read_text().strip().isdigit()
        with pytest.raises(TegakiError, match="is in use"), locked_run_folder(tmp_path, said.append):
            pass
        with locked_run_folder(tmp_path, said.append, enabled=False):  # a rank that follows: no lock of its own
            pass
    assert not (tmp_path / ".lock").exists() and said == []
