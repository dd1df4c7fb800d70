"""native.py: tegaki's C++ loops are built for the instruction set the caps leave, once per machine,
into tegaki's own cache folder; a loop that cannot be built says why and leaves the readable path."""

import os
import subprocess
import sys
import warnings

import pytest

from tegaki import native
from tegaki.device import has_cxx_compiler

needs_cxx = pytest.mark.skipif(not has_cxx_compiler(), reason="no C++ compiler is installed")


@pytest.mark.parametrize(
    ("flags", "aten_cap", "expected"),
    [
        ({"avx512f", "avx2"}, "", "avx512"),
        ({"avx512f", "avx512_vnni", "avx2"}, "", "avx512_vnni"),  # Cascade Lake, Ice Lake
        ({"avx512f", "avx512_vnni", "avx512_bf16", "avx2"}, "", "avx512_bf16"),  # Zen 4, Cooper Lake, Sapphire Rapids
        ({"avx512f", "avx512_vnni", "avx512_bf16", "avx2"}, "avx2", "avx2"),
        ({"avx512f", "avx2"}, "avx2", "avx2"),  # PyTorch's kernels held to AVX2: tegaki's too
        ({"avx512f", "avx2"}, "default", "baseline"),
        ({"avx2"}, "", "avx2"),  # an AVX2 CPU, or a oneDNN cap (device.cpu_has reads it)
        (set(), "", "baseline"),
    ],
)
def test_the_instruction_set_follows_the_cpu_and_the_caps(monkeypatch, flags, aten_cap, expected):
    monkeypatch.setattr(native, "cpu_has", lambda flag: flag in flags)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", aten_cap)
    assert native.isa() == expected


def test_the_cache_folder_is_tegakis_own(monkeypatch, tmp_path):
    monkeypatch.setenv("TEGAKI_CACHE", str(tmp_path))
    assert native.cache_folder() == tmp_path / "kernels"
    monkeypatch.delenv("TEGAKI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_folder() == tmp_path / "xdg" / "tegaki" / "kernels"


@needs_cxx
def test_a_loop_that_does_not_build_warns_and_leaves_nothing_behind(monkeypatch, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "broken.cpp").write_text("this is not C++\n")
    monkeypatch.setattr(native, "KERNELS", source)
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("TEGAKI_CACHE", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="broken loop did not build"):
        assert native.load("broken") is False
    assert list((tmp_path / "cache" / "kernels").iterdir()) == []  # no half-written library
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # asked again: the answer is remembered, not warned twice
        assert native.load("broken") is False


@needs_cxx
@pytest.mark.slow  # one build of the int8 loop: about ten seconds on two cores
def test_a_loop_is_built_once_and_then_loaded(tmp_path):
    """Two processes in turn (a process registers the tegaki operators once): the first builds the
    library into the cache, the second loads that very file."""
    env = {**os.environ, "TEGAKI_CACHE": str(tmp_path)}
    load = [
        sys.executable,
        "-c",
        "from tegaki import native, quant; print(native.load('int8_matvec'), quant.int8_kernel())",
    ]
    first = subprocess.run(load, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0 and first.stdout.startswith("True tegaki.int8_matvec"), first.stderr
    (built,) = (tmp_path / "kernels").iterdir()
    assert built.name.startswith("int8_matvec-") and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    second = subprocess.run(load, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.startswith("True"), second.stderr
    assert built.stat().st_mtime_ns == stamp and list((tmp_path / "kernels").iterdir()) == [built]
