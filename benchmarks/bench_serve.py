"""Serving under load: time to first token and tokens/s, one request alone and 32 requests 8 at a time.

    python -m benchmarks.bench_serve --model runs/demo             # a few minutes on 2 cores
    python -m benchmarks.bench_serve --model runs/demo --quick     # one round
    python -m benchmarks.bench_serve --hostile                     # hostile load, a tiny model made here
    python -m benchmarks.bench_serve --hostile --append-results    # ... and add the report to RESULTS.md

A real `tegaki serve` process on 127.0.0.1 (started and stopped here), streamed completions of
--new-tokens tokens (temperature 0.8, seeded), read with httpx from client threads. Beside them,
the library's own decoding speed (`generate_tokens`, what `tegaki generate` runs) in this process
on the same model and thread count, as the single-request reference.

The in-process reference and the single served request are measured in turn, round by round, so
that other work on the machine weighs on both alike. Figures per round: single = one request at a
time (TTFT, tokens/s from the first to the last token);
load = 32 requests, 8 in flight: TTFT of each request (median and 90th percentile), tokens/s of each
request, and the server's total tokens/s over the round. Several rounds give the spread.

--hostile: the load of a careless or hostile crowd, for --duration seconds (default 20), against a
real server whose limits let one request of 16 prompts x n=16 in (--max-request-sequences 256):
--clients clients (default 32) at once, about half of them sending completions (streamed or not)
and hanging up after a random short time (seeded), the others well-behaved (waiting for their
answers, backing off on 429), and one sending 16 prompts x n=16 again and again. Every second a
probe sends a 1-token request and times its answer. --loads identical loads (default 3) run one
after another on the same server, --settle idle seconds after each. Reported: the probes' latencies,
what became of the requests (answered, refused with 429, given up by their client) and the server's
counters, and its resident memory (VmRSS) at the start, at each load's peak and --settle seconds
after it (then once more after one idle probe). The first load is the warm-up: the memory it leaves
(caches that a first load grows, memory the allocator keeps for the next) is the level the later
loads are held to. Without --model, a tiny untrained model is made here the way
the serve tests make theirs. Every loop is bounded in count and in time; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import RESULTS, ROOT, command_line, cpu_name, insert_in_section, module_command
from tegaki.generate import generate_tokens
from tegaki.load import from_pretrained, tokenizer_for
from tegaki.sampling import SamplingSettings

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


def per_round(values: list[float], unit: str, digits: int = 1) -> str:
    """The median over rounds with its unit, and the least and the most (one round: its figure)."""
    values = [v for v in values if not math.isnan(v)]
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{statistics.median(values):.{digits}f} {unit} (min {min(values):.{digits}f}, max {max(values):.{digits}f})"


# -------------------------------------------------------------------------------------------------
# --hostile: a crowd of careless clients, one greedy one, and a probe
# -------------------------------------------------------------------------------------------------

HOSTILE_PROMPTS = ("a", "The cat sat on the mat.", "ROMEO:\nBut soft", "吾輩は猫である。", "Once upon a time")


def rss_kib(pid: int) -> int | None:
    """The process's resident memory in KiB (VmRSS of /proc/PID/status); None once it has gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def tiny_model_folder(folder: Path) -> Path:
    """An untrained 2-layer model with a 512-token context, as the serve tests make theirs: its
    greedy text never ends early, so every request decodes all the tokens it asks for."""
    from tests.serve_models import write_model_folder  # the serve tests' tiny models

    return write_model_folder(folder / "tiny", train_steps=0, block_size=512)


def get_health(port: int) -> dict:
    return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read())


def post(port: int, body: dict, patience: float) -> tuple[str, float]:
    """POST a completion to 127.0.0.1 and read its answer, giving up (closing the connection, as a
    client that vanishes does) after `patience` seconds in all. (outcome, seconds): outcome is
    "answered" (200, read to the end), "refused" (429), "gave up", or "status NNN" / "error NAME"."""
    started = time.monotonic()
    give_up = started + max(patience, 0.01)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=max(patience, 0.01))
    try:
        data = json.dumps(body, ensure_ascii=False).encode()
        connection.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        while True:  # bounded by give_up: each read waits at most what is left
            left = give_up - time.monotonic()
            if left <= 0:
                return "gave up", time.monotonic() - started
            connection.sock.settimeout(left)
            if not response.read1(65536):
                break
        if response.status == 200:
            return "answered", time.monotonic() - started
        return ("refused" if response.status == 429 else f"status {response.status}"), time.monotonic() - started
    except TimeoutError:
        return "gave up", time.monotonic() - started
    except OSError as e:
        return f"error {type(e).__name__}", time.monotonic() - started
    finally:
        connection.close()


