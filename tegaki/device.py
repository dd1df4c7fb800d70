"""Where a model runs: the device, the dtype, and the hardware's peak for MFU.

`pick_device("auto")` is CUDA when PyTorch sees a GPU, else the CPU; a bare "cuda" means the
process's own GPU (cuda:LOCAL_RANK under torchrun, cuda:0 otherwise). `pick_dtype("auto")` is
bfloat16 on a GPU that has it and on a CPU with AMX, float32 elsewhere; `cpu_has` reads the CPU's
feature flags. `peak_flops` is the dense matmul peak that MFU
divides by: the datasheet figure for known accelerators, a measured matmul for the rest.
`check_fits` refuses, with the figures, a model too big for the device's memory, before allocating.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from tegaki.errors import TegakiError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a torch.device, checked against what is there.

    A bare 'cuda' gets its index here: torch.cuda.set_device needs one, and under torchrun each
    process must take its own GPU (LOCAL_RANK), not all of them the first."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise TegakiError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if not torch.cuda.is_available():
        raise TegakiError(f"--device {name}, but PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    if name == "cuda":
        rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
        name = f"cuda:{rank}"
    index, count = int(name[5:]), torch.cuda.device_count()
    if index >= count:
        raise TegakiError(f"--device {name}, but this machine has {count} CUDA GPU(s): cuda:0..cuda:{count - 1}")
    device = torch.device(name)
    torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, device: torch.device) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' -> one of DTYPES' names. 'auto' is bf16 on a GPU that has
    it (tensor cores) and on a CPU with AMX (its matrix units multiply bf16 at several times the
    float32 rate), fp32 elsewhere."""
    if name not in ("auto", *DTYPES):
        raise TegakiError(f"--dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    if device.type == "cpu" and cpu_has("amx_bf16"):
        return "bf16"
    return "fp32"


# -------------------------------------------------------------------------------------------------
# What the CPU can do
# -------------------------------------------------------------------------------------------------

# The flags that decide tegaki's CPU paths, as /proc/cpuinfo names them: AMX (matrix units for bf16
# and int8), AVX-512 with its bf16 and int8 dot products (VNNI), AVX2 (every x86 CPU since 2013).
CPU_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx2")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (Linux). Elsewhere, the best PyTorch's own dispatcher reports:
    "avx512" or "avx2" (no AMX/VNNI detail, so the cautious paths are taken)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability().lower()  # "AVX512", "AVX2", "DEFAULT", ...
    return frozenset({"avx512f", "avx2"} if capability.startswith("avx512") else {"avx2"} & {capability})


# ONEDNN_MAX_CPU_ISA holds oneDNN (and so tegaki's packed layers) back to an older instruction set,
# which is how a test or a benchmark runs as on an older CPU: the flags above that cap are then
# read as absent, so that every path agrees on what this CPU is. Each cap -> the flags it leaves out.
_ABOVE_AVX512 = {"avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
ISA_CAPS: dict[str, frozenset[str]] = {
    "AVX2": frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", *_ABOVE_AVX512}),
    "AVX512_CORE": frozenset(_ABOVE_AVX512),
    "AVX512_CORE_VNNI": frozenset({"avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}),
    "AVX512_CORE_BF16": frozenset({"amx_bf16", "amx_int8", "amx_tile"}),
}


def capped(flags: frozenset[str], cap: str | None = None) -> frozenset[str]:
    """`flags` less those above the ONEDNN_MAX_CPU_ISA cap (or `cap`); unknown caps leave all."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if cap is None else cap).strip().upper()
    return flags - ISA_CAPS.get(cap, frozenset())


_FLAGS: frozenset[str] | None = None


def cpu_has(flag: str) -> bool:
    """Whether this machine's CPU has `flag` (read once), below any ONEDNN_MAX_CPU_ISA cap."""
    global _FLAGS
    if _FLAGS is None:
        _FLAGS = capped(cpu_flags())
    return flag in _FLAGS


def cpu_bf16_hardware() -> bool:
    """Whether the CPU multiplies bfloat16 in hardware: AVX-512 BF16 or AMX in its flags. oneDNN can
    also run bf16 kernels on plain AVX-512 by converting to float32 (torch.ops.mkldnn.
    _is_mkldnn_bf16_supported() says True there), but that is emulation, not hardware: this flag
    is what tegaki's bf16 paths and tests read, the same answer on every machine."""
    return cpu_has("avx512_bf16") or cpu_has("amx_bf16")


def last_level_cache_bytes(cpu: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The size of the CPU's largest cache (L3 on most x86 CPUs), from sysfs; 32 MiB where it cannot
    be read. What a measurement must read past for every weight to come from memory."""
    sizes = []
    for size_file in Path(cpu).glob("index*/size"):
        text = size_file.read_text().strip().upper()  # "32768K", "2M"
        try:
            sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20, "G": 2**30}[text[-1]])
        except (ValueError, KeyError, IndexError):
            continue
    return max(sizes, default=32 * 2**20)


def cxx_compiler() -> str | None:
    """The C++ compiler's path ($CXX, else g++, clang++ or c++), or None where none is installed."""
    for name in (os.environ.get("CXX", ""), "g++", "clang++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is installed: torch.compile's inductor writes C++ for the CPU, and
    tegaki's own loops (native.py) are C++."""
    return cxx_compiler() is not None


def cpu_summary() -> str:
    """The flags of CPU_FLAGS this CPU has, for benchmark records: "avx2 avx512f avx512_vnni"."""
    return " ".join(f for f in CPU_FLAGS if cpu_has(f)) or "none of " + " ".join(CPU_FLAGS)


def memory_bytes(device: torch.device | str) -> int | None:
    """The device's memory in bytes: a GPU's own, the machine's RAM for the CPU (None: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None  # meta: nothing is stored
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def size_text(n: float) -> str:
    """Bytes for a person: 1.5 GB, 3.2 PB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:,.1f} PB"


# A model's modules take memory as Python objects even on the meta device (~36 kB a block of
# gpt-oss-20b, measured with tracemalloc): a billion layers cannot even be described.
LAYER_OBJECT_BYTES = 40_000


def check_fits(count: int, bytes_each: int, device: torch.device | str, what: str, items: str = "parameters") -> None:
    """Refuse `what` when count x bytes_each exceeds the device's memory: a mistyped size
    (n_layer=1000000000) is then one message with the figures, not minutes of swapping and a crash."""
    have = memory_bytes(device)
    need = count * bytes_each
    if have is not None and need > have:
        raise TegakiError(
            f"{what} needs about {size_text(need)} ({count:,} {items} x {bytes_each} bytes), more than "
            f"the {size_text(have)} of memory on {device}; ask for less (a smaller model: n_layer, n_embd, "
            "vocab_size; fewer tokens)"
        )


def synchronize(device: torch.device) -> None:
    """Wait for the device: GPU work runs asynchronously, so a timer must wait before it reads."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense (no sparsity) matmul peaks in FLOP/s from the vendors' datasheets, by a substring of
# torch.cuda.get_device_name(). fp32 means plain float32 (TF32 tensor cores are not counted: tegaki
# leaves TF32 off unless asked). Checked in this order: the first match wins.
ACCELERATOR_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),  # SXM
    ("GH200", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "fp32": 82.6e12}),
    ("RTX 3090", {"bf16": 71e12, "fp16": 71e12, "fp32": 35.6e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
]


def datasheet_peak(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of a known accelerator for dtype, or None."""
    for key, peaks in ACCELERATOR_PEAKS:
        if key.lower() in device_name.lower():
            return peaks.get(dtype)
    return None


_MEASURED: dict[tuple[str, str], float] = {}


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of the fastest n x n x n matmul seen in `seconds` (at least 3 tries).

    The fastest, not the average: on a machine shared with other programs the quietest moment is
    the closest to what the hardware can do (an average would put the ceiling too low)."""
    key = (str(device), f"{dtype}-{n}")
    if key in _MEASURED:
        return _MEASURED[key]
    g = torch.Generator(device=device).manual_seed(0)  # its own: the caller's random stream is untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm up: the library picks its kernel on the first call
    synchronize(device)
    fastest, wall, tries = float("inf"), time.perf_counter(), 0
    while time.perf_counter() - wall < seconds or tries < 3:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
        tries += 1
    _MEASURED[key] = 2 * n**3 / max(fastest, 1e-9)
    return _MEASURED[key]


def peak_flops(device: torch.device, dtype: str) -> tuple[float, str]:
    """(the peak MFU divides by, where it came from). A GPU's datasheet figure when tegaki knows
    the chip; otherwise a large matmul measured on it (8192^3 on a GPU: small ones leave a big
    chip idle and would put MFU above 100%); on a CPU a 1024^3 matmul."""
    torch_dtype = DTYPES[dtype]
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name, dtype)
        if peak is not None:
            return peak, f"{name} datasheet"
        return measured_matmul_flops(device, torch_dtype, n=8192, seconds=0.5), f"{name}, measured 8192^3 matmul"
    return measured_matmul_flops(device, torch_dtype), "measured 1024^3 matmul"


def mfu(tokens_per_second: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved / peak. A measured peak can read low on a
    busy machine; what the run achieved is then the better estimate of the peak, hence the cap."""
    return min(1.0, tokens_per_second * flops_per_token / peak) if peak > 0 else 0.0
