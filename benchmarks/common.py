"""What every benchmark shares: the machine a report names, interleaved rounds, and the report itself.

The benchmarks run from the repository root as modules of this package, one command each:

    python -m benchmarks.bench_generate --quick

A benchmark that starts a process of its own (an engine's worker, a server) starts it the same way,
`module_command(...)` run with `cwd=ROOT`, so that `benchmarks` and `tegaki` import there as here.
This module imports nothing but the standard library at the top: an engine's worker (engines.py)
imports it before it loads its engine alone.

The machine is shared, so a figure is never one timing: every contestant runs once per round, in
turn, for several rounds (a burst of other work then hits them alike), and a report gives the
median with the range (min-max) beside it.
"""

from __future__ import annotations

import os
import platform
import shlex
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


# --- the command ---------------------------------------------------------------------------------


def module_command(module: str, *args: str) -> list[str]:
    """The argv that runs benchmarks.`module` in a new Python process: run it with cwd=ROOT."""
    return [sys.executable, "-m", f"benchmarks.{module}", *args]


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The command a report records: `python -m benchmarks.MODULE` and its arguments (this
    process's own, or `argv` where a caller passed them to main)."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *(sys.argv[1:] if argv is None else argv)])


# --- the machine ---------------------------------------------------------------------------------


def cpu_name() -> str:
    """The processor's model name, as /proc/cpuinfo gives it (every core reports the same)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    return platform.processor() or "unknown"


def cpu_description() -> tuple[str, list[str], list[str]]:
    """(the processor's name, the tegaki.device.CPU_FLAGS it has, those it lacks)."""
    from tegaki.device import CPU_FLAGS, cpu_has

    return cpu_name(), [f for f in CPU_FLAGS if cpu_has(f)], [f for f in CPU_FLAGS if not cpu_has(f)]


def cpu_text(wanted: tuple[str, ...] | None = None) -> str:
    """`NAME, flags: F1 F2`: the processor, and which of the `wanted` flags it has (default: the
    flags tegaki's kernels choose by, tegaki.device.CPU_FLAGS)."""
    from tegaki.device import CPU_FLAGS, cpu_flags

    wanted = wanted or CPU_FLAGS
    have = cpu_flags()
    return f"{cpu_name()}, flags: {' '.join(f for f in wanted if f in have) or 'none of ' + ' '.join(wanted)}"


def versions(packages: tuple[str, ...] = ("transformers", "ctranslate2", "llama-cpp-python")) -> str:
    """torch's version and the packages', read from their installed metadata: importing an engine
    here would load its kernel libraries into this process (see engines.py)."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    found = [f"torch {torch.__version__}"]
    for package in packages:
        try:
            found.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            found.append(f"{package} not installed")
    return ", ".join(found)


def machine_text() -> str:
    """The machine as a report names it: cores, CPU flags, library versions, threads."""
    import torch

    name, have, lack = cpu_description()
    return (
        f'Machine: {os.cpu_count()} cores of "{name}"; CPU flags present: '
        f"{' '.join(have) or 'none of these'}; absent: {' '.join(lack) or 'none'} (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}). {versions()}; {torch.get_num_threads()} threads"
    )


def load_average() -> float:
    """The machine's load over the last minute: other work on it counts in it."""
    return os.getloadavg()[0]


# --- timing --------------------------------------------------------------------------------------


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of `repeats` runs, in seconds: the least disturbed by anything else running."""
    fn()  # warm-up: first-call allocations and kernel selection
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved_seconds(
    runs: dict[str, Callable[[], object]], rounds: int, *, repeat: int = 1, pause: float = 0.0
) -> dict[str, list[float]]:
    """Seconds per call of each run: every run `repeat` times a round, in turn, for `rounds` rounds
    (a burst of other work then hits them alike), `pause` seconds before each; progress on stderr.
    No warm-up: callers make their own (some keep its output)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds):
        for name, run in runs.items():
            time.sleep(pause)
            t = time.perf_counter()
            for _ in range(repeat):
                run()
            times[name].append((time.perf_counter() - t) / repeat)
        print(f"round {r + 1}/{rounds}, load average {load_average():.1f}", file=sys.stderr, flush=True)
    return times


# --- figures and tables --------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.1f}") -> tuple[str, str]:
    """(median, min-max) as text, each number written with `fmt`."""
    return fmt.format(statistics.median(values)), f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def median_range(values: list[float], fmt: str = "{:.1f}") -> str:
    """`median (min-max)`, as one table cell."""
    median, low_high = spread(values, fmt)
    return f"{median} ({low_high})"


def paragraph(text: str) -> str:
    """Wrapped as RESULTS.md is, at 100 columns."""
    return textwrap.fill(text, 100, break_long_words=False, break_on_hyphens=False)


class Report:
    """The report's lines, printed as they come and kept for RESULTS.md."""

    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# --- RESULTS.md ----------------------------------------------------------------------------------


def finish(lines: list[str], results: str | None) -> str:
    """Print the report; with --append-results, add it to the end of that file as a new section."""
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if results:
        append_section(Path(results), report)
        print(f"appended to {results}", file=sys.stderr)
    return report


def append_section(path: Path, section: str) -> None:
    """Add `section` after everything already in `path`, which stays byte for byte as it was. The
    new file is written beside it and renamed over it: a crash leaves the old file or the new one."""
    from tegaki.files import atomic_write

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    new = old + ("" if old.endswith("\n") else "\n") + "\n" + section
    atomic_write(path, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))


def insert_in_section(path: Path, heading: str, section: str) -> None:
    """Add `section` at the end of the `heading` section of `path` (before the next `## `), or at the
    end of the file without one; everything else stays byte for byte. Written beside and renamed
    over it: a crash leaves the old file or the new one."""
    from tegaki.files import atomic_write

    old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    lines = old.splitlines(keepends=True)
    at = len(lines)
    if heading + "\n" in lines:
        start = lines.index(heading + "\n")
        at = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    head, tail = "".join(lines[:at]), "".join(lines[at:])
    head = head + ("" if head.endswith("\n") else "\n") + ("" if head.endswith("\n\n") else "\n")
    new = head + section.rstrip("\n") + "\n" + ("\n" + tail if tail else "")
    atomic_write(path, lambda tmp: Path(tmp).write_text(new, encoding="utf-8"))
