"""tegaki on one CUDA GPU, side by side in one run: parity, training and decoding speed, the CUDA tests.

    python -m benchmarks.bench_gpu             # about 5 minutes on one H100/H200; appends to RESULTS.md
    python -m benchmarks.bench_gpu --smoke     # every code path on the CPU at toy sizes, nothing appended

What it prints (and appends to benchmarks/RESULTS.md with the command, device and date):
  parity      tiny random GPT-2, Llama, Qwen3, GPT-OSS checkpoints written by transformers: the
              largest |logit difference| between tegaki and transformers on the GPU, fp32, TF32 off
  training    GPT-2 124M shapes (vocabulary 50,304), batch 16 x 1024, bf16 autocast, fused AdamW:
              tokens/s and MFU (against the chip's datasheet bf16 peak) of tegaki and of a
              nanoGPT-style baseline written in benchmarks/bench_train.py, eager and torch.compile'd;
              then `tegaki train` itself, compiled, on Shakespeare with GPT-2's tokenizer (its own
              tokens/s against its bare step)
  decoding    GPT-2 124M, random weights, a 32-token prompt + 128 new tokens, greedy: tokens/s of
              transformers' `generate` and of tegaki (default, and `compile=True`: a static cache
              replayed as a CUDA graph), batch 1 and 64, fp32 and bf16; greedy tokens compared in fp32
  tests       `pytest -m cuda tests/test_cuda.py`
  host CPU    where the machine's CPU has AMX (bf16 matrix units), the CPU goals that need one, on 2
              threads: GPT-2 124M decoding, batch 1, a 32-token prompt + 64 greedy tokens, transformers
              fp32 against tegaki fp32, bf16 and int8 as `tegaki generate` runs them (3 interleaved
              rounds, ratios within rounds); one training step (bench_train.py's shape) of tegaki and
              the nanoGPT-style baseline in fp32 and in bf16 autocast (and nanoGPT's own model.py with
              --nanogpt DIR); and the dtype `--dtype auto` picks there. Without AMX it says so.

Without CUDA it says so and exits 0. Each timed figure is the median of several repeats, with the
range (min-max) beside it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train import SHAPE, Baseline, build, time_steps
from benchmarks.common import RESULTS, ROOT, Report, append_section, command_line, median_range
from benchmarks.contestants import Job, ratios, run_rounds, tegaki_contestant, transformers_contestant
from benchmarks.engines import tegaki_variant
from tegaki.config import ModelConfig
from tegaki.device import cpu_bf16_hardware, cpu_has, cpu_summary, mfu, peak_flops, pick_dtype, synchronize
from tegaki.generate import generate
from tegaki.load import export_hf, from_pretrained
from tegaki.model import GPT
from tegaki.train import flops_per_token

COUNT = "{:,.0f}"  # tokens/s in the tables: median (range)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls, the device waited for."""
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


# --- parity --------------------------------------------------------------------------------------


def parity(report: Report, device: torch.device, tmp: Path) -> None:
    import transformers

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    small = dict(
        vocab_size=97,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
    )
    cases = {
        "GPT-2": transformers.GPT2Config(vocab_size=97, n_positions=128, n_layer=2, n_head=4, n_embd=64),
        "Llama": transformers.LlamaConfig(**small),
        "Qwen3": transformers.Qwen3Config(**small, head_dim=16),
        "GPT-OSS": transformers.GptOssConfig(
            **small | dict(intermediate_size=32),
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
        ),
    }
    report("| family | max abs logit difference vs transformers (fp32, TF32 off) | greedy tokens equal |")
    report("| --- | ---: | --- |")
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
    for name, config in cases.items():
        torch.manual_seed(0)
        config._attn_implementation = "eager"
        hf = transformers.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        hf.save_pretrained(tmp / name)
        hf = hf.to(device)
        ours = from_pretrained(tmp / name, device=device)
        with torch.no_grad():
            diff = (ours(ids) - hf(ids).logits).abs().max().item()
            want = hf.generate(ids[:1, :8], max_new_tokens=16, do_sample=False, pad_token_id=0)
        same = torch.equal(generate(ours, ids[:1, :8], 16, temperature=0), want)
        report(f"| {name} | {diff:.2e} | {same} |")