class Tally:
    """Outcomes per kind of client, from many threads."""

    def __init__(self):
        self.lock, self.counts = threading.Lock(), {}

    def add(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.counts.setdefault(kind, {}).setdefault(outcome, 0)
            self.counts[kind][outcome] += 1


def vanishing_client(port: int, rng: random.Random, end: float, tally: Tally) -> None:
    """Completions, streamed or not, abandoned after 0.05-1.5 s (most before they are done)."""
    for _ in range(10_000):  # bounded in count as well as by `end`
        if time.monotonic() >= end:
            return
        body = {
            "model": "bench",
            "prompt": rng.choice(HOSTILE_PROMPTS),
            "max_tokens": rng.randint(16, 256),
            "n": rng.choice((1, 1, 2, 4)),
            "temperature": 0.8,
            "seed": rng.randrange(1 << 30),
            "stream": rng.random() < 0.5,
        }
        outcome, _ = post(port, body, min(rng.uniform(0.05, 1.5), end - time.monotonic()))
        tally.add("vanishing", "hung up" if outcome == "gave up" else outcome)
        time.sleep(rng.uniform(0.0, 0.2))


def polite_client(port: int, rng: random.Random, end: float, tally: Tally) -> None:
    """Short completions, each waited for until the load ends; after a 429, a pause before the next."""
    for _ in range(10_000):
        if time.monotonic() >= end:
            return
        body = {
            "model": "bench",
            "prompt": rng.choice(HOSTILE_PROMPTS),
            "max_tokens": rng.randint(8, 48),
            "temperature": 0.8,
            "seed": rng.randrange(1 << 30),
            "stream": rng.random() < 0.5,
        }
        outcome, _ = post(port, body, end - time.monotonic())
        tally.add("well-behaved", "unfinished when the load stopped" if outcome == "gave up" else outcome)
        time.sleep(rng.uniform(0.5, 1.0) if outcome == "refused" else rng.uniform(0.0, 0.3))


def greedy_client(port: int, end: float, tally: Tally) -> None:
    """16 prompts x n=16 of 64 tokens each, again and again; whatever is under way when the load stops
    is abandoned (its connection closed)."""
    body = {"model": "bench", "prompt": ["a"] * 16, "n": 16, "max_tokens": 64, "temperature": 0}
    for _ in range(1_000):
        if time.monotonic() >= end:
            return
        outcome, _ = post(port, body, end - time.monotonic())
        tally.add("16 x n=16", "unfinished when the load stopped" if outcome == "gave up" else outcome)
        if outcome != "answered":
            time.sleep(0.5)


def probe(port: int) -> tuple[str, float]:
    return post(port, {"model": "bench", "prompt": "b", "max_tokens": 1, "temperature": 0}, 30.0)


# What the server holds, read inside it (--inspect): is memory after a load objects kept alive, or
# memory an allocator keeps for later? The server runs under serve_inspected, and each SIGUSR1 makes
# it append one JSON line to $BENCH_SERVE_INSPECT after a full garbage collection:
#   python      objects the collector tracks, tensors among them, the bytes in use in pymalloc's
#               blocks and what its arenas hold in all (1 MiB each: a partly used one stays)
#   heap        glibc malloc (mallinfo2, every arena): bytes in use and bytes free but kept
#   rss, threads


def serve_inspected(argv: list[str]) -> None:
    """`tegaki ARGV` (serve ...) with the SIGUSR1 report above installed first."""
    import ctypes
    import gc
    import runpy

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in [
                "arena",
                "ordblks",
                "smblks",
                "hblks",
                "hblkhd",
                "usmblks",
                "fsmblks",
                "uordblks",
                "fordblks",
                "keepcost",
            ]
        ]

    libc = ctypes.CDLL(None)
    mallinfo2 = getattr(libc, "mallinfo2", None)  # glibc 2.33 and later
    if mallinfo2 is not None:
        mallinfo2.restype = MallInfo2

    def report(*_) -> None:
        gc.collect()
        objects = gc.get_objects()
        line = {
            "rss_kib": rss_kib(os.getpid()),
            "threads": threading.active_count(),
            "python_objects": len(objects),
            "tensors": sum(type(o).__name__ in ("Tensor", "Parameter") for o in objects),
            **pymalloc_stats(),
        }
        if mallinfo2 is not None:
            info = mallinfo2()
            line.update(heap_used=info.uordblks, heap_free=info.fordblks, heap_mmapped=info.hblkhd)
        with open(os.environ["BENCH_SERVE_INSPECT"], "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    signal.signal(signal.SIGUSR1, report)
    sys.argv = ["tegaki", *argv]
    runpy.run_module("tegaki", run_name="__main__")


def pymalloc_stats() -> dict:
    """pymalloc's own figures (sys._debugmallocstats writes them to fd 2): bytes in use in its blocks
    and the bytes its arenas take in all."""
    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode("ascii", "replace")
    stats = {}
    for line in text.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "# bytes in allocated blocks":
            stats["python_bytes"] = int(value.strip().replace(",", ""))
        elif name.strip() == "# arenas allocated current":
            stats["python_arenas"] = int(value.strip().replace(",", ""))
    return stats


def inspect_server(proc, path: Path) -> dict | None:
    """Ask the server for one report (SIGUSR1) and wait for its line (bounded: 60 s)."""
    lines = path.read_text().splitlines() if path.exists() else []
    proc.send_signal(signal.SIGUSR1)
    for _ in range(600):
        time.sleep(0.1)
        now = path.read_text().splitlines() if path.exists() else []
        if len(now) > len(lines):
            return json.loads(now[-1])
    return None


def one_load(port: int, args, seed: float, tally: Tally) -> list[tuple[str, float]]:
    """--duration seconds of the crowd (vanishing, polite, one greedy client) with a 1-token probe
    every second; the probes' (outcome, seconds). Returns once every client has given up."""
    rng = random.Random(seed)
    vanishing = max(1, (args.clients - 2) // 2)
    polite = max(1, args.clients - 1 - vanishing)
    end = time.monotonic() + args.duration
    threads = [
        threading.Thread(target=vanishing_client, args=(port, random.Random(rng.random()), end, tally))
        for _ in range(vanishing)
    ]
    threads += [
        threading.Thread(target=polite_client, args=(port, random.Random(rng.random()), end, tally))
        for _ in range(polite)
    ]
    threads.append(threading.Thread(target=greedy_client, args=(port, end, tally)))
    for t in threads:
        t.start()
    probes = []
    next_probe = time.monotonic() + 1.0
    for _ in range(int(args.duration) + 2):  # one probe a second while the load lasts
        time.sleep(max(0.0, next_probe - time.monotonic()))
        if time.monotonic() >= end:
            break
        probes.append(probe(port))
        next_probe += 1.0
    for t in threads:
        t.join(timeout=60)  # each gives up at `end`; 60 s more is a generous bound
    for _ in range(sum(t.is_alive() for t in threads)):
        tally.add("stuck", "clients still running after the load")
    return probes


def hostile_run(args, model: str) -> dict:
    """--loads identical loads (same seed) one after another on one server, --settle idle seconds
    after each: memory after the first load is the level after warm-up (the caches a first load
    grows), and the later loads show whether it keeps growing."""
    extra = shlex.split(args.server_args)
    tally, loads, rss_seen = Tally(), [], []
    inspected = Path(tempfile.mkdtemp()) / "inspect.jsonl" if args.inspect else None
    from tests.serve_models import server_process  # the server process the serve tests use

    # server_process puts the repository on the server's PYTHONPATH: this module imports there too.
    launcher = module_command("bench_serve", "--serve-inspected") if inspected else None
    if inspected:
        os.environ["BENCH_SERVE_INSPECT"] = str(inspected)  # the server inherits it
    server = server_process(model, "--name", "bench", *extra, threads=args.threads, launcher=launcher)
    with server as (proc, url):
        port = int(url.rsplit(":", 1)[1])
        rss_up = rss_kib(proc.pid)
        warm = probe(port)  # the first request's one-off allocations are part of the start
        rss_start = rss_kib(proc.pid)
        inside_start = inspect_server(proc, inspected) if inspected else None
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.1):  # ends with the run (the event is always set)
                if (kib := rss_kib(proc.pid)) is not None:
                    rss_seen.append(kib)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        load_avg_start = os.getloadavg()
        for _ in range(args.loads):
            before, seen_from = get_health(port), len(rss_seen)
            probes = one_load(port, args, args.seed, tally)
            time.sleep(args.settle)
            after = get_health(port)
            loads.append(
                {
                    "probes": probes,
                    "before": before,
                    "after": after,
                    "peak": max([rss_start, *rss_seen[seen_from:]]),
                    "settled": rss_kib(proc.pid),
                    "inside": inspect_server(proc, inspected) if inspected else None,
                }
            )
        load_avg_end = os.getloadavg()
        idle_probe = probe(port)
        time.sleep(0.5)
        rss_final = rss_kib(proc.pid)
        stop_sampling.set()
        sampler.join(timeout=5)
    if inspected:
        shutil.rmtree(inspected.parent, ignore_errors=True)
    return {
        "warm": warm,
        "loads": loads,
        "idle_probe": idle_probe,
        "tally": tally.counts,
        "rss": {"up": rss_up, "start": rss_start, "final": rss_final},
        "inside_start": inside_start,
        "load_avg": (load_avg_start, load_avg_end),
    }


def hostile_report(args, model_label: str, r: dict, margin_mib: float = 4.0) -> str:
    mib = {k: v / 1024 for k, v in r["rss"].items()}
    loads = r["loads"]
    settled = [load["settled"] / 1024 for load in loads]
    probes = [p for load in loads for p in load["probes"]]
    latencies = sorted(t for _, t in probes)
    not_answered = [outcome for outcome, _ in probes if outcome != "answered"]
    probe_max = max(latencies) if latencies else float("nan")
    probe_ok = bool(latencies) and not not_answered and probe_max <= 2.0
    warmed = settled[0]  # the level after warm-up: after the first load
    memory_ok = max(settled[1:] + [mib["final"]]) <= warmed + margin_mib
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0, load1 = (" ".join(f"{x:.2f}" for x in la) for la in r["load_avg"])
    vanishing = max(1, (args.clients - 2) // 2)
    polite = max(1, args.clients - 1 - vanishing)
    stuck = r["tally"].pop("stuck", {}).get("clients still running after the load", 0)
    lines = [
        f"### Hostile load, {now}",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} thread(s) in the server; load average (1, 5, 15 min) {load0} at the start of the loads, "
        f"{load1} at their end (other work on the machine counts in it). Model: {model_label}. Server flags: "
        f"`{args.server_args}`. Command: `{command_line('bench_serve')}`.",
        "",
        f"{args.loads} identical loads of {args.duration:g} s, {args.settle:g} s idle after each, from "
        f"{vanishing + polite + 1} clients at once: {vanishing} hanging up after 0.05-1.5 s (streamed or not, "
        f"n up to 4, up to 256 tokens), {polite} well-behaved (8-48 tokens, waiting for the answer), one sending "
        "16 prompts x n=16 (64 tokens each) again and again; a 1-token probe every second.",
        "",
        "| clients, all loads | outcomes |",
        "| --- | --- |",
    ]
    for kind in ("vanishing", "well-behaved", "16 x n=16"):
        outcomes = {"answered": 0, "refused": 0, **r["tally"].get(kind, {})}
        outcomes["refused (429)"] = outcomes.pop("refused")
        lines.append(f"| {kind} | " + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) + " |")
    lines += [
        "",
        "| load | probes answered | probe median | probe max | sequences done / cancelled | "
        f"RSS peak | RSS {args.settle:g} s after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, load in enumerate(loads, 1):
        times = sorted(t for _, t in load["probes"])
        answered = sum(outcome == "answered" for outcome, _ in load["probes"])
        done = load["after"]["requests"] - load["before"]["requests"]
        cancelled = load["after"]["cancelled"] - load["before"]["cancelled"]
        median = f"{statistics.median(times) * 1e3:.0f} ms" if times else "-"
        top = f"{max(times) * 1e3:.0f} ms" if times else "-"
        lines.append(
            f"| {i} | {answered} of {len(times)} | {median} | {top} | {done} / {cancelled} | "
            f"{load['peak'] / 1024:.1f} MiB | {load['settled'] / 1024:.1f} MiB |"
        )
    if r.get("inside_start"):
        lines += ["", *inside_table([r["inside_start"], *(load["inside"] for load in loads)])]
    last = loads[-1]["after"]
    lines += [
        "",
        f"- server memory (VmRSS): {mib['up']:.1f} MiB when up, {mib['start']:.1f} MiB after one warm-up "
        f"request, {mib['final']:.1f} MiB after one more idle probe at the end; queued {last['queued']}, "
        f"active {last['active']} {args.settle:g} s after the last load; clients still running after a load: {stuck}"
        + (f"; probes not answered: {', '.join(not_answered)}" if not_answered else "")
        + f" (warm-up probe: {r['warm'][1] * 1e3:.0f} ms; idle probe at the end: {r['idle_probe'][1] * 1e3:.0f} ms)",
        "",
        f"Goal (a 1-token probe answered within 2 s throughout; memory after each later load within "
        f"{margin_mib:g} MiB of its level after warm-up, the first load): probes "
        f"{'held' if probe_ok else 'NOT held'} (max {probe_max:.2f} s), memory {'held' if memory_ok else 'NOT held'} "
        f"({', '.join(f'{m - warmed:+.1f}' for m in settled[1:] + [mib['final']])} MiB after the later loads and "
        f"the idle probe; the first load itself {warmed - mib['start']:+.1f} MiB over the start).",
        "",
    ]
    return "\n".join(lines)


def inside_table(readings: list[dict | None]) -> list[str]:
    """--inspect: what the server held at the start (after one warm-up request) and after each load."""
    mib = lambda value: f"{value / 2**20:.1f}" if value is not None else "-"  # noqa: E731
    lines = [
        "Inside the server (--inspect; after a full garbage collection):",
        "",
        "| after | RSS MiB | Python objects | tensors | pymalloc in use / arenas MiB | "
        "malloc heap in use / free MiB | threads |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(readings):
        if r is None:
            continue
        lines.append(
            f"| {'warm-up request' if i == 0 else f'load {i}'} | {r['rss_kib'] / 1024:.1f} | {r['python_objects']:,} | "
            f"{r['tensors']} | {mib(r.get('python_bytes'))} / {r.get('python_arenas', '-')} | "
            f"{mib(r.get('heap_used'))} / {mib(r.get('heap_free'))} | {r['threads']} |"
        )
    return lines


def hostile_main(args) -> None:
    if args.clients < 3:
        raise SystemExit("--clients must be at least 3 (one of each kind)")
    if args.loads < 2:
        raise SystemExit("--loads must be at least 2 (a warm-up and one to compare with it)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model, label = args.model, f"`{args.model}`"
        else:
            model = str(tiny_model_folder(Path(tmp)))
            label = "untrained 2 layers x 64, 512-token context, made here (as tests/serve_models.py)"
        result = hostile_run(args, model)
    report = hostile_report(args, label, result)
    print(report)
    if args.append_results:
        insert_in_section(RESULTS, "## Serving", report)
        print("added to benchmarks/RESULTS.md (Serving)")


def main() -> None:
    if sys.argv[1:2] == ["--serve-inspected"]:  # the server of --inspect (see serve_inspected)
        return serve_inspected(sys.argv[2:])
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a run folder or a transformers folder (required but with --hostile)")
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
    hostile = p.add_argument_group("--hostile: a crowd of careless clients and a probe")
    hostile.add_argument("--hostile", action="store_true", help="run the hostile load instead (see above)")
    hostile.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    hostile.add_argument("--clients", type=int, default=32, help="clients at once, at least 3 (default 32)")
    hostile.add_argument("--settle", type=float, default=10.0, help="idle seconds after each load (default 10)")
    hostile.add_argument(
        "--loads",
        type=int,
        default=3,
        help="identical loads one after another on one server (default 3): the first is the warm-up",
    )
    hostile.add_argument("--seed", type=int, default=0, help="seed of the clients' choices")
    hostile.add_argument(
        "--server-args",
        default="--max-request-sequences 256 --max-queued 320",
        help="more flags for `tegaki serve` (default: room for one request of 16 prompts x n=16)",
    )
    hostile.add_argument(
        "--inspect",
        action="store_true",
        help="read what the server holds after each load, inside it (objects, pymalloc, malloc's heap)",
    )
    hostile.add_argument(
        "--append-results",
        action="store_true",
        help="add the report to benchmarks/RESULTS.md, at the end of its Serving section",
    )
    args = p.parse_args()
    if args.hostile:
        return hostile_main(args)
    if args.model is None:
        p.error("--model is required (but with --hostile)")
    rounds = 1 if args.quick else args.rounds
    import httpx  # the serve tests' client; imported here so --help works without it

    print(
        f"# {datetime.date.today()}  {platform.node()}  {cpu_name()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s)"
    )
    print(f"# command: {command_line('bench_serve')}")
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
    print(f"| `generate_tokens` in process (tegaki generate) | - | {per_round(library, 'tok/s')} | - |")
    print(
        f"| served, 1 request at a time | {per_round([s['ttft'] * 1e3 for s in single], 'ms')} | "
        f"{per_round([s['tps'] for s in single], 'tok/s')} | - |"
    )
    ttft = (
        f"median {per_round([r['ttft_median'] * 1e3 for r in loads], 'ms')}; "
        f"p90 {per_round([r['ttft_p90'] * 1e3 for r in loads], 'ms')}"
    )
    each, total = (per_round([r[key] for r in loads], "tok/s") for key in ("tps_each", "tps_total"))
    print(f"| served, {args.requests} requests, {args.concurrency} at a time | {ttft} | {each} | {total} |")
    print(f"\n{rounds} round(s); requests lost: {sum(r['lost'] for r in loads)}")


if __name__ == "__main__":
    main()
