"""`make web`: build the page's kernels, kernels/kernels.rs -> static/kernels.wasm, or check them.

The built .wasm is committed with the package, so that `tegaki export --web` works without a Rust
toolchain. BUILD.json beside the source records which source it was built from (its sha256) and
with which compiler; the check (always run, and run by the tests) fails when the source changed
and the .wasm was not rebuilt.

The build needs a rustc that has the standard library for wasm32-unknown-unknown: Debian's
(`apt-get install rustc libstd-rust-dev-wasm32`), or rustup's with `rustup target add
wasm32-unknown-unknown`. Without one, `make web` only checks.

    python -m tegaki.web.build            # build when a toolchain is here, then check
    python -m tegaki.web.build --check    # check only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tegaki.errors import TegakiError
from tegaki.files import atomic_write_bytes, atomic_write_json

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernels" / "kernels.rs"
WASM = HERE / "static" / "kernels.wasm"
RECORD = HERE / "kernels" / "BUILD.json"
TARGET = "wasm32-unknown-unknown"
# simd128: four f32 lanes per instruction (every browser since 2021 runs it; kernels.js is the
# fallback for the others). No debug symbols: the file stays small.
FLAGS = ["--edition", "2021", "--crate-type", "cdylib", "--target", TARGET, "-C", "opt-level=3"]
FLAGS += ["-C", "target-feature=+simd128", "-C", "panic=abort", "-C", "strip=symbols"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_rustc() -> str | None:
    """A rustc whose sysroot has the wasm32 standard library: $RUSTC, Debian's, then the PATH's."""
    for candidate in (os.environ.get("RUSTC"), "/usr/bin/rustc", shutil.which("rustc")):
        if not candidate or not Path(candidate).exists():
            continue
        done = subprocess.run([candidate, "--print", "sysroot"], capture_output=True, text=True)
        if done.returncode == 0 and (Path(done.stdout.strip()) / "lib" / "rustlib" / TARGET / "lib").is_dir():
            return candidate
    return None


def compile_kernels(rustc: str, out: Path) -> None:
    """rustc: kernels.rs -> `out`, a WebAssembly module."""
    done = subprocess.run([rustc, *FLAGS, "-o", str(out), str(SOURCE)], capture_output=True, text=True)
    if done.returncode != 0:
        raise TegakiError(f"{rustc} could not build {SOURCE}:\n{done.stderr}")


def rustc_version(rustc: str) -> str:
    return subprocess.run([rustc, "--version"], capture_output=True, text=True).stdout.strip()


def build(rustc: str) -> None:
    """Compile the kernels into the package and record what they were built from."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.wasm"
        compile_kernels(rustc, out)
        atomic_write_bytes(WASM, out.read_bytes())
    record = {
        "source_sha256": sha256(SOURCE),
        "wasm_sha256": sha256(WASM),
        "rustc": rustc_version(rustc),
        "flags": " ".join(FLAGS),
    }
    atomic_write_json(RECORD, record)


def check() -> None:
    """The committed .wasm is the build of the committed source."""
    record = json.loads(RECORD.read_text())
    if record["source_sha256"] != sha256(SOURCE):
        raise TegakiError(
            f"{SOURCE.name} changed since {WASM.name} was built: run `make web` with a wasm32 Rust "
            "toolchain (apt-get install rustc libstd-rust-dev-wasm32) and commit the new .wasm"
        )
    if record["wasm_sha256"] != sha256(WASM):
        raise TegakiError(f"{WASM} is not the file {RECORD.name} records; run `make web` again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed .wasm is current")
    args = parser.parse_args(argv)
    try:
        rustc = None if args.check else find_rustc()
        if rustc:
            build(rustc)
            print(f"built {WASM} ({WASM.stat().st_size} bytes) with {rustc}", file=sys.stderr)
        elif not args.check:
            print(f"no rustc with the {TARGET} standard library here: checking the committed .wasm", file=sys.stderr)
        check()
    except TegakiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{WASM.name} is the build of {SOURCE.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
