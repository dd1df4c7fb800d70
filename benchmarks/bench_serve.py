"""Serving under load: time to first token and tokens/s, one request alone and 32 requests 8 at a time.

    python benchmarks/bench_serve.py --model runs/demo             # a few minutes on 2 cores
    python benchmarks/bench_serve.py --model runs/demo --quick     # one round

A real `tegaki serve` process on 127.0.0.1 (started and stopped here), streamed completions of
--new-tokens tokens (temperature 0.8, seeded), read with httpx from client threads. Beside them,
the library's own decoding speed (`generate_tokens`, what `tegaki generate` runs) in this process
on the same model and thread count, as the single-request reference.

The in-process reference and the single served request are measured in turn, round by round, so
that other work on the machine weighs on both alike. Figures per round: single = one request at a
time (TTFT, tokens/s from the first to the last token);
load = 32 requests, 8 in flight: TTFT of each request (median and 90th percentile), tokens/s of each
request, and the server's total tokens/s over the round. Several rounds give the spread.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tegaki.generate import generate_tokens  # noqa: E402
from tegaki.load import from_pretrained, tokenizer_for  # noqa: E402
from tegaki.sampling import SamplingSettings  # noqa: E402

PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


def start_server(model: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "tegaki", "serve", "--model", model, "--port", str(port), "--name", "bench"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):  # bounded: 60 s
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 60 s")


def one_request(client, url: str, seed: int, new_tokens: int) -> dict:
    """Stream one completion; return its time to first token and its tokens/s after that."""
    body = {
        "model": "bench",
        "prompt": PROMPT,
        "max_tokens": new_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "logprobs": 0,
    }  # logprobs: one chunk per token, even mid-character
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["logprobs"]["tokens"]:
                last = time.perf_counter()
                first = first or last
                tokens += 1
    return {
        "ttft": first - start,
        "tokens": tokens,
        "end": last - start,
        "tps": (tokens - 1) / (last - first) if tokens > 1 and last > first else float("nan"),
    }


def load_round(client, url: str, requests: int, concurrency: int, new_tokens: int, offset: int) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(lambda i: one_request(client, url, offset + i, new_tokens), range(requests)))
    wall = time.perf_counter() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "ttft_median": statistics.median(ttfts),
        "ttft_p90": ttfts[int(0.9 * (len(ttfts) - 1))],
        "tps_each": statistics.median(r["tps"] for r in results),
        "tps_total": sum(r["tokens"] for r in results) / wall,
        "lost": requests - len(results),
    }


class LibrarySpeed:
    """Tokens/s of `generate_tokens` alone (what `tegaki generate` runs), same prompt and settings,
    in this process on the server's thread count."""

    def __init__(self, model_path: str, new_tokens: int, threads: int):
        torch.set_num_threads(threads)
        self.model, tok = from_pretrained(model_path).eval(), tokenizer_for(model_path)
        self.ids, self.new_tokens = torch.tensor([tok.encode(PROMPT)]), new_tokens
        self.measure(0)  # warm-up

    def measure(self, seed: int) -> float:
        start = time.perf_counter()
        settings = SamplingSettings(temperature=0.8)
        n = sum(1 for _ in generate_tokens(self.model, self.ids, self.new_tokens, settings, seed=seed))
        return n / (time.perf_counter() - start)


def spread(values: list[float], unit: str, digits: int = 1) -> str:
    values = [v for v in values if not math.isnan(v)]
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{statistics.median(values):.{digits}f} {unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a run folder or a transformers folder")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, in the server and for the reference (default 1: tiny models run best on one)",
    )
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--quick", action="store_true", help="one round")
    args = p.parse_args()
    rounds = 1 if args.quick else args.rounds
    import httpx  # the serve tests' client; imported here so --help works without it

    print(
        f"# {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"# command: python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}")
    print(f"# load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other work on the machine)")
    library_speed = LibrarySpeed(args.model, args.new_tokens, args.threads)
    url = f"http://127.0.0.1:{args.port}"
    proc = start_server(args.model, args.port, args.threads)
    try:
        with httpx.Client() as client:
            one_request(client, url, 0, 8)  # warm-up
            library, single = [], []
            for r in range(rounds):  # interleaved, so that both see the same load from elsewhere
                library.append(library_speed.measure(r))
                single.append(one_request(client, url, r, args.new_tokens))
            loads = [
                load_round(client, url, args.requests, args.concurrency, args.new_tokens, 1000 * (r + 1))
                for r in range(rounds)
            ]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"\n| {args.model}, {args.new_tokens} new tokens | time to first token | tokens/s per request | "
        "tokens/s, server total |"
    )
    print("| --- | --- | --- | --- |")
    print(f"| `generate_tokens` in process (tegaki generate) | - | {spread(library, 'tok/s')} | - |")
    print(
        f"| served, 1 request at a time | {spread([s['ttft'] * 1e3 for s in single], 'ms')} | "
        f"{spread([s['tps'] for s in single], 'tok/s')} | - |"
    )
    ttft = (
        f"median {spread([r['ttft_median'] * 1e3 for r in loads], 'ms')}; "
        f"p90 {spread([r['ttft_p90'] * 1e3 for r in loads], 'ms')}"
    )
    print(
        f"| served, {args.requests} requests, {args.concurrency} at a time | {ttft} | "
        f"{spread([r['tps_each'] for r in loads], 'tok/s')} | {spread([r['tps_total'] for r in loads], 'tok/s')} |"
    )
    print(f"\n{rounds} round(s); requests lost: {sum(r['lost'] for r in loads)}")


if __name__ == "__main__":
    main()
