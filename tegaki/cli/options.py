"""Flags several commands share, each written once: the model a command runs (--model, --device,
--dtype, --quantize)."""

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


MODEL_HELP = "a tegaki run folder, a transformers folder, or a hub id (gpt2)"


def add_model_arguments(
    p: argparse.ArgumentParser, *, required: bool = True, quantize: bool = True, dtype_default: str = "auto"
) -> None:
    """--model, where it runs (--device, --dtype) and, for a command that only decodes, --quantize."""
    p.add_argument("--model", required=required, help=MODEL_HELP)
    add_device_arguments(p, dtype_default)
    if quantize:
        p.add_argument(
            "--quantize",
            choices=["int8", "int4"],
            default=None,
            help="quantization of the linear layers (int8: llama.cpp's q8_0 blocks)",
        )
