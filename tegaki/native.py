"""tegaki's hand-written CPU kernels: C++ loops in tegaki/kernels/, built once per machine.

A kernel here is a formula of tegaki's Python written out as the loop it is, where no PyTorch
operator does the same work (quant.py's int8 weight times a float row, for one: PyTorch would make
the float weight first). The Python formula stays the readable twin, and a test proves they agree.

Each kernel file is compiled by the machine's C++ compiler against PyTorch's own headers
(`torch.utils.cpp_extension.include_paths()`), for the instruction set this CPU has -- AVX-512 (with
its int8 and bfloat16 dot products where the CPU has them) or AVX2, below any ONEDNN_MAX_CPU_ISA or
ATEN_CPU_CAPABILITY cap, so that a run held to an older CPU runs that CPU's code -- and
registered as torch operators (`torch.ops.load_library`): a compiled graph can call them too. The
library is kept in ~/.cache/tegaki/kernels (or $TEGAKI_CACHE/kernels), named by a hash of the source
(and the headers beside it), the flags and the torch version: the first use on a machine compiles it,
later processes load the file.

Where there is no compiler, or the build fails, `load` says so once (a warning) and returns False:
the caller takes its readable path.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from tegaki.device import cpu_has, cxx_compiler

KERNELS = Path(__file__).parent / "kernels"

# The compiler's instruction-set flags for each level (GCC and Clang spell them alike).
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", *_AVX2]
ISA_FLAGS = {
    "avx512_bf16": [*_AVX512, "-mavx512vnni", "-mavx512bf16"],  # and bf16 dot products (VDPBF16PS)
    "avx512_vnni": [*_AVX512, "-mavx512vnni"],  # and int8 dot products (VPDPBUSD)
    "avx512": _AVX512,
    "avx2": _AVX2,
    "baseline": [],
}

_loaded: dict[str, bool] = {}


def isa() -> str:
    """The instruction set to compile for: the CPU's, held back by the caps that emulate older CPUs."""
    aten_cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cpu_has("avx512f") and aten_cap in ("", "avx512"):
        if cpu_has("avx512_vnni"):  # int8 dot products; every CPU with AVX-512 BF16 has them too
            return "avx512_bf16" if cpu_has("avx512_bf16") else "avx512_vnni"
        return "avx512"
    if cpu_has("avx2") and aten_cap in ("", "avx512", "avx2"):
        return "avx2"
    return "baseline"


def cache_folder() -> Path:
    root = os.environ.get("TEGAKI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tegaki"
    return Path(root) / "kernels"


def build_command(cxx: str, source: Path, out: Path, level: str) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        cxx, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w", *ISA_FLAGS[level],
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{p}" for p in include_paths()),
        str(source), "-o", str(out), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip


def load(name: str) -> bool:
    """Build (if not built for this machine yet) and load tegaki/kernels/NAME.cpp; True once its
    operators are in torch.ops.tegaki. False, with one warning, where it cannot be built."""
    if name in _loaded:
        return _loaded[name]
    _loaded[name] = False
    cxx = cxx_compiler()
    if cxx is None:
        message = f"no C++ compiler (g++, clang++): tegaki's {name} loop is not built, the readable path runs"
        warnings.warn(message, stacklevel=3)
        return False
    source = KERNELS / f"{name}.cpp"
    level = isa()
    texts = [source.read_text(), *(h.read_text() for h in sorted(source.parent.glob("*.h")))]  # and what it includes
    flags = build_command("", source, Path(), level)
    key = hashlib.sha256("\n".join([*texts, torch.__version__, cxx, *flags]).encode()).hexdigest()[:16]
    library = cache_folder() / f"{name}-{level}-{key}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # built aside, then moved in whole
            built = Path(tmp) / library.name
            done = subprocess.run(build_command(cxx, source, built, level), capture_output=True, text=True)
            if done.returncode != 0:
                warnings.warn(f"tegaki's {name} loop did not build ({cxx}): {done.stderr.strip()[-800:]}", stacklevel=3)
                return False
            os.replace(built, library)
    torch.ops.load_library(str(library))
    _loaded[name] = True
    return True


_faked: set[str] = set()


def operator(name: str, fake):
    """torch.ops.tegaki.NAME from tegaki/kernels/NAME.cpp, built and loaded on first use, with `fake`
    (the output's shape from the inputs') registered so that a compiled graph calls it as one
    operator; None where it cannot be built."""
    if not load(name):
        return None
    if name not in _faked:
        torch.library.register_fake(f"tegaki::{name}")(fake)
        _faked.add(name)
    return getattr(torch.ops.tegaki, name)