# --- training ------------------------------------------------------------------------------------


def train_rows(report: Report, device: torch.device, smoke: bool) -> dict[str, float]:
    config = ModelConfig.preset("tiny" if smoke else "gpt2").replace(vocab_size=512 if smoke else 50304)
    batch, block = (2, 64) if smoke else (16, 1024)
    steps, warmup = (2, 1) if smoke else (10, 3)
    dtype = "fp32" if smoke else "bf16"
    peak, source = peak_flops(device, dtype)
    flops_tok = flops_per_token(config, block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (batch, block), generator=gen).to(device)
    y = torch.randint(0, config.vocab_size, (batch, block), generator=gen).to(device)

    def contender(kind: str, compiled: bool):
        torch.manual_seed(0)
        if kind == "tegaki":
            model = GPT(config).to(device)
        else:
            model = Baseline(config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.block_size)
            model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
        run = torch.compile(model) if compiled else model

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                _, loss = run(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    names = [
        ("nanoGPT-style baseline", "baseline", False),
        ("tegaki", "tegaki", False),
        ("nanoGPT-style baseline, compiled", "baseline", True),
        ("tegaki, compiled", "tegaki", True),
    ]
    steps_of = {name: contender(kind, compiled) for name, kind, compiled in names}
    for step in steps_of.values():  # warm-up: kernel choice, the allocator, compiling
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps_of}
    for _ in range(steps):  # interleaved
        for name, step in steps_of.items():
            times[name] += timed(step, device, 1)
    report(
        f"{config.n_layer} layers x {config.n_embd}, batch {batch} x {block}, {dtype} autocast, fused AdamW; "
        f"peak {peak / 1e12:,.1f} TFLOP/s ({source})"
    )
    report("| contender | tokens/s, median (range) | MFU | vs baseline, same mode |")
    report("| --- | ---: | ---: | ---: |")
    tps = {name: [batch * block / t for t in ts] for name, ts in times.items()}
    for name in steps_of:
        base = "nanoGPT-style baseline" + (", compiled" if "compiled" in name else "")
        ratio = statistics.median(tps[name]) / statistics.median(tps[base])
        report(
            f"| {name} | {median_range(tps[name], COUNT)} | {mfu(statistics.median(tps[name]), flops_tok, peak):.1%} | "
            f"{ratio:.2f}x |"
        )
    return {name: statistics.median(v) for name, v in tps.items()}


