"""On a CUDA GPU, for real: the same logits as the CPU, cache = no cache, CUDA-graph decoding = eager,
generation from the command line, and training that checkpoints and resumes. Skipped without a GPU
(`pytest -m cuda` runs just these)."""

import pytest
import torch

from tegaki.cli import main
from tegaki.config import ModelConfig
from tegaki.errors import TegakiError
from tegaki.generate import generate
from tegaki.model import GPT
from tegaki.quant import quantize_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"),
]

FAMILIES = ["tiny", "tiny-llama", "tiny-qwen3", "tiny-gpt-oss", "tiny-gated"]


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: the comparisons below are about the code, not about TF32's 10-bit mantissa."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def random_model(name: str, **changes) -> GPT:
    torch.manual_seed(0)
    config = ModelConfig.preset(name).replace(n_layer=2, **changes)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the initial values, so every weight matters
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_gpu_logits_equal_cpu_logits(name):
    model = random_model(name)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        got = model.to("cuda")(ids.cuda()).cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_equals_no_cache_on_the_gpu(name):
    model = random_model(name).cuda()
    prompt = torch.randint(0, model.config.vocab_size, (1, 7), device="cuda")
    assert torch.equal(
        generate(model, prompt, 24, temperature=0), generate(model, prompt, 24, temperature=0, use_cache=False)
    )


@pytest.mark.parametrize("name", ["tiny", "tiny-llama", "tiny-gpt-oss"])
def test_cuda_graph_decoding_gives_the_eager_tokens(name):
    changes = {"moe_impl": "dense"} if name == "tiny-gpt-oss" else {}
    model = random_model(name, **changes).cuda()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9), device="cuda")
    eager = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), eager)


def test_bf16_decoding_runs_and_mostly_agrees():
    model = random_model("tiny-llama").cuda()
    prompt = torch.randint(0, model.config.vocab_size, (1, 9), device="cuda")
    fp32 = generate(model, prompt, 16, temperature=0)
    bf16 = generate(model.to(torch.bfloat16), prompt, 16, temperature=0)
    assert bf16.shape == fp32.shape and torch.equal(bf16[:, :9], fp32[:, :9])


def test_quantizing_on_the_gpu_says_what_to_do_instead():
    with pytest.raises(TegakiError, match="decode in bf16"):
        quantize_model(random_model("tiny").cuda(), "int8")


def test_generate_command_runs_on_cuda(tmp_path, capsys):
    from tegaki.load import export_hf
    from tegaki.tokenizer import load

    model = random_model("tiny", vocab_size=50257)
    export_hf(model, tmp_path / "m", tokenizer=load("gpt2"))
    args = [
        "generate",
        "--model",
        str(tmp_path / "m"),
        "--device",
        "cuda",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "Hello",
    ]
    assert main(args) == 0
    on_gpu = capsys.readouterr().out
    assert main(args[:4] + ["cpu", "--dtype", "fp32"] + args[5:]) == 0
    assert capsys.readouterr().out == on_gpu and on_gpu.startswith("Hello")


def test_training_on_the_gpu_checkpoints_and_resumes_exactly(tmp_path, capsys):
    """A few steps on cuda (auto device, bf16 auto dtype), stopped, then resumed to the end: the
    resumed run's losses equal an uninterrupted one's, and the run folder loads back on the CPU."""
    from tegaki.checkpoint import load_run_model, read_metrics

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 400)
    common = [
        "train",
        "--data",
        str(corpus),
        "--preset",
        "tiny",
        "--device",
        "cuda",
        "--batch-size",
        "4",
        "--block-size",
        "64",
        "--eval-every",
        "4",
        "--eval-batches",
        "2",
        "--sample-every",
        "0",
        "--save-every",
        "4",
        "--no-progress",
        "--set",
        "n_layer=2",
    ]

    def losses(out):
        return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r.get("kind") is None]

    assert main(common + ["--out", str(tmp_path / "whole"), "--max-steps", "8"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--max-steps", "4"]) == 0
    assert main(common + ["--out", str(tmp_path / "split"), "--max-steps", "8"]) == 0
    assert len(losses(tmp_path / "whole")) == 8
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    model = load_run_model(tmp_path / "split")
    assert model.device.type == "cpu"
    capsys.readouterr()
