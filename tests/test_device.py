"""Device and dtype choice with a faked CUDA (runs on any CPU-only machine), and the MFU peak."""

import pytest
import torch

from tegaki import device
from tegaki.device import cpu_flags, datasheet_peak, mfu, peak_flops, pick_device, pick_dtype
from tegaki.errors import TegakiError


@pytest.fixture
def fake_cuda(monkeypatch):
    """PyTorch believes in `count` GPUs; set_device records what it was given instead of failing.
    torch.cuda.set_device refuses a bare torch.device("cuda") -- the bug a real GPU run hit --
    so the fake refuses it too."""
    calls = []

    def set_device(device):
        if isinstance(device, torch.device) and device.index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")
        calls.append(device)

    def install(count: int = 2, bf16: bool = True, name: str = "NVIDIA H200"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
        return calls

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    return install


def test_auto_and_bare_cuda_get_an_index(fake_cuda):
    calls = fake_cuda(count=2)
    assert pick_device("auto") == torch.device("cuda:0")
    assert pick_device("cuda") == torch.device("cuda:0")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    assert all(d.index is not None for d in calls) and len(calls) == 3


def test_torchrun_processes_each_take_their_own_gpu(fake_cuda, monkeypatch):
    fake_cuda(count=4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert pick_device("cuda") == torch.device("cuda:3")
    assert pick_device("auto") == torch.device("cuda:3")
    assert pick_device("cuda", local_rank=1) == torch.device("cuda:1")


def test_auto_is_the_cpu_without_a_gpu(fake_cuda):
    calls = fake_cuda(count=0)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert calls == []
    with pytest.raises(TegakiError, match="sees no CUDA GPU"):
        pick_device("cuda")


@pytest.mark.parametrize(
    "name, message",
    [
        ("cuda:2", "has 2 CUDA GPU"),
        ("gpu", "must be auto, cpu, cuda or cuda:N"),
        ("cuda:x", "cuda:N"),
    ],
)
def test_bad_devices_are_refused_clearly(fake_cuda, name, message):
    fake_cuda(count=2)
    with pytest.raises(TegakiError, match=message):
        pick_device(name)


def with_cpu_flags(monkeypatch, *flags: str) -> None:
    monkeypatch.setattr(device, "_FLAGS", frozenset(flags))


def test_auto_dtype_is_bf16_on_a_gpu_that_has_it(fake_cuda, monkeypatch):
    with_cpu_flags(monkeypatch, "avx2", "avx512f", "avx512_bf16")  # bf16 dot products, no AMX
    fake_cuda(bf16=True)
    assert pick_dtype("auto", torch.device("cuda:0")) == "bf16"
    assert pick_dtype("auto", torch.device("cpu")) == "fp32"
    assert pick_dtype("fp32", torch.device("cuda:0")) == "fp32"
    fake_cuda(bf16=False)
    assert pick_dtype("auto", torch.device("cuda:0")) == "fp32"
    with pytest.raises(TegakiError, match="--dtype must be"):
        pick_dtype("float64", torch.device("cpu"))


def test_auto_dtype_is_bf16_on_a_cpu_with_amx(monkeypatch):
    with_cpu_flags(monkeypatch, "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
    assert pick_dtype("auto", torch.device("cpu")) == "bf16"
    assert pick_dtype("fp32", torch.device("cpu")) == "fp32"
    with_cpu_flags(monkeypatch, "avx2")
    assert pick_dtype("auto", torch.device("cpu")) == "fp32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n"
    )
    flags = cpu_flags(str(info))
    assert {"avx2", "avx512f", "amx_bf16"} <= flags and "avx512_vnni" not in flags
    assert cpu_flags(str(tmp_path / "missing")) <= {"avx2", "avx512f"}  # elsewhere: PyTorch's own report
    monkeypatch.setattr(device, "_FLAGS", flags)
    assert device.cpu_has("amx_bf16") and device.cpu_summary() == "amx_bf16 amx_tile avx512f avx2"


@pytest.mark.parametrize(
    ("flags", "hardware"),
    [
        (("avx2", "avx512f", "avx512_vnni"), False),  # an AVX-512 Xeon without bf16: oneDNN emulates it
        (("avx2", "avx512f", "avx512_bf16"), True),  # AMD Zen 4, Intel Cooper Lake
        (("avx2", "avx512f", "amx_tile", "amx_bf16"), True),  # Intel Sapphire Rapids and later
        (("avx2",), False),
    ],
)
def test_bf16_hardware_is_read_from_the_cpu_flags_alone(monkeypatch, flags, hardware):
    """Whatever oneDNN says it can run (it emulates bf16 on plain AVX-512), bf16 *hardware* is the
    flags: the same answer on every machine for tegaki's bf16 paths and its tests."""
    with_cpu_flags(monkeypatch, *flags)
    assert device.cpu_bf16_hardware() is hardware


@pytest.mark.parametrize(
    ("cap", "left"),
    [
        ("", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}),
        ("AVX2", {"avx2"}),
        ("avx512_core", {"avx2", "avx512f"}),
        ("AVX512_CORE_VNNI", {"avx2", "avx512f", "avx512_vnni"}),
        ("AVX512_CORE_BF16", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}),
        ("SOMETHING_NEW", {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}),
    ],
)
def test_a_onednn_isa_cap_hides_the_flags_above_it(monkeypatch, cap, left):
    """ONEDNN_MAX_CPU_ISA runs the CPU as an older one: tegaki reads the flags above the cap as absent."""
    flags = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert device.capped(flags) == left


def test_known_accelerators_use_their_datasheet_peak(fake_cuda):
    fake_cuda(name="NVIDIA H100 80GB HBM3")
    assert peak_flops(torch.device("cuda:0"), "bf16") == (989e12, "NVIDIA H100 80GB HBM3 datasheet")
    assert datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756e12  # PCIe before the SXM catch-all
    assert datasheet_peak("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert datasheet_peak("NVIDIA GeForce RTX 4090", "fp32") == 82.6e12
    assert datasheet_peak("Some Future GPU", "bf16") is None


def test_mfu_is_a_share_and_never_above_one():
    peak, source = peak_flops(torch.device("cpu"), "fp32")
    assert peak > 0 and "measured" in source
    assert mfu(1000.0, 1e6, 1e10) == pytest.approx(0.1)
    assert mfu(1e6, 1e6, 1e10) == 1.0  # achieved more than a low measured ceiling
    # The 316% a GPU run once printed: a small matmul's speed is not an H200's peak.
    assert mfu(470_088, 6 * 124e6, 989e12) < 0.4