def train_loop_row(report: Report, device: torch.device, tmp: Path, bare: float | None, smoke: bool) -> None:
    """`tegaki train` itself, compiled: what a user gets, against the bare step above."""
    from tegaki.checkpoint import read_metrics
    from tegaki.train import TrainConfig, train

    cfg = TrainConfig(
        data="shakespeare",
        preset="tiny" if smoke else "gpt2",
        tokenizer="gpt2",
        out=str(tmp / "run"),
        max_steps=4 if smoke else 40,
        batch_size=2 if smoke else 16,
        block_size=64 if smoke else 1024,
        device=str(device),
        dtype="fp32" if smoke else "bf16",
        compile=not smoke,
        eval_every=1000,
        sample_every=0,
        save_every=1000,
        progress=False,
    )
    train(cfg)
    records = [r for r in read_metrics(Path(cfg.out) / "metrics.jsonl") if "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in records[len(records) // 2 :]]  # after compiling and warm-up
    line = f"`tegaki train` ({cfg.preset}, compiled={cfg.compile}): {median_range(steady, COUNT)} tokens/s"
    line += " over its last steps"
    if bare:
        line += f", {statistics.median(steady) / bare:.0%} of the bare compiled step"
    report(line)


# --- decoding ------------------------------------------------------------------------------------


def decode_runs(hf, ours, prompt, new: int, outs: dict, compiled: bool) -> dict:
    """name -> a function generating once and keeping its tokens in outs[name]. (The smoke run on a
    CPU leaves compiling out: it is the GPU's CUDA graph that is measured.)"""

    def hf_run():
        with torch.no_grad():
            outs["hf"] = hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def ours_run(label: str, compile: bool):
        def run():
            outs[label] = generate(ours, prompt, new, temperature=0, compile=compile)

        return run

    return {"hf": hf_run, "default": ours_run("default", False), "compiled": ours_run("compiled", compiled)}


def decode_rows(report: Report, device: torch.device, tmp: Path, smoke: bool) -> None:
    from transformers import GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    config = ModelConfig.preset("tiny").replace(vocab_size=512) if smoke else ModelConfig.preset("gpt2")
    new, repeats = (8, 1) if smoke else (128, 3)
    torch.manual_seed(0)
    base = GPT(config).eval()
    export_hf(base, tmp / "gpt2")
    report(f"decoding: {config.n_layer} layers x {config.n_embd}, prompt 32 + {new} new tokens, greedy")
    report(
        "| batch | dtype | transformers generate | tegaki default | tegaki compile=True (CUDA graph) | "
        "default / transformers | compiled / transformers |"
    )
    report("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for dtype in (torch.float32, torch.bfloat16):
        hf = GPT2LMHeadModel.from_pretrained(tmp / "gpt2", torch_dtype=dtype).to(device).eval()
        ours = GPT(config).to(device=device, dtype=dtype).eval()
        ours.load_state_dict(base.state_dict())
        for batch in (1, 4 if smoke else 64):
            prompt = torch.randint(0, config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(1))
            prompt = prompt.to(device)
            outs = {}
            runs = decode_runs(hf, ours, prompt, new, outs, compiled=not smoke)
            for fn in runs.values():
                fn()  # warm-up (compiles)
            tps = {name: [batch * new / t for t in timed(fn, device, repeats)] for name, fn in runs.items()}
            med = {name: statistics.median(v) for name, v in tps.items()}
            label = str(dtype).replace("torch.", "")
            cells = [median_range(tps[name], COUNT) for name in ("hf", "default", "compiled")]
            report(
                f"| {batch} | {label} | {' | '.join(cells)} | {med['default'] / med['hf']:.2f}x | "
                f"{med['compiled'] / med['hf']:.2f}x |"
            )
            if dtype == torch.float32:
                report(
                    f"(batch {batch}, fp32: greedy tokens equal to transformers: "
                    f"{torch.equal(outs['default'], outs['hf'])}; compiled equal to default: "
                    f"{torch.equal(outs['compiled'], outs['default'])})"
                )
        del hf, ours


# --- the host CPU, where it has AMX -------------------------------------------------------------


def host_cpu_rows(report: Report, tmp: Path, smoke: bool, nanogpt: str | None) -> None:
    """The goals of a CPU with AMX, on this machine's CPU and 2 threads (see the module's docstring).
    The smoke run takes this path on any CPU, at toy sizes."""
    from transformers import GPT2LMHeadModel

    if not (smoke or cpu_has("amx_bf16")):
        report(f"host CPU ({cpu_summary()}): no AMX, so the AMX rows are left out.")
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        auto = pick_dtype("auto", torch.device("cpu"))
        report(f"host CPU, 2 threads: {cpu_summary()}; `--dtype auto` on it picks {auto}")
        config = ModelConfig.preset("tiny").replace(vocab_size=512) if smoke else ModelConfig.preset("gpt2")
        new, rounds = (8, 1) if smoke else (64, 3)
        torch.manual_seed(0)
        base = GPT(config).eval()
        export_hf(base, tmp / "cpu-gpt2")
        hf = GPT2LMHeadModel.from_pretrained(tmp / "cpu-gpt2").eval()
        contestants = [transformers_contestant("transformers fp32", hf)]
        contestants += [
            tegaki_contestant(f"tegaki {m}", tegaki_variant(base, m), False) for m in ("fp32", "bf16", "int8")
        ]
        prompt = torch.randint(0, config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
        job = Job("batch 1", prompt, new)
        rows = run_rounds([job], contestants, rounds)
        reference = rows[job.name, "transformers fp32"]
        report(f"decoding: batch 1, prompt 32 + {new} greedy tokens, {rounds} interleaved rounds")
        report("| contestant | tokens/s | x transformers fp32 (within rounds) |")
        report("| --- | ---: | ---: |")
        for c in contestants:
            row = rows[job.name, c.name]
            rates, x = median_range(row.rates, "{:,.1f}"), median_range(ratios(row, reference), "{:.2f}")
            report(f"| {c.name} | {rates} | {x} |")
        same = rows[job.name, "tegaki fp32"].tokens == reference.tokens
        report(f"(tegaki fp32's greedy tokens equal transformers fp32's: {same})")
        report()
        batch, block, steps = (2, 32, 2) if smoke else (8, 256, 5)
        shape = dict(SHAPE, vocab_size=512, n_layer=2, n_embd=64, n_head=2) if smoke else SHAPE
        # bf16 autocast where the CPU multiplies bf16 in hardware; emulated, a step takes minutes
        dtypes = ("fp32", "bf16") if cpu_bf16_hardware() else ("fp32",)
        kinds = ["tegaki", "baseline"] + (["nanoGPT"] if nanogpt else [])
        contenders = [build(kind, d, batch, block, False, nanogpt, shape) for d in dtypes for kind in kinds]
        time_steps(contenders, 1, steps)
        tokens = batch * block
        fp32 = {c.name.split()[0]: statistics.median(c.times) for c in contenders if c.dtype == "fp32"}
        size = f"{shape['n_layer']} layers x {shape['n_embd']}"
        report(f"training: {size}, batch {batch} x {block}, {steps} interleaved steps")
        report("| contender | tokens/s | bf16 autocast / fp32 |")
        report("| --- | ---: | ---: |")
        for c in contenders:
            speedup = fp32[c.name.split()[0]] / statistics.median(c.times)
            report(f"| {c.name} | {median_range([tokens / t for t in c.times], COUNT)} | {speedup:.2f}x |")
    finally:
        torch.set_num_threads(threads)


# --- the run -------------------------------------------------------------------------------------


def cuda_tests(report: Report) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "cuda", "-o", "addopts=", "-rA", "-q", "tests/test_cuda.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    summary = [line for line in done.stdout.splitlines() if line.startswith(("PASSED", "FAILED", "ERROR", "SKIPPED"))]
    print("\n".join(summary))
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "(no output)"
    report(f"`pytest -m cuda tests/test_cuda.py`: {last}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU: check the script, append nothing")
    p.add_argument("--no-append", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--skip", nargs="*", default=[], choices=["parity", "train", "loop", "decode", "tests", "cpu"])
    p.add_argument(
        "--nanogpt", metavar="DIR", help="a nanoGPT checkout: the host CPU's training rows time its model.py too"
    )
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA GPU here (torch.cuda.is_available() is False); nothing to measure.")
        return
    device = torch.device("cpu") if args.smoke else torch.device("cuda:0")
    report = Report()
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    name = "CPU (smoke run)" if args.smoke else torch.cuda.get_device_name(device)
    report(f"### GPU run, {datetime.date.today()}: {name}")
    report()
    report(f"`{command_line('bench_gpu')}`")
    report(
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {hf_version}, Python "
        f"{platform.python_version()}"
    )
    report()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        if "parity" not in args.skip:
            parity(report, device, tmp)
            report()
        bare = None
        if "train" not in args.skip:
            bare = train_rows(report, device, args.smoke).get("tegaki, compiled")
            report()
        if "loop" not in args.skip:
            train_loop_row(report, device, tmp, bare, args.smoke)
            report()
        if "decode" not in args.skip:
            decode_rows(report, device, tmp, args.smoke)
            report()
        if "cpu" not in args.skip:
            host_cpu_rows(report, tmp, args.smoke, args.nanogpt)
            report()
    if "tests" not in args.skip and not args.smoke:
        cuda_tests(report)
        report()
    if not args.smoke and not args.no_append:
        append_section(RESULTS, report.text())  # written beside it and renamed over it
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
