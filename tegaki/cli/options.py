"""Flags several commands share, each written once: --device and --dtype."""

from __future__ import annotations

import argparse

from tegaki.device import DTYPES


def add_device_arguments(p: argparse.ArgumentParser, dtype_default: str = "auto") -> None:
    p.add_argument(
        "--device",
        default="auto",
        help="auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N (default auto)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", *DTYPES],
        default=dtype_default,
        help=f"weights and activations: auto is bf16 on a GPU that has it and on a CPU with AMX, else fp32 "
        f"(default {dtype_default})",
    )
