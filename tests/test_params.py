"""`tegaki params`: the counts are the model's own, the parts add up, nothing is allocated."""

import json

import pytest

from tegaki.analysis.params import count_parameters, resolve_config
from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.model import GPT


def run_cli(capsys, *argv):
    code = main(["params", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv, total",
    [
        (["gpt2"], "124,439,808"),
        (["gpt2", "--set", "qkv_bias=false"], "124,412,160"),
        (["gpt2", "--set", "tie_embeddings=false"], "163,037,184"),
        (["gpt2-medium"], "354,823,168"),
    ],
)
def test_cli_prints_published_totals(capsys, argv, total):
    code, out, _ = run_cli(capsys, *argv)
    assert code == 0
    total_line = next(line for line in out.splitlines() if line.startswith("total"))
    assert total in total_line


def test_gpt_oss_20b_total_and_active(capsys):
    code, out, _ = run_cli(capsys, "gpt-oss-20b")
    assert code == 0
    assert "20,914,757,184" in next(line for line in out.splitlines() if line.startswith("total"))
    assert "3,608,307,264" in next(line for line in out.splitlines() if line.startswith("active"))
    info = count_parameters(ModelConfig.preset("gpt-oss-20b"))
    assert (info["total"], info["active"]) == (20_914_757_184, 3_608_307_264)


@pytest.mark.parametrize(
    "preset", ["gpt2", "tiny", "tiny-llama", "tiny-qwen3", "tiny-gpt-oss", "tiny-gated", "gpt-oss-20b"]
)
def test_parts_sum_to_total_and_match_model(preset):
    config = ModelConfig.preset(preset)
    info = count_parameters(config)
    assert sum(p["count"] for p in info["parts"]) == info["total"]
    assert info["per_block_total"] * config.n_layer == sum(r["all_layers"] for r in info["per_block"])
    assert abs(sum(p["share"] for p in info["parts"]) - 1.0) < 1e-9
    if preset.startswith("tiny"):  # a real model (with storage) agrees with the meta count
        assert GPT(config).num_parameters() == info["total"]
    assert info["memory_bytes"] == {"fp32": 4 * info["total"], "bf16": 2 * info["total"], "int8": info["total"]}


def test_moe_active_counts_k_of_e_experts():
    config = ModelConfig.preset("tiny-gpt-oss")
    info = count_parameters(config)
    experts = sum(p["count"] for p in info["parts"] if p["group"] == "experts")
    wte = config.vocab_size * config.n_embd
    # Halving the number of chosen experts removes exactly a quarter of the expert weights.
    fewer = count_parameters(config.replace(n_experts_per_tok=1))
    assert info["active"] - fewer["active"] == experts // 4
    assert info["active"] == info["total"] - wte - experts + experts * 2 // 4
    assert count_parameters(ModelConfig.preset("tiny"))["active"] is None  # dense: no such notion


def test_per_block_shows_each_kind_of_weight():
    names = {r["name"] for r in count_parameters(ModelConfig.preset("tiny-gpt-oss"))["per_block"]}
    assert {
        "attn.qkv",
        "attn.o_proj",
        "attn.sinks",
        "mlp.router",
        "mlp.w_in",
        "mlp.w_out",
        "ln_1",
        "ln_2",
    } <= names
    names = {r["name"] for r in count_parameters(ModelConfig.preset("tiny-gated"))["per_block"]}
    assert {"attn.gate_proj", "mlp.gate", "mlp.up", "mlp.down"} <= names


def test_nothing_is_allocated_for_a_huge_model():
    info = count_parameters(ModelConfig.preset("gpt-oss-120b"))  # ~117B parameters, ~435 GiB in fp32
    assert info["total"] > 100_000_000_000


def test_json_output(capsys):
    code, out, _ = run_cli(capsys, "tiny", "--set", "n_layer=2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["total"] == GPT(ModelConfig.preset("tiny").replace(n_layer=2)).num_parameters()
    assert data["overrides"] == ["n_layer=2"]


def test_run_folder_and_transformers_folder(tmp_path):
    config = ModelConfig.preset("tiny").replace(n_layer=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"model_config": config.to_dict(), "tokenizer": "gpt2"}))
    assert resolve_config(str(run)) == config

    from tegaki.hf import config_to_hf

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(config_to_hf(config)))
    assert count_parameters(resolve_config(str(hf)))["total"] == GPT(config).num_parameters()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["no-such-model"], "Known presets: gpt2"),
        (["./missing/folder"], "no such preset or folder"),
        (["gpt2", "--set", "n_heads=3"], "--set expects field=value"),
        (["gpt2", "--set", "n_head=7"], "does not divide n_embd"),
    ],
)
def test_clear_errors(capsys, argv, expected):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err
